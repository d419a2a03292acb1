"""FSDP2 on gloo (2 CPU ranks under torchrun): one step vs 1 rank (fp32 and bf16), sharded EMA, kill-and-resume,
resharding.

Multi-step loss trajectories are compared only where they are bitwise by construction (same world size,
resumed from a bitwise-equal state); across world sizes or precisions summation order differs and training
drifts chaotically, so those comparisons are of one step's loss and gradients from the same weights.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_worker import first_step_grads
from train_helpers import (
    REPO,
    assert_bitwise_equal,
    assert_distinct_decays,
    checkpoint_tensors,
    describe,
    free_port,
    make_text_data,
    native_crash,
    read_losses,
    subprocess_env,
    tiny_argv,
    torchrun,
)

from jit_fast.checkpoint import list_checkpoints
from jit_fast.train.trainer import main
from jit_kernels.numerics import FP32_RTOL, rel_err

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

STEPS = 20
WORKER = str(REPO / "tests" / "dist_worker.py")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("jit_fast_cache")


@pytest.fixture(autouse=True)
def _cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JIT_FAST_CACHE", str(cache))


def two_rank_args(data: Path, out: Path, *extra: str) -> list[str]:
    """Global batch 8 = 4 per rank x 2 ranks; checkpoints at steps 10 and 20."""
    return tiny_argv(data, out, "--batch-size", "4", "--max-steps", str(STEPS), "--save-freq-steps", "10",
                     "--keep-last", "0", *extra)


def one_rank_args(data: Path, out: Path, *extra: str) -> list[str]:
    """The same global batch of 8 on one rank."""
    return tiny_argv(data, out, "--batch-size", "8", "--max-steps", str(STEPS), "--save-freq-steps", "10",
                     "--keep-last", "0", *extra)


@pytest.fixture(scope="module")
def ref2(data: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted 2-rank FSDP2 run (through the EMA-checking worker)."""
    out = tmp_path_factory.mktemp("ref2")
    p = torchrun([WORKER, "ema", *two_rank_args(data, out)], env=subprocess_env(cache))
    assert p.returncode == 0, describe(p)
    return out


@pytest.fixture(scope="module")
def ref1(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Single-process run with the same global batch, to its step-10 checkpoint."""
    out = tmp_path_factory.mktemp("ref1")
    assert main(one_rank_args(data, out, "--max-steps", "10")) == 0
    return out


def first_step(data: Path, cache: Path, out: Path, nproc: int, *extra: str) -> dict[str, torch.Tensor]:
    """Loss and full gradients of step 1 (global batch 8 over `nproc` ranks, perturbed initial weights; see
    dist_worker.first_step_grads); one rank runs in this process without a process group."""
    if nproc == 1:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("JIT_FAST_CACHE", str(cache))
            return first_step_grads(tiny_argv(data, out, "--batch-size", "8", "--max-steps", "1", *extra))
    for attempt in (1, 2):  # a rerun writes the same grads.pt: once more after a native crash (see native_crash)
        p = torchrun([WORKER, "grads", str(out / "grads.pt"),
                      *tiny_argv(data, out, "--batch-size", str(8 // nproc), "--max-steps", "1", *extra)],
                     nproc=nproc, env=subprocess_env(cache))
        if p.returncode == 0 or attempt == 2 or not native_crash(p):
            break
        warnings.warn(f"a torchrun worker crashed natively; rerunning once. First attempt's stderr begins:\n"
                      f"{p.stderr[:2000]}", stacklevel=1)
    assert p.returncode == 0, describe(p)
    return torch.load(out / "grads.pt")


@pytest.fixture(scope="module")
def fp32_one(data: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The fp32 reference: step 1 in one process, no FSDP."""
    return first_step(data, cache, tmp_path_factory.mktemp("g32"), 1, "--precision", "fp32")


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    """Same parameters; every gradient within `rtol` norm-wise (`rel_err`) of the reference, and the loss too."""
    assert got.keys() == want.keys()
    bad = {k: rel_err(got[k], want[k]) for k in want if rel_err(got[k], want[k]) > rtol}
    assert not bad, bad


def test_two_ranks_match_one_rank_fp32(data: Path, cache: Path, fp32_one: dict[str, torch.Tensor], ref2: Path,
                                       tmp_path: Path) -> None:
    """Same weights and global batch: 2 FSDP2 ranks give the 1-rank loss and gradients up to fp32 summation
    order (measured 2e-7; 1e-5 is the kernel tests' fp32 bound). A wrong gradient reduction (sum for mean), a
    shard assembled from the wrong rank or a rank drawing other samples or noise misses it by orders."""
    assert_grads_close(first_step(data, cache, tmp_path, 2, "--precision", "fp32"), fp32_one, FP32_RTOL)
    meta = json.loads(next((ref2 / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["world_size"] == 2 and meta["fsdp"] and meta["global_batch"] == 8


# bf16 ratio rule (as in the kernel tests): both bf16 paths round activations to bf16 (unit roundoff 2^-9);
# FSDP2 also gathers block parameters in bf16 and forms their gradients in bf16, a second rounding source of
# the same size, so independent errors give at most sqrt(2) ~ 1.41x the plain autocast error: k = 1.5 over
# all gradients together. A single small tensor (the 16-element q/k norm weights) estimates its error from
# few elements and scatters (measured up to 1.8x): k = 3 per tensor, still far below the ~100x of a tensor
# whose gradient is wrong. The loss, one scalar, may sit by chance on the fp32 value: its bound is floored
# at one bf16 ulp of the loss (2^-8 relative).
BF16_GLOBAL_RATIO = 1.5
BF16_TENSOR_RATIO = 3.0


def test_bf16_fsdp_gradients_within_ratio_of_plain_autocast(data: Path, cache: Path,
                                                            fp32_one: dict[str, torch.Tensor], tmp_path: Path) -> None:
    """One step from the same weights and batch: the FSDP2 bf16 path (bf16 block parameters, fp32 reduction)
    errs against fp32 by at most k x the plain bf16 autocast path's own error (fp32 weights, one process)."""
    fsdp = first_step(data, cache, tmp_path / "fsdp", 2, "--precision", "bf16")
    plain = first_step(data, cache, tmp_path / "plain", 1, "--precision", "bf16")
    names = [k for k in fp32_one if k != "loss"]
    assert fsdp.keys() == plain.keys() == fp32_one.keys()

    def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g[k].flatten() for k in names])

    e_fsdp, e_plain = rel_err(flat(fsdp), flat(fp32_one)), rel_err(flat(plain), flat(fp32_one))
    print(f"gradient error vs fp32: FSDP2 bf16 {e_fsdp:.3e}, plain autocast {e_plain:.3e}, "
          f"ratio {e_fsdp / e_plain:.3f}")
    assert 0 < e_plain and e_fsdp <= BF16_GLOBAL_RATIO * e_plain, (e_fsdp, e_plain)
    ratios = {k: rel_err(fsdp[k], fp32_one[k]) / rel_err(plain[k], fp32_one[k]) for k in names}
    bad = {k: r for k, r in ratios.items() if not r <= BF16_TENSOR_RATIO}
    assert not bad, bad
    loss = fp32_one["loss"].item()
    bound = max(BF16_GLOBAL_RATIO * abs(plain["loss"].item() - loss), 2.0**-8 * abs(loss))
    assert abs(fsdp["loss"].item() - loss) <= bound, (fsdp["loss"].item(), plain["loss"].item(), loss)


def test_sharded_dual_ema_matches_the_closed_form(ref2: Path) -> None:
    """Both sharded EMAs follow the closed-form recurrence with the decay each was configured with (distinct ones,
    so an EMA built with the other's decay is caught); the kill-and-resume test holds the resumed run to these."""
    report = json.loads((ref2 / "ema_check.json").read_text())
    assert report["world_size"] == 2
    assert_distinct_decays(report["decay"]["ema1"], report["decay"]["ema2"])
    assert report["sharded"] == [True, True], "both EMAs must live as shards laid out like the parameters"
    assert report["max_err"]["ema1"] < 1e-6 and report["max_err"]["ema2"] < 1e-6, report


def test_sigterm_kill_and_resume_is_bitwise(data: Path, cache: Path, ref2: Path, tmp_path: Path) -> None:
    """SIGTERM on rank 1 only: both ranks checkpoint at the same step boundary and exit 0; resuming
    reproduces the uninterrupted run's parameters, both EMAs and the optimizer state bitwise."""
    out = tmp_path / "killed"
    p = torchrun([WORKER, "sigterm", "7", "1", *two_rank_args(data, out)], env=subprocess_env(cache))
    assert p.returncode == 0, describe(p)
    assert "preempted" in p.stdout and "step 7" in p.stdout, describe(p)
    assert [s for s, _ in list_checkpoints(out)] == [7]
    p = torchrun(["train.py", *two_rank_args(data, out, "--resume", str(out))], env=subprocess_env(cache))
    assert p.returncode == 0, describe(p)
    assert_bitwise_equal(checkpoint_tensors(ref2 / "checkpoints" / "step_000000020"), checkpoint_tensors(out))
    losses = read_losses(out)
    ref = read_losses(ref2)
    assert all(losses[s] == ref[s] for s in range(8, STEPS + 1))


def test_fp16_overflow_on_one_rank_is_skipped_on_both(data: Path, cache: Path, tmp_path: Path) -> None:
    """fp16 under FSDP2: an inf in one gradient shard of rank 1 alone makes both ranks skip that step (weights and
    EMAs unchanged on each), count it and halve the loss scale; a rank stepping alone would split the model."""
    out = tmp_path / "overflow"
    p = torchrun([WORKER, "overflow", *two_rank_args(data, out, "--max-steps", "3", "--precision", "fp16")],
                 env=subprocess_env(cache))
    assert p.returncode == 0, describe(p)
    reports = [json.loads((out / f"overflow_rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1] == {"skipped": 1, "scale": 2.0**15, "unchanged": True}, reports


def test_reshard_two_ranks_to_one(data: Path, ref2: Path, tmp_path: Path) -> None:
    """A 2-rank checkpoint resumes on 1 rank with identical state; its next step's loss, computed from that
    bitwise-equal state on the same batch, equals the 2-rank run's up to fp32 summation order (later steps
    drift and are not compared)."""
    src = ref2 / "checkpoints" / "step_000000010"
    out = tmp_path / "one"
    assert main(one_rank_args(data, out, "--max-steps", "10", "--resume", str(src))) == 0
    assert_bitwise_equal(checkpoint_tensors(src), checkpoint_tensors(out))  # loaded on 1 rank, saved again
    assert main(one_rank_args(data, out, "--max-steps", "11", "--resume", str(out))) == 0
    l2, l1 = read_losses(ref2), read_losses(out)
    assert sorted(l1) == [11]
    assert l1[11] == pytest.approx(l2[11], rel=FP32_RTOL, abs=0)


def test_reshard_one_rank_to_two(data: Path, cache: Path, ref1: Path, tmp_path: Path) -> None:
    src = ref1 / "checkpoints" / "step_000000010"
    out = tmp_path / "two"
    p = torchrun(["train.py", *two_rank_args(data, out, "--max-steps", "10", "--resume", str(src))],
                 env=subprocess_env(cache))
    assert p.returncode == 0, describe(p)
    assert_bitwise_equal(checkpoint_tensors(src), checkpoint_tensors(out))


def test_torchrun_demo_prints_one_progress_bar(cache: Path, tmp_path: Path) -> None:
    """`torchrun --nproc_per_node=2 train.py --preset demo --max-steps 5` on CPU: rank 0 alone draws the bar."""
    logs = tmp_path / "logs"
    p = torchrun(["train.py", "--preset", "demo", "--max-steps", "5", "--no-demo-eval",
                  "--output-dir", str(tmp_path / "demo")], env=subprocess_env(cache),
                 launcher_args=("--tee=3", f"--log-dir={logs}"))
    assert p.returncode == 0, describe(p)
    bar_lines = [ln for ln in re.split(r"[\r\n]", p.stderr) if "train:" in ln]
    assert bar_lines and all(ln.startswith("[default0]") for ln in bar_lines), describe(p)
    assert any("5/5" in ln for ln in bar_lines)
    rank1 = next(logs.rglob("1/stderr.log")).read_text()
    assert "train:" not in rank1 and "error" not in rank1.lower(), rank1
    assert p.stdout.count("done: step 5") == 1, describe(p)


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_and_exits(data: Path, cache: Path, tmp_path: Path) -> None:
    """A real SIGTERM to the torchrun agent at an arbitrary time: workers checkpoint and exit; resume works."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "train.py", *two_rank_args(data, out, "--max-steps", "100000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            m = out / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    m = re.search(r"preempted \(.*?\) at step (\d+)", stdout)
    assert m, stdout + stderr
    step = int(m.group(1))
    assert step >= 3 and list_checkpoints(out)[-1][0] == step  # the preemption checkpoint is the newest
    p = torchrun(["train.py", *two_rank_args(data, out, "--max-steps", str(step + 2), "--resume", str(out))],
                 env=subprocess_env(cache))
    assert p.returncode == 0, describe(p)
    assert sorted(read_losses(out))[-1] == step + 2


@pytest.mark.slow
def test_official_import_on_two_ranks_is_bitwise(data: Path, cache: Path, tmp_path: Path) -> None:
    """An official checkpoint imported by 2 FSDP2 ranks (weights, EMAs and AdamW state sharded on the fly)
    exports back bitwise."""
    from test_checkpoint import TINY_MODEL, _assert_official_equal, official_dict

    from jit_fast.checkpoint import export_checkpoint
    from jit_fast.checkpoint.official import safe_load
    from jit_fast.configs import model_config

    src = official_dict(model_config("JiT-T/4", img_size=16, num_classes=4, **TINY_MODEL), epoch=1)
    torch.save(src, tmp_path / "checkpoint-last.pth")
    for attempt in (1, 2):  # once more, into a fresh folder, after a native crash at exit (see native_crash)
        out = tmp_path / f"run{attempt}"
        p = torchrun(["train.py", *two_rank_args(data, out, "--max-steps", "16", "--resume", str(tmp_path))],
                     env=subprocess_env(cache))
        if p.returncode == 0 or attempt == 2 or not native_crash(p):
            break
        warnings.warn(f"a torchrun worker crashed natively; rerunning once. First attempt's stderr begins:\n"
                      f"{p.stderr[:2000]}", stacklevel=1)
    assert p.returncode == 0, describe(p)
    _assert_official_equal(src, safe_load(export_checkpoint(out, tmp_path / "back.pth")))


@pytest.mark.slow
def test_fsdp_grad_accumulation_matches(data: Path, cache: Path, fp32_one: dict[str, torch.Tensor],
                                       tmp_path: Path) -> None:
    """2 ranks x 2 per micro-step x 2 accumulation steps (reduce-scatter only on the last): step 1's loss and
    gradients equal one process's global batch of 8 up to fp32 summation order."""
    acc = first_step(data, cache, tmp_path, 2, "--precision", "fp32", "--batch-size", "2", "--grad-accum", "2")
    assert_grads_close(acc, fp32_one, FP32_RTOL)


FUSED_TABLE_UNDER_FSDP = """
import torch
from jit_fast.shared.distributed import init_distributed, prepare_model
from jit_fast.model.network import build_model

env = init_distributed("cpu", force_group=True)
torch.manual_seed(0)
ref = build_model("JiT-T/4", img_size=16, num_classes=10, kernels="triton")
with torch.no_grad():
    for p in ref.parameters():
        p.add_(0.05 * torch.randn_like(p))  # non-zero biases and gates, so every folded term matters
net = build_model("JiT-T/4", img_size=16, num_classes=10, kernels="triton")
net.load_state_dict(ref.state_dict())
net = prepare_model(net, env, fsdp=True, param_dtype=None)
x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randint(0, 10, (2,))
for _ in range(2):  # the second pass runs on re-gathered parameters
    out, want = net(x, t, y), ref(x, t, y)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.square().mean().backward()
    want.square().mean().backward()
for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
    if q.grad is not None:
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7, msg=name)
print("ok")
"""


def test_fused_table_under_fsdp2_matches_unsharded() -> None:
    """Every parameter a fused op reads (e.g. the proj bias folded into norm2's residual) must be one of the
    running block's own: FSDP2 frees a block's gathered parameters after its forward."""
    p = subprocess.run([sys.executable, "-c", FUSED_TABLE_UNDER_FSDP], cwd=REPO, env=subprocess_env(None),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout[-2000:] + p.stderr[-4000:]


@pytest.mark.slow  # torchrun: ~35 s on this machine while shared
def test_two_ranks_match_one_rank_with_text(cache: Path, tmp_path: Path) -> None:
    """A text model from a caption cache: 2 FSDP2 ranks give the 1-rank loss and gradients (fp32 summation order).
    A rank gathering the cache rows of other samples, or an unreduced text projection, misses by orders."""
    data, _, flags = make_text_data(tmp_path / "text")
    one = first_step(data, cache, tmp_path / "one", 1, "--precision", "fp32", *flags)
    assert one["y_embedder.proj.weight"].abs().sum() > 0
    assert_grads_close(first_step(data, cache, tmp_path / "two", 2, "--precision", "fp32", *flags), one, FP32_RTOL)
