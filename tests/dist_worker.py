"""torchrun worker for the distributed tests: `ema ARGS` trains and checks the sharded EMAs; `grads OUT ARGS`
records one training step's gradients.

`ema`: besides a normal run (checkpoints, metrics.jsonl) it gathers the parameters after every step and, at
the end, checks on rank 0 that both sharded EMAs equal the closed-form recurrence over the gathered
parameters with the decay the config asked for (--ema-decay1 / --ema-decay2, not the EMA's own `decay`, which
would accept an EMA built with the other one), writing the verdict to OUTPUT_DIR/ema_check.json.

`grads`: builds the Trainer the CLI flags describe, perturbs its initial weights (identically at any world
size), runs one real `train_step` and saves, from rank 0, the loss and every full gradient as the optimizer
sees it. `first_step_grads` does the same in-process (one rank, no process group).

`sigterm STEP RANK ARGS` trains as train.py does and SIGTERMs rank RANK after step STEP; `sigterm-eval ARGS`
SIGTERMs the process as its first online evaluation starts; `sigterm-hang STEP ARGS` SIGTERMs it after step STEP
and then hangs in the step callback (fault injection through the step callback).

`overflow ARGS` (fp16): puts an inf into one gradient shard of rank 1 only, at step 2, and writes per rank
OUTPUT_DIR/overflow_rank<R>.json: skipped steps, whether this rank's weights and EMAs stayed as they were after
step 1, and the loss scale.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from jit_fast.shared import distributed as D
from jit_fast.train.cli import parse_config
from jit_fast.train.trainer import Trainer, resolve_run, run_training

PERTURB_STD = 0.05
PERTURB_SEED = 1234


@contextlib.contextmanager
def trainer(argv: list[str]) -> Iterator[Trainer]:
    """The Trainer the CLI flags describe, in the process group train.py would make (shut down afterwards)."""
    cfg, explicit = parse_config(argv)
    env = D.init_distributed(cfg.device, force_group=cfg.fsdp == "on")
    try:
        yield Trainer(resolve_run(cfg, env, explicit), env)
    finally:
        D.shutdown(env)


def ema_check(argv: list[str]) -> int:
    """Train with the CLI flags given; write OUTPUT_DIR/ema_check.json comparing both EMAs with the closed form."""
    with trainer(argv) as tr:
        cfg, env, st = tr.cfg, tr.env, tr.state
        history = [[D.full_tensor(p).detach().double() for p in st.params]]
        tr.run(step_callback=lambda t: history.append([D.full_tensor(p).detach().double() for p in t.state.params]))
        report = {"world_size": env.world_size, "sharded": [], "max_err": {},
                  "decay": {"ema1": cfg.ema_decay1, "ema2": cfg.ema_decay2}}
        for name, ema in (("ema1", st.ema1), ("ema2", st.ema2)):
            state = st.ema_state(ema)
            full = [D.full_tensor(state[n]).double() for n in st.names]
            same_layout = all(
                s.shape == D.local(p).shape and D.is_dtensor(state[n]) == D.is_dtensor(p)
                for s, p, n in zip(ema.shadow, st.params, st.names, strict=True)
            )
            split = env.world_size == 1 or any(
                s.numel() < p.numel() for s, p in zip(ema.shadow, st.params, strict=True))
            report["sharded"].append(same_layout and split)
            d, k = report["decay"][name], len(history) - 1
            err = 0.0
            for j, f in enumerate(full):
                ref = d**k * history[0][j] + sum((1 - d) * d ** (k - i) * history[i][j] for i in range(1, k + 1))
                err = max(err, (f - ref).abs().max().item() / max(1.0, ref.abs().max().item()))
            report["max_err"][name] = err
        if env.is_main:
            Path(cfg.output_dir, "ema_check.json").write_text(json.dumps(report))
    return 0


def perturb(tr: Trainer) -> None:
    """Add the seeded perturbation to every trainable weight: the same full tensors at any world size.

    The zero-initialised adaLN and final layers would leave most block gradients exactly zero at step 1;
    perturbed, every parameter matters."""
    g = torch.Generator().manual_seed(PERTURB_SEED)
    with torch.no_grad():
        for p in tr.state.trainable:
            full = D.full_tensor(p.detach()).cpu()
            new = full + PERTURB_STD * torch.randn(full.shape, generator=g)
            D.local(p).copy_(D.shard_like(new, p))


def capture_step_grads(tr: Trainer) -> dict[str, torch.Tensor]:
    """Full float64 gradients per parameter name as AdamW sees them (unscaled, clipped), filled at each step."""
    grads: dict[str, torch.Tensor] = {}
    step = tr.state.opt.step

    def capture(*args, **kwargs):
        for n, p in zip(tr.state.names, tr.state.params, strict=True):
            if p.grad is not None:
                grads[n] = D.full_tensor(p.grad).detach().double().cpu()
        return step(*args, **kwargs)

    tr.state.opt.step = capture
    return grads


def first_step_grads(argv: list[str]) -> dict[str, torch.Tensor]:
    """Loss (key "loss") and full float64 gradients of step 1 from perturbed initial weights, per parameter name."""
    with trainer(argv) as tr:
        perturb(tr)
        grads = capture_step_grads(tr)
        tr.train_step(tr._epoch_batches())
        grads["loss"] = D.all_reduce_mean(tr.env, tr.meters.loss.detach()).double().cpu()
    return grads


def overflow_check(argv: list[str]) -> int:
    """Train (fp16) with an inf in rank 1's largest gradient shard at step 2; report what every rank did."""
    with trainer(argv) as tr:
        cfg, env, st = tr.cfg, tr.env, tr.state
        unscale, target = st.scaling.unscale, max(st.trainable, key=lambda p: p.numel())

        def poisoned_unscale() -> None:
            if tr.step == 1 and env.rank == 1:  # the second step, before its inf check
                D.local(target.grad).view(-1)[0] = float("inf")
            unscale()

        st.scaling.unscale = poisoned_unscale
        seen: dict[int, list[torch.Tensor]] = {}
        tr.run(step_callback=lambda t: seen.setdefault(
            t.step, [x.clone() for x in (*st.local_params(), *st.ema1.shadow, *st.ema2.shadow)]))
        report = {"skipped": int(st.scaling.skipped.item()), "scale": st.scaling.scaler.get_scale(),
                  "unchanged": all(torch.equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))}
        Path(cfg.output_dir, f"overflow_rank{env.rank}.json").write_text(json.dumps(report))
    return 0


def sigterm_at_step(step: int, rank: int, argv: list[str]) -> int:
    """Train as train.py does, with SIGTERM sent to this process by rank `rank` right after step `step`."""
    cfg, explicit = parse_config(argv)

    def fault(tr: Trainer) -> None:
        if tr.step == step and tr.env.rank == rank:
            os.kill(os.getpid(), signal.SIGTERM)

    return run_training(cfg, explicit, step_callback=fault)


def sigterm_then_hang(step: int, argv: list[str]) -> int:
    """Train as train.py does; after step `step` SIGTERM this process and never return from the step callback (a
    stuck step): only the grace watchdog (--preempt-grace) can end the process."""
    cfg, explicit = parse_config(argv)

    def fault(tr: Trainer) -> None:
        if tr.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(600)

    return run_training(cfg, explicit, step_callback=fault)


def sigterm_in_eval(argv: list[str]) -> int:
    """Train as train.py does, with SIGTERM sent to this process as the first online evaluation starts."""
    cfg, explicit = parse_config(argv)

    def fault(tr: Trainer) -> None:
        if tr.evals is None or "evaluate" in vars(tr.evals):
            return
        evaluate = tr.evals.evaluate

        def interrupted(step: int, epoch: int, stop) -> bool:
            del vars(tr.evals)["evaluate"]  # once
            os.kill(os.getpid(), signal.SIGTERM)
            return evaluate(step, epoch, stop)

        tr.evals.evaluate = interrupted

    return run_training(cfg, explicit, step_callback=fault)


def main(argv: list[str]) -> int:
    mode, rest = argv[0], argv[1:]
    if mode == "ema":
        return ema_check(rest)
    if mode == "overflow":
        return overflow_check(rest)
    if mode == "sigterm":
        return sigterm_at_step(int(rest[0]), int(rest[1]), rest[2:])
    if mode == "sigterm-hang":
        return sigterm_then_hang(int(rest[0]), rest[1:])
    if mode == "sigterm-eval":
        return sigterm_in_eval(rest)
    if mode == "grads":
        grads = first_step_grads(rest[1:])
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(grads, rest[0])
        return 0
    raise SystemExit(f"unknown mode {mode!r} (ema | grads OUT | overflow | sigterm STEP RANK | sigterm-hang STEP | "
                     "sigterm-eval)")


if __name__ == "__main__":
    faulthandler.enable()
    torch.set_num_threads(1)
    code = main(sys.argv[1:])
    gc.collect()  # free the Trainer (a reference cycle holds it) before the interpreter finalizes; see native_crash
    sys.exit(code)
