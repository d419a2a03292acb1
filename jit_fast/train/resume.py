"""Where a training run starts, and what its checkpoints record about it (the Trainer/Checkpointer split).

`resolve_resume` picks the checkpoint a run continues (--resume, --auto-resume, --overwrite,
--discard-newer; a previous run is moved aside, never deleted), `read_start` reads it (a DCP
checkpoint's meta.json or an official `.pth`), `merge_model_meta` and `check_architecture` fit the
config to it, and `restore` loads it into a `TrainState` (a DCP checkpoint resharded to this world
size, or official weights, EMAs and AdamW state). `checkpoint_meta` and `rank_state` are what a save
writes: meta.json and the per-rank file are written and read in this module only.

No RNG state is saved or restored: no training result depends on the state of a global generator (torch's
CPU and CUDA ones, Python's). t, label drop and noise come from generators seeded by (seed, step, position), the
loader's order and flips from (seed, epoch) in every backend, and dropout from a seed of (seed, step, rank,
micro-step) set before each micro-step (`Trainer.micro_step`: torch's generators reseeded for `nn.Dropout` and
attention dropout, the Philox key of the fused kernels). What does draw from the global generator is reseeded
first or unused (model init after `torch.manual_seed`, the DataLoader's worker seed). A resume with the global
RNGs scrambled continues bitwise (`tests/test_train.py::test_training_does_not_depend_on_the_global_rng`); the
RNG states older checkpoints hold in rank<R>.pt are ignored.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jit_fast.checkpoint.dcp import (
    CHECKPOINT_SUBDIR,
    ResolvedCheckpoint,
    dcp_keys,
    dcp_load,
    dcp_model_meta,
    list_checkpoints,
    read_meta,
    read_rank_state,
    resolve_checkpoint,
)
from jit_fast.checkpoint.meta import CheckpointError, ModelMeta
from jit_fast.checkpoint.official import (
    load_official_checkpoint,
    meta_from_official_args,
    official_state_dict_shapes,
    optimizer_from_official,
)
from jit_fast.configs import ModelConfig, TrainConfig, model_config
from jit_fast.shared import distributed as D
from jit_fast.shared.errors import UsageError
from jit_fast.train.state import MAX_WEIGHT_ABS, TrainState

RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "tb", "demo_eval")  # what --overwrite moves aside
# fields that fix the network's parameter shapes (dropout rates and kernels may change on resume)
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("attn_drop", "proj_drop",
                                                                                        "kernels"))


@dataclass(frozen=True)
class Progress:
    """Where training stands: optimizer steps done, the current epoch and the steps done in it."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0


@dataclass(frozen=True)
class StartPoint:
    """A checkpoint to continue: its model metadata, plus meta.json (DCP) or the loaded entries (official)."""

    source: ResolvedCheckpoint
    model_meta: ModelMeta
    run: dict | None = None
    official: dict | None = None


def model_meta(cfg: TrainConfig) -> ModelMeta:
    """What sampling needs to rebuild the net: preset name, img_size, num_classes, overrides."""
    ov = dict(cfg.extra_model_args)
    if cfg.attn_dropout >= 0:
        ov["attn_drop"] = cfg.attn_dropout
    if cfg.proj_dropout >= 0:
        ov["proj_drop"] = cfg.proj_dropout
    return ModelMeta(model=cfg.model, img_size=cfg.img_size, num_classes=cfg.num_classes, overrides=ov)


# ----------------------------------------------------------------------------------------------
# which checkpoint


def resolve_resume(cfg: TrainConfig, explicit: set[str], env: D.DistEnv,
                   log: Callable[[str], None]) -> ResolvedCheckpoint | None:
    """The checkpoint to start from; never clobbers a previous run unless --overwrite was given explicitly."""
    out = Path(cfg.output_dir)
    existing = list_checkpoints(out)
    metrics = out / "metrics.jsonl"
    held = "checkpoints" if existing else ("metrics.jsonl" if metrics.is_file() and metrics.stat().st_size else "")
    newest = f" (newest: {existing[-1][1].name})" if existing else ""
    overwrite = cfg.overwrite and "overwrite" in explicit  # a preset never replaces a run
    if overwrite and cfg.auto_resume and "auto_resume" in explicit:
        raise UsageError("--overwrite (start over) and --auto-resume (continue) contradict each other")
    aside = f"--overwrite to start over (the old run is moved to {out / 'replaced-TIME'})"
    if cfg.resume and _fresh_official_launch(Path(cfg.resume), out, existing):
        log(f"--resume {cfg.resume}: no checkpoint there yet, starting a new run (the official command resumes "
            "from its own --output-dir from the first launch on)")
    elif cfg.resume:
        r = resolve_checkpoint(cfg.resume)
        if r.kind == "safetensors":
            raise UsageError(f"--resume {r.path}: a .safetensors file holds weights only; resume needs a "
                             "training checkpoint (run dir, checkpoint dir or official .pth)")
        inside = is_own_checkpoint(r, out)
        if inside:
            _check_newer(r.path, existing, cfg.discard_newer, out, env, log)
        if held and not inside:
            if not overwrite:
                raise UsageError(f"{out} already holds {held} of another run{newest}; choose another "
                                 f"--output-dir or pass {aside}")
            _move_aside(out, env, log)
        return r
    if held and overwrite:
        _move_aside(out, env, log)
        return None
    if existing and cfg.auto_resume:
        return ResolvedCheckpoint("dcp", existing[-1][1])
    if held and cfg.auto_resume:  # a run that died before its first checkpoint: nothing to continue
        _move_aside(out, env, log)
        return None
    if held:
        raise UsageError(f"{out} already holds {held} of a run{newest}; pass --auto-resume to continue it, "
                         f"{aside}, or another --output-dir")
    return None


def _fresh_official_launch(resume: Path, out: Path, existing: list[tuple[int, Path]]) -> bool:
    """`--output-dir X --resume X` before X holds any checkpoint (the official launcher's first run)."""
    same = resume.expanduser().resolve() == out.expanduser().resolve()
    return same and not existing and not (out / "checkpoint-last.pth").exists()


def is_own_checkpoint(r: ResolvedCheckpoint, out: Path) -> bool:
    """True if `r` is a checkpoint directory of the run in `out` (not another run's, not an official file)."""
    return r.path.resolve().parent == (out / CHECKPOINT_SUBDIR).resolve()


def _check_newer(path: Path, existing: list[tuple[int, Path]], discard_newer: bool, out: Path, env: D.DistEnv,
                 log: Callable[[str], None]) -> None:
    """Resuming a non-latest checkpoint in place: refuse, or with --discard-newer move the newer ones aside.

    Otherwise a later --auto-resume would pick the abandoned history's newest checkpoint.
    """
    current = next((s for s, d in existing if d.resolve() == path.resolve()), None)
    newer = [d for s, d in existing if current is not None and s > current]
    if not newer:
        return
    if not discard_newer:
        raise UsageError(f"--resume {path.name} is older than {newer[-1].name} in {path.parent}; a later "
                         "--auto-resume would continue the newer one. Pass --output-dir NEWDIR to branch, or "
                         "--discard-newer to move the newer checkpoints to OUTPUT/discarded-TIME/")
    if env.is_main:
        dest = out / f"discarded-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}" / CHECKPOINT_SUBDIR
        dest.mkdir(parents=True, exist_ok=True)
        for d in newer:
            os.replace(d, dest / d.name)
        log(f"moved {len(newer)} newer checkpoint(s) ({newer[0].name}..{newer[-1].name}) to {dest}")
    D.barrier(env)


def _move_aside(out: Path, env: D.DistEnv, log: Callable[[str], None]) -> None:
    """Move the previous run's files into OUTPUT/replaced-<UTC time>/: replacing a run never deletes it."""
    if env.is_main:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        dest, n = out / f"replaced-{stamp}", 1
        while dest.exists():
            dest, n = out / f"replaced-{stamp}-{n}", n + 1
        dest.mkdir()
        moved = []
        for name in RUN_ARTIFACTS:
            if (out / name).exists():
                os.replace(out / name, dest / name)
                moved.append(name)
        log(f"moved the previous run ({', '.join(moved)}) to {dest}; delete it when no longer needed")
    D.barrier(env)


# ----------------------------------------------------------------------------------------------
# fitting the config to it


def read_start(source: ResolvedCheckpoint) -> StartPoint:
    """meta.json of a DCP checkpoint, or the entries of an official one (which must be a training checkpoint)."""
    if source.kind == "dcp":
        run = read_meta(source.path)
        return StartPoint(source, dcp_model_meta(run, source.path), run=run)
    ck = load_official_checkpoint(source.path)
    for k in ("model", "epoch"):
        if k not in ck:
            raise CheckpointError(f"{source.path} has no '{k}' entry: not a training checkpoint")
    return StartPoint(source, meta_from_official_args(ck.get("args"), source.path), official=ck)


def merge_model_meta(cfg: TrainConfig, explicit: set[str], start: StartPoint) -> TrainConfig:
    """Model fields come from the checkpoint unless given explicitly, and must then agree with it."""
    mm = start.model_meta
    names = {"model": "--model", "img_size": "--img-size", "num_classes": "--num-classes"}
    updates: dict[str, Any] = {}
    for field, flag in names.items():
        saved = getattr(mm, field)
        if saved is None:
            continue
        ours = getattr(cfg, field)
        if field in explicit and ours not in (saved, 0):
            raise UsageError(f"{flag} {ours} does not match the checkpoint {start.source.path} "
                             f"(trained with {field}={saved})")
        updates[field] = saved
    ov = dict(mm.overrides)
    if "extra_model_args" in explicit:
        for k, v in cfg.extra_model_args.items():
            if k in ov and ov[k] != v and k not in ("attn_drop", "proj_drop"):
                raise UsageError(f"--model-arg {k}={v} does not match the checkpoint (trained with {k}={ov[k]})")
        ov.update(cfg.extra_model_args)
    for k, field in (("attn_drop", "attn_dropout"), ("proj_drop", "proj_dropout")):
        if field not in explicit and k in ov:
            updates[field] = ov[k]
        ov.pop(k, None)
    updates["extra_model_args"] = ov
    if "seed" not in explicit and start.run is not None and "seed" in start.run:
        updates["seed"] = int(start.run["seed"])
    return dataclasses.replace(cfg, **updates)


def _arch(meta: ModelMeta) -> dict:
    mc = model_config(meta.model, img_size=meta.img_size, num_classes=meta.num_classes, **meta.overrides)
    return {k: getattr(mc, k) for k in ARCH_FIELDS}


def check_architecture(start: StartPoint, meta: ModelMeta) -> None:
    """UsageError unless the network `meta` describes has the checkpoint's parameter shapes."""
    saved = start.model_meta
    if not saved.model:
        return
    saved = saved.replace(img_size=meta.img_size if saved.img_size is None else saved.img_size,
                          num_classes=meta.num_classes if saved.num_classes is None else saved.num_classes)
    if _arch(saved) != _arch(meta):
        diff = [k for k in ARCH_FIELDS if _arch(saved)[k] != _arch(meta)[k]]
        raise UsageError(f"the model does not match the checkpoint {start.source.path} (differs in {diff})")


# ----------------------------------------------------------------------------------------------
# loading it


def restore(start: StartPoint, state: TrainState, cfg: TrainConfig, model_cfg: ModelConfig, env: D.DistEnv,
            global_batch: int, steps_per_epoch: int, log: Callable[[str], None]) -> Progress:
    """Load the checkpoint into `state`; the progress to continue from."""
    if start.official is not None:
        progress = _restore_official(start, state, cfg, model_cfg, steps_per_epoch, log)
    else:
        progress = _restore_dcp(start, state, cfg, env, global_batch, steps_per_epoch)
    if D.any_rank(env, bool(state.weights_exploded().item())):
        raise CheckpointError(f"{start.source.path} holds exploded weights (|x| > {MAX_WEIGHT_ABS:g} or not "
                              "finite); resume from an earlier checkpoint")
    return progress


def _restore_dcp(start: StartPoint, state: TrainState, cfg: TrainConfig, env: D.DistEnv, global_batch: int,
                 steps_per_epoch: int) -> Progress:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path, meta = start.source.path, start.run
    sd = state.state_dict(template=True)
    # parameters that never received a gradient (e.g. unused in-context tokens) have no saved
    # optimizer state; they must not get one on resume either
    saved = dcp_keys(path, verify=not cfg.skip_checksum)
    sd["optim"]["state"] = {
        fqn: st for fqn, st in sd["optim"]["state"].items()
        if all(f"optim.state.{fqn}.{k}" in saved for k in st)
    }
    if "loss_scale" in sd and not any(k.startswith("loss_scale.") for k in saved):
        sd.pop("loss_scale")  # fp16 continuing a bf16/fp32 checkpoint: the loss scale starts at its initial value
    dcp_load(sd, path, env.distributed, verify=not cfg.skip_checksum)
    if "loss_scale" in sd:
        state.scaling.load_state_dict(sd["loss_scale"])
    set_model_state_dict(state.net, sd["model"], options=StateDictOptions(strict=True))
    set_optimizer_state_dict(state.net, state.opt, sd["optim"], options=StateDictOptions(strict=False))
    state.drop_optimizer_state(set(sd["optim"]["state"]))
    for ema, key in ((state.ema1, "ema1"), (state.ema2, "ema2")):
        torch._foreach_copy_(ema.shadow, [D.local(sd[key][n]) for n in state.names])
    state.reapply_hparams(cfg)
    step, epoch, step_in_epoch = int(meta["step"]), int(meta["epoch"]), int(meta["step_in_epoch"])
    if step_in_epoch and int(meta["global_batch"]) != global_batch:
        raise UsageError(
            f"the checkpoint stopped mid-epoch with global batch {meta['global_batch']}; resume with the "
            f"same global batch (batch_size x world_size x grad_accum, now {global_batch})"
        )
    if step_in_epoch >= steps_per_epoch:
        epoch, step_in_epoch = epoch + 1, 0
    read_rank_state(path, env.rank)  # a damaged file is refused (also with --skip-checksum); its contents are unused
    return Progress(step, epoch, step_in_epoch)


def _restore_official(start: StartPoint, state: TrainState, cfg: TrainConfig, model_cfg: ModelConfig,
                      steps_per_epoch: int, log: Callable[[str], None]) -> Progress:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    ck, path = start.official, start.source.path
    want = official_state_dict_shapes(model_cfg)
    got = {k: tuple(v.shape) for k, v in ck["model"].items()}
    if got != want:
        bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        raise CheckpointError(f"{path} does not fit the model (first difference: {bad[0]})")
    full = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(state.net, ck["model"], options=full)
    for ema, key in ((state.ema1, "model_ema1"), (state.ema2, "model_ema2")):
        src = ck.get(key, ck["model"])
        with torch.no_grad():
            for s, n, p in zip(ema.shadow, state.names, state.params, strict=True):
                s.copy_(D.shard_like(src[n].float(), p))
    named = [(n, p.shape, p.requires_grad) for n, p in zip(state.names, state.params, strict=True)]
    osd, why = optimizer_from_official(ck.get("optimizer", {}), named) if "optimizer" in ck else (None, "absent")
    if osd is not None:
        set_optimizer_state_dict(state.net, state.opt, osd, options=StateDictOptions(full_state_dict=True))
        state.reapply_hparams(cfg)
    else:
        log(f"warning: optimizer state of {path} not loaded ({why}); AdamW moments start from zero")
    epoch = int(ck["epoch"]) + 1
    return Progress(epoch * steps_per_epoch, epoch, 0)


# ----------------------------------------------------------------------------------------------
# what a save writes


def checkpoint_meta(cfg: TrainConfig, progress: Progress, *, steps_per_epoch: int, world_size: int,
                    global_batch: int, lr: float, loader_state: dict, meta: ModelMeta, precision: str,
                    fsdp: bool) -> dict:
    """meta.json of a checkpoint (CheckpointManager adds format and saved_at)."""
    return {
        "step": progress.step, "epoch": progress.epoch, "step_in_epoch": progress.step_in_epoch,
        "steps_per_epoch": steps_per_epoch, "world_size": world_size, "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum, "global_batch": global_batch, "seed": cfg.seed, "lr": lr,
        "loader": loader_state, "model_meta": meta.to_dict(), "precision": precision, "fsdp": fsdp,
        "torch": torch.__version__, "config": dataclasses.asdict(cfg),
    }


def rank_state(loader_state: dict) -> dict:
    """This rank's loader position (rank<R>.pt), a record: a resume takes its position from meta.json."""
    return {"loader": loader_state}
