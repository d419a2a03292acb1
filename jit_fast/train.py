"""JiT training: one process or torchrun (FSDP2), dual EMA, exact resume, preemption-safe DCP checkpoints.

`python train.py --preset demo` trains the CPU demo; `torchrun --nproc_per_node=8 train.py
--model JiT-B/16 --data-path DIR ...` trains on ImageNet with the official recipe (the flags keep
the official names and meanings; underscores and dashes are interchangeable).

Randomness is counter-based: the time, noise and label-drop draws of the sample at position p of
the global batch of step s come from generators seeded by (seed, s, p), and the loader's order
depends only on (seed, epoch) and the global batch. A run therefore continues bit-for-bit after a
resume, and runs that split the same global batch differently over ranks and accumulation
micro-steps see exactly the same samples and draws (only reduction rounding differs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jit_fast import distributed as D
from jit_fast.checkpoint.dcp import (
    CheckpointManager,
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
from jit_fast.configs import (
    LEARNING_RATE,
    MODEL_PRESETS,
    RUN_PRESETS,
    TRAIN_RANGES,
    ModelConfig,
    TrainConfig,
    model_config,
)
from jit_fast.demo_eval import evaluate_demo
from jit_fast.demo_eval import summary as demo_summary
from jit_fast.denoiser import flow_matching_loss, sample_t
from jit_fast.ema import EMA
from jit_fast.errors import UsageError as ConfigError  # the name train's callers and tests catch
from jit_fast.errors import UserError
from jit_fast.metrics import (
    DROPPED_METRICS_FILE,
    MetricsLogger,
    drop_rows_after,
    peak_flops,
    peak_memory_gb,
    train_flops_per_image,
)
from jit_fast.model import JiT
from jit_fast.seeds import mix_seed

EXIT_USAGE = 2
EXIT_DIVERGED = 3
# |x| beyond this in a parameter or EMA weight means the run has exploded even while the loss is finite
MAX_WEIGHT_ABS = 1e6
RUN_ARTIFACTS = ("checkpoints", "metrics.jsonl", "tb", "demo_eval")  # what --overwrite moves aside
_FAULT_STEP_ENV = "JIT_FAST_FAULT_SIGNAL_STEP"  # tests: "STEP" or "STEP:RANK" sends SIGTERM to itself
# fields that fix the network's parameter shapes (dropout rates and kernels may change on resume)
_ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("attn_drop", "proj_drop",
                                                                                         "kernels"))


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/Inf."""


# ----------------------------------------------------------------------------------------------
# command line


def _value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _model_arg(s: str) -> tuple[str, Any]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--model-arg expects KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), _value(v.strip())


# (flag names, TrainConfig field, type, help); every flag also accepts its underscore spelling.
_OPTIONS: list[tuple[tuple[str, ...], str, Any, str]] = [
    (("--preset",), "preset", str, f"run preset: {', '.join(RUN_PRESETS)}"),
    (("--model",), "model", str, "model preset, e.g. JiT-B/16"),
    (("--model-arg",), "extra_model_args", _model_arg, "model constructor override KEY=VALUE (repeatable)"),
    (("--img-size",), "img_size", int, "image size"),
    (("--num-classes", "--class-num"), "num_classes", int, "number of classes (default: from the data)"),
    (("--data-path",), "data_path", str, "ImageFolder root (DIR/train is used when present)"),
    (("--data-backend",), "data_backend", str, "auto | dali | torch"),
    (("--dali-filter",), "dali_filter", str, "cubic | linear (DALI resize filter)"),
    (("--num-workers",), "num_workers", int, "loader workers / DALI threads"),
    (("--output-dir",), "output_dir", str, "run directory (checkpoints, tb, metrics.jsonl)"),
    (("--resume",), "resume", str, "checkpoint dir, run dir, official .pth or folder with checkpoint-last.pth"),
    (("--epochs",), "epochs", int, "training epochs (schedule length)"),
    (("--max-steps",), "max_steps", int, "stop after this many optimizer steps (0: no limit)"),
    (("--batch-size",), "batch_size", int, "per-GPU batch size (per micro-step)"),
    (("--grad-accum",), "grad_accum", int, "gradient accumulation micro-steps"),
    (("--blr",), "blr", float, "base lr: lr = blr * global_batch / 256"),
    (("--lr",), "lr", float, "absolute lr (overrides --blr)"),
    (("--min-lr",), "min_lr", float, "final lr of the cosine schedule"),
    (("--lr-schedule",), "lr_schedule", str, "constant | cosine"),
    (("--warmup-epochs",), "warmup_epochs", float, "linear warmup epochs"),
    (("--weight-decay",), "weight_decay", float, "AdamW weight decay (not on biases and 1-D params)"),
    (("--grad-clip",), "grad_clip", float, "clip the global grad norm (0: off)"),
    (("--P-mean",), "P_mean", float, "logit-normal t mean"),
    (("--P-std",), "P_std", float, "logit-normal t std"),
    (("--noise-scale",), "noise_scale", float, "noise scale"),
    (("--t-eps",), "t_eps", float, "clamp of 1 - t in the v conversion"),
    (("--label-drop-prob",), "label_drop_prob", float, "label dropout probability (CFG)"),
    (("--ema-decay1",), "ema_decay1", float, "first EMA decay (used for sampling)"),
    (("--ema-decay2",), "ema_decay2", float, "second EMA decay"),
    (("--attn-dropout",), "attn_dropout", float, "attention dropout of the middle blocks"),
    (("--proj-dropout",), "proj_dropout", float, "projection dropout of the middle blocks"),
    (("--kernels",), "kernels", str, "torch | triton"),
    (("--precision",), "precision", str, "auto | bf16 | fp32 (auto: bf16 on CUDA, fp32 on CPU)"),
    (("--device",), "device", str, "auto | cpu | cuda"),
    (("--seed",), "seed", int, "seed of init, data order and noise"),
    (("--fsdp",), "fsdp", str, "auto | on | off (auto: FSDP2 when world_size > 1)"),
    (("--log-freq",), "log_freq", int, "steps between host syncs for loss/grad-norm logging"),
    (("--save-freq-steps", "--save-freq"), "save_freq_steps", int, "checkpoint every N steps (0: off)"),
    (("--save-last-freq",), "save_last_freq", int, "checkpoint every N epochs (official meaning)"),
    (("--keep-last",), "keep_last", int, "checkpoints kept (0: all)"),
    (("--signal-check-freq",), "signal_check_freq", int, "steps between preemption-flag agreements"),
    (("--peak-tflops",), "peak_tflops", float, "per-device peak TFLOP/s for MFU (default: from GPU name)"),
    (("--cfg",), "cfg", float, "CFG scale of the post-training demo evaluation"),
    (("--interval-min",), "interval_min", float, "CFG interval start (demo evaluation)"),
    (("--interval-max",), "interval_max", float, "CFG interval end (demo evaluation)"),
    (("--num-sampling-steps",), "eval_steps", int, "sampling steps (demo evaluation)"),
    (("--sampling-method",), "solver", str, "heun | euler (demo evaluation)"),
    (("--num-images",), "eval_num_images", int, "images generated by the demo evaluation"),
]
_FLAGS: list[tuple[tuple[str, ...], str, str]] = [
    (("--compile",), "compile", "torch.compile each block"),
    (("--activation-checkpointing",), "activation_checkpointing", "recompute block activations in backward"),
    (("--async-save",), "async_save", "write checkpoints in a background thread"),
    (("--auto-resume",), "auto_resume", "continue from output-dir's newest checkpoint if any"),
    (("--overwrite",), "overwrite", "start over: move output-dir's previous run into output-dir/replaced-TIME/"),
    (("--discard-newer",), "discard_newer", "resume an older checkpoint in place: move the newer ones to "
                                            "output-dir/discarded-TIME/"),
    (("--skip-checksum",), "skip_checksum", "load checkpoint files even if they differ from checksums.json"),
    (("--demo-eval",), "demo_eval", "run the demo evaluation (sample grid + accuracy) after training"),
    (("--tensorboard",), "tensorboard", "TensorBoard scalars in OUTPUT/tb"),
    (("--reshard-after-forward",), "reshard_after_forward", "FSDP2: free gathered params after forward"),
    (("--demo-data",), "demo_data", "train on the built-in digits dataset"),
    (("--flip",), "flip", "random horizontal flip (official recipe; --no-flip for data like digits)"),
]
_UNSUPPORTED = {
    "--online-eval": "online FID is not run inside train.py; sample the checkpoint with sample.py --fid-ref",
    "--evaluate-gen": "use sample.py --ckpt OUTPUT_DIR for generation/FID",
}


def _spellings(names: tuple[str, ...]) -> list[str]:
    out = []
    for n in names:
        for s in (n, "--" + n[2:].replace("-", "_")):
            if s not in out:
                out.append(s)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Train JiT (pixel-space flow matching). Single process or torchrun (FSDP2).",
        argument_default=argparse.SUPPRESS,
    )
    for names, dest, typ, help_ in _OPTIONS:
        kw: dict[str, Any] = dict(dest=dest, type=TRAIN_RANGES.get(dest, typ), help=help_)
        if dest == "extra_model_args":
            kw["action"] = "append"
        p.add_argument(*_spellings(names), **kw)
    for names, dest, help_ in _FLAGS:
        spell = _spellings(names)
        p.add_argument(*spell, dest=dest, action="store_true", help=help_)
        p.add_argument(*["--no-" + s[2:] for s in spell], dest=dest, action="store_false", help=argparse.SUPPRESS)
    for flag in _UNSUPPORTED:
        p.add_argument(*_spellings((flag,)), dest="unsupported_" + flag[2:].replace("-", "_"),
                       action="store_true", help=argparse.SUPPRESS)
    # accepted for compatibility with the official launcher, ignored (torchrun sets the environment)
    for flag in ("--local-rank", "--world-size", "--dist-url", "--gen-bsz", "--eval-freq", "--start-epoch"):
        p.add_argument(*_spellings((flag,)), dest="ignored_" + flag[2:].replace("-", "_"), help=argparse.SUPPRESS)
    for flag in ("--pin-mem", "--no-pin-mem", "--dist-on-itp"):
        p.add_argument(*_spellings((flag,)), dest="ignored_" + flag[2:].replace("-", "_"), action="store_true",
                       help=argparse.SUPPRESS)
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """TrainConfig from defaults <- run preset <- explicit flags; returns it and the explicit field names."""
    ns = vars(build_parser().parse_args(argv))
    for flag, why in _UNSUPPORTED.items():
        if ns.pop("unsupported_" + flag[2:].replace("-", "_"), False):
            raise ConfigError(f"{flag} is not supported: {why}")
    for k in [k for k in ns if k.startswith("ignored_")]:
        ns.pop(k)
    if "extra_model_args" in ns:
        ns["extra_model_args"] = dict(ns["extra_model_args"])
    cfg = TrainConfig()
    name = ns.get("preset", "")
    if name:
        if name not in RUN_PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(RUN_PRESETS)}")
        cfg = dataclasses.replace(cfg, **RUN_PRESETS[name])
        if "blr" in ns and "lr" not in ns:  # an explicit --blr beats a preset's absolute lr
            cfg = dataclasses.replace(cfg, lr=None)
    if "extra_model_args" in ns:  # explicit overrides extend the preset's
        ns["extra_model_args"] = {**cfg.extra_model_args, **ns["extra_model_args"]}
    cfg = dataclasses.replace(cfg, **ns)
    validate_config(cfg)
    return cfg, set(ns)


def _flag(field: str) -> str:
    """The command-line spelling of a TrainConfig field (the field name for settings without a flag)."""
    for names, dest, _, _ in _OPTIONS:
        if dest == field:
            return names[0]
    return field


def validate_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the flag for a choice, range or combination that cannot work."""
    choices = dict(lr_schedule=("constant", "cosine"), precision=("auto", "bf16", "fp32"),
                   fsdp=("auto", "on", "off"), data_backend=("auto", "dali", "torch"), kernels=("torch", "triton"),
                   dali_filter=("cubic", "linear"),
                   solver=("heun", "euler"))
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise ConfigError(f"--{k.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, k)!r}")
    if cfg.model not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {cfg.model!r}; known models: {', '.join(MODEL_PRESETS)}")
    for k, allowed in TRAIN_RANGES.items():
        v = getattr(cfg, k)
        unset = (k == "lr" and v is None) or (k in ("attn_dropout", "proj_dropout") and v == -1.0)
        if not unset and not allowed.contains(v):
            raise ConfigError(f"{_flag(k)} must be {allowed.describe()}, got {v!r}")
    if cfg.interval_min >= cfg.interval_max:
        raise ConfigError(f"--interval-min {cfg.interval_min} must be < --interval-max {cfg.interval_max}")
    if not cfg.data_path and not cfg.demo_data:
        raise ConfigError("no training data: pass --data-path DIR (an ImageFolder) or --preset demo")


def resolve_data_root(path: str) -> Path:
    """The ImageFolder root: DIR/train when it exists (the official layout), else DIR."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--data-path {p} is not a directory")
    return p / "train" if (p / "train").is_dir() else p


# ----------------------------------------------------------------------------------------------
# helpers


_TAG_T_DROP, _TAG_NOISE, _TAG_DROPOUT = 1, 2, 3


def lr_at(cfg: TrainConfig, base_lr: float, epoch: float) -> float:
    """Official schedule on a fractional epoch: linear warmup, then constant or cosine to min_lr."""
    if epoch < cfg.warmup_epochs:
        return base_lr * epoch / cfg.warmup_epochs
    if cfg.lr_schedule == "constant":
        return base_lr
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def base_learning_rate(cfg: TrainConfig, global_batch: int) -> float:
    """The official rule: the absolute --lr when given, else blr x global_batch / 256."""
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Official AdamW groups: [no decay (1-D params and biases), decay], frozen parameters skipped."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def model_meta(cfg: TrainConfig) -> ModelMeta:
    """What sampling needs to rebuild the net: preset name, img_size, num_classes, overrides."""
    ov = dict(cfg.extra_model_args)
    if cfg.attn_dropout >= 0:
        ov["attn_drop"] = cfg.attn_dropout
    if cfg.proj_dropout >= 0:
        ov["proj_drop"] = cfg.proj_dropout
    return ModelMeta(model=cfg.model, img_size=cfg.img_size, num_classes=cfg.num_classes, overrides=ov)


def _arch(meta: ModelMeta) -> dict:
    mc = model_config(meta.model, img_size=meta.img_size, num_classes=meta.num_classes, **meta.overrides)
    return {k: getattr(mc, k) for k in _ARCH_FIELDS}


# ----------------------------------------------------------------------------------------------
# trainer


class Trainer:
    """Builds data, model (FSDP2 when distributed), optimizer, EMAs and checkpoints; `run()` trains."""

    def __init__(self, cfg: TrainConfig, env: D.DistEnv, explicit: set[str] | None = None) -> None:
        self.cfg, self.env = cfg, env
        self.explicit = explicit if explicit is not None else {f.name for f in dataclasses.fields(cfg)}
        self.device = env.device
        self.out = Path(cfg.output_dir)
        self.precision, self.amp_dtype = D.resolve_precision(cfg.precision, self.device)
        self.use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and env.world_size > 1)
        self.signal_received: str | None = None
        self.pbar = None

        self.resume = self._resolve_resume()
        try:
            self._resume_meta, self._resume_model_meta, self._official = self._read_resume_meta()
            self._merge_checkpoint_model_meta()
            self._build_data()
            self._build_model()
        except ConfigError as e:  # say which run is being continued when the user did not name it
            if self.resume is None or cfg.resume:
                raise
            raise ConfigError(f"{e} (continuing {self.resume.path} by --auto-resume; pass --overwrite to start "
                              "over or choose another --output-dir)") from None
        self._build_optimizer()
        self.step, self.epoch, self.sie = 0, 0, 0
        if self.resume is not None:
            self._load_resume()
            if env.is_main:  # rows of steps this run will redo (or a discarded history) leave metrics.jsonl
                n = drop_rows_after(self.out / "metrics.jsonl", self.step)
                if n:
                    self.log(f"moved {n} metrics.jsonl row(s) after step {self.step} to {DROPPED_METRICS_FILE}")
        self.metrics = MetricsLogger(self.out, env.is_main, cfg.tensorboard)
        self.ckpt = CheckpointManager(self.out, env, keep_last=cfg.keep_last, async_save=cfg.async_save)
        self._reset_meters()

    # -- setup -------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if not self.env.is_main:
            return
        if self.pbar is not None:
            self.pbar.write(msg)
        else:
            print(msg, flush=True)

    def _resolve_resume(self) -> ResolvedCheckpoint | None:
        """The checkpoint to start from; never clobbers a previous run unless --overwrite was given explicitly."""
        cfg = self.cfg
        existing = list_checkpoints(self.out)
        metrics = self.out / "metrics.jsonl"
        held = "checkpoints" if existing else ("metrics.jsonl" if metrics.is_file() and metrics.stat().st_size else "")
        newest = f" (newest: {existing[-1][1].name})" if existing else ""
        overwrite = cfg.overwrite and "overwrite" in self.explicit  # a preset never replaces a run
        if overwrite and cfg.auto_resume and "auto_resume" in self.explicit:
            raise ConfigError("--overwrite (start over) and --auto-resume (continue) contradict each other")
        aside = f"--overwrite to start over (the old run is moved to {self.out / 'replaced-TIME'})"
        if cfg.resume:
            r = resolve_checkpoint(cfg.resume)
            if r.kind == "safetensors":
                raise ConfigError(f"--resume {r.path}: a .safetensors file holds weights only; resume needs a "
                                  "training checkpoint (run dir, checkpoint dir or official .pth)")
            inside = r.path.resolve().parent == (self.out / "checkpoints").resolve()
            if inside:
                self._check_newer(r.path, existing)
            if held and not inside:
                if not overwrite:
                    raise ConfigError(f"{self.out} already holds {held} of another run{newest}; choose another "
                                      f"--output-dir or pass {aside}")
                self._move_aside()
            return r
        if held and overwrite:
            self._move_aside()
            return None
        if existing and cfg.auto_resume:
            return ResolvedCheckpoint("dcp", existing[-1][1])
        if held and cfg.auto_resume:  # a run that died before its first checkpoint: nothing to continue
            self._move_aside()
            return None
        if held:
            raise ConfigError(f"{self.out} already holds {held} of a run{newest}; pass --auto-resume to continue it, "
                              f"{aside}, or another --output-dir")
        return None

    def _check_newer(self, path: Path, existing: list[tuple[int, Path]]) -> None:
        """Resuming a non-latest checkpoint in place: refuse, or with --discard-newer move the newer ones aside.

        Otherwise a later --auto-resume would pick the abandoned history's newest checkpoint.
        """
        current = next((s for s, d in existing if d.resolve() == path.resolve()), None)
        newer = [d for s, d in existing if current is not None and s > current]
        if not newer:
            return
        if not self.cfg.discard_newer:
            raise ConfigError(f"--resume {path.name} is older than {newer[-1].name} in {path.parent}; a later "
                              "--auto-resume would continue the newer one. Pass --output-dir NEWDIR to branch, or "
                              "--discard-newer to move the newer checkpoints to OUTPUT/discarded-TIME/")
        if self.env.is_main:
            dest = self.out / f"discarded-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}" / "checkpoints"
            dest.mkdir(parents=True, exist_ok=True)
            for d in newer:
                os.replace(d, dest / d.name)
            self.log(f"moved {len(newer)} newer checkpoint(s) ({newer[0].name}..{newer[-1].name}) to {dest}")
        D.barrier(self.env)

    def _move_aside(self) -> None:
        """Move the previous run's files into OUTPUT/replaced-<UTC time>/: replacing a run never deletes it."""
        if self.env.is_main:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            dest, n = self.out / f"replaced-{stamp}", 1
            while dest.exists():
                dest, n = self.out / f"replaced-{stamp}-{n}", n + 1
            dest.mkdir()
            moved = []
            for name in RUN_ARTIFACTS:
                if (self.out / name).exists():
                    os.replace(self.out / name, dest / name)
                    moved.append(name)
            self.log(f"moved the previous run ({', '.join(moved)}) to {dest}; delete it when no longer needed")
        D.barrier(self.env)

    def _read_resume_meta(self) -> tuple[dict | None, ModelMeta | None, dict | None]:
        if self.resume is None:
            return None, None, None
        if self.resume.kind == "dcp":
            run = read_meta(self.resume.path)
            return run, dcp_model_meta(run, self.resume.path), None
        ck = load_official_checkpoint(self.resume.path)
        for k in ("model", "epoch"):
            if k not in ck:
                raise CheckpointError(f"{self.resume.path} has no '{k}' entry: not a training checkpoint")
        return None, meta_from_official_args(ck.get("args"), self.resume.path), ck

    def _merge_checkpoint_model_meta(self) -> None:
        """Model fields come from the checkpoint unless given explicitly, and must then agree with it."""
        mm = self._resume_model_meta
        if mm is None:
            return
        cfg = self.cfg
        names = {"model": "--model", "img_size": "--img-size", "num_classes": "--num-classes"}
        updates = {}
        for field, flag in names.items():
            saved = getattr(mm, field)
            if saved is None:
                continue
            ours = getattr(cfg, field)
            if field in self.explicit and ours not in (saved, 0):
                raise ConfigError(f"{flag} {ours} does not match the checkpoint {self.resume.path} "
                                  f"(trained with {field}={saved})")
            updates[field] = saved
        ov = dict(mm.overrides)
        if "extra_model_args" in self.explicit:
            for k, v in cfg.extra_model_args.items():
                if k in ov and ov[k] != v and k not in ("attn_drop", "proj_drop"):
                    raise ConfigError(f"--model-arg {k}={v} does not match the checkpoint (trained with {k}={ov[k]})")
            ov.update(cfg.extra_model_args)
        for k, field in (("attn_drop", "attn_dropout"), ("proj_drop", "proj_dropout")):
            if field not in self.explicit and k in ov:
                updates[field] = ov[k]
            ov.pop(k, None)
        updates["extra_model_args"] = ov
        if "seed" not in self.explicit and self._resume_meta is not None and "seed" in self._resume_meta:
            updates["seed"] = int(self._resume_meta["seed"])
        self.cfg = dataclasses.replace(cfg, **updates)

    def _build_data(self) -> None:
        cfg, env = self.cfg, self.env
        from jit_fast.data import build_loader

        def make():
            if cfg.demo_data:
                from jit_fast.data import prepare_demo

                root = prepare_demo(size=cfg.img_size)
            else:
                root = resolve_data_root(cfg.data_path)
            return build_loader(
                root, img_size=cfg.img_size, batch_size=cfg.batch_size,
                backend=None if cfg.data_backend == "auto" else cfg.data_backend,
                rank=env.rank, world_size=env.world_size, seed=cfg.seed, epoch=0, shuffle=True, flip=cfg.flip,
                output="float", device=self.device, num_workers=cfg.num_workers, dali_filter=cfg.dali_filter,
            )

        loader = None
        err: Exception | None = None
        for turn in (True, False):  # rank 0 first (it may write the demo set or the index cache)
            if env.is_main == turn:
                try:
                    loader = make()
                except (OSError, ValueError, RuntimeError) as e:
                    err = e
            D.barrier(env)
        if D.any_rank(env, err is not None):
            raise ConfigError(f"data: {err}" if err is not None else "data: failed on another rank")
        self.loader = loader
        n_data = loader.num_classes
        if cfg.num_classes == 0:
            self.cfg = cfg = dataclasses.replace(cfg, num_classes=n_data)
        elif n_data > cfg.num_classes:
            raise ConfigError(f"the data has {n_data} classes but the model has num_classes={cfg.num_classes}")
        self.global_batch = cfg.batch_size * env.world_size * cfg.grad_accum
        self.base_lr = base_learning_rate(cfg, self.global_batch)
        if not LEARNING_RATE.contains(self.base_lr):
            raise ConfigError(f"--blr {cfg.blr:g} x global batch {self.global_batch} / 256 = {self.base_lr:g} is not "
                              f"{LEARNING_RATE.describe()}; lower --blr or pass --lr")
        self.spe = len(loader) // cfg.grad_accum
        if self.spe == 0:
            raise ConfigError(f"{len(loader)} batches per epoch cannot fill one step of {cfg.grad_accum} micro-steps")
        total = cfg.epochs * self.spe
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        # global-batch position of every local sample, per micro-step (loader deals round-robin)
        b, w, r = cfg.batch_size, env.world_size, env.rank
        self.positions = [[m * w * b + i * w + r for i in range(b)] for m in range(cfg.grad_accum)]
        self.positions_dev = [torch.tensor(p, device=self.device) for p in self.positions]

    def _build_model(self) -> None:
        cfg = self.cfg
        meta = model_meta(cfg)
        try:
            mc = model_config(cfg.model, img_size=cfg.img_size, num_classes=cfg.num_classes, kernels=cfg.kernels,
                              **meta.overrides)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        saved = self._resume_model_meta
        if saved is not None and saved.model:
            saved = saved.replace(img_size=cfg.img_size if saved.img_size is None else saved.img_size,
                                  num_classes=cfg.num_classes if saved.num_classes is None else saved.num_classes)
            if _arch(saved) != _arch(meta):
                diff = [k for k in _ARCH_FIELDS if _arch(saved)[k] != _arch(meta)[k]]
                raise ConfigError(f"the model does not match the checkpoint {self.resume.path} (differs in {diff})")
        self.model_meta = meta
        self.model_cfg = mc
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank and at every world size
        net = JiT(mc)
        self.has_dropout = mc.attn_drop > 0 or mc.proj_drop > 0
        self.n_params = sum(p.numel() for p in net.parameters())
        self.net = D.prepare_model(
            net, self.env, fsdp=self.use_fsdp, param_dtype=self.amp_dtype if self.use_fsdp else None,
            compile_blocks=cfg.compile, activation_checkpointing=cfg.activation_checkpointing,
            reshard_after_forward=cfg.reshard_after_forward,
        )
        self.net.train()
        self.names = [n for n, _ in self.net.named_parameters()]
        self.params = [p for _, p in self.net.named_parameters()]
        self.trainable = [p for p in self.params if p.requires_grad]
        self.flops_per_image = train_flops_per_image(mc)

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        kw: dict[str, Any] = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(param_groups(self.net, cfg.weight_decay), lr=self.base_lr,
                                     betas=(cfg.beta1, cfg.beta2), **kw)
        locals_ = self.local_params()
        self.ema1 = EMA(locals_, cfg.ema_decay1)
        self.ema2 = EMA(locals_, cfg.ema_decay2)

    def local_params(self) -> list[torch.Tensor]:
        """This rank's shards of all parameters (storage shared with the model)."""
        return [D.local(p).detach() for p in self.params]

    def _ema_state(self, ema: EMA) -> dict[str, torch.Tensor]:
        """EMA shards keyed by parameter name, wrapped as DTensors like the parameters (shared storage)."""
        out = {}
        for name, p, s in zip(self.names, self.params, ema.shadow, strict=True):
            if D.is_dtensor(p):
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = s
        return out

    def state_dict(self) -> dict:
        """Everything DCP saves: sharded model, optimizer and both EMAs."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.net, self.opt)
        return {"model": msd, "optim": osd, "ema1": self._ema_state(self.ema1), "ema2": self._ema_state(self.ema2)}

    def _reapply_hparams(self) -> None:
        for g, wd in zip(self.opt.param_groups, (0.0, self.cfg.weight_decay), strict=True):
            g["weight_decay"] = wd
            g["betas"] = (self.cfg.beta1, self.cfg.beta2)

    def _load_resume(self) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        r, meta = self.resume, self._resume_meta
        if r.kind == "official":
            self._load_official()
        else:
            state = self.state_dict()
            # parameters that never received a gradient (e.g. unused in-context tokens) have no saved
            # optimizer state; they must not get one on resume either
            saved = dcp_keys(r.path, verify=not self.cfg.skip_checksum)
            state["optim"]["state"] = {
                fqn: st for fqn, st in state["optim"]["state"].items()
                if all(f"optim.state.{fqn}.{k}" in saved for k in st)
            }
            dcp_load(state, r.path, self.env.distributed, verify=not self.cfg.skip_checksum)
            set_model_state_dict(self.net, state["model"], options=StateDictOptions(strict=True))
            set_optimizer_state_dict(self.net, self.opt, state["optim"], options=StateDictOptions(strict=False))
            for ema, key in ((self.ema1, "ema1"), (self.ema2, "ema2")):
                torch._foreach_copy_(ema.shadow, [D.local(state[key][n]) for n in self.names])
            self._reapply_hparams()
            self.step = int(meta["step"])
            self.epoch, self.sie = int(meta["epoch"]), int(meta["step_in_epoch"])
            if self.sie and int(meta["global_batch"]) != self.global_batch:
                raise ConfigError(
                    f"the checkpoint stopped mid-epoch with global batch {meta['global_batch']}; resume with the "
                    f"same global batch (batch_size x world_size x grad_accum, now {self.global_batch})"
                )
            if self.sie >= self.spe:
                self.epoch, self.sie = self.epoch + 1, 0
            rs = read_rank_state(r.path, self.env.rank) if int(meta["world_size"]) == self.env.world_size else None
            if rs is not None:
                torch.set_rng_state(rs["torch_cpu_rng"])
                if self.device.type == "cuda" and rs.get("torch_cuda_rng") is not None:
                    torch.cuda.set_rng_state(rs["torch_cuda_rng"], self.device)
                random.setstate(rs["python_rng"])
        if D.any_rank(self.env, bool(self._weights_exploded().item())):
            raise CheckpointError(f"{r.path} holds exploded weights (|x| > {MAX_WEIGHT_ABS:g} or not finite); "
                                  "resume from an earlier checkpoint")
        self.log(f"resumed from {r.path} at step {self.step} (epoch {self.epoch}, {self.sie}/{self.spe})")

    def _load_official(self) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        ck, path = self._official, self.resume.path
        want = official_state_dict_shapes(self.model_cfg)
        got = {k: tuple(v.shape) for k, v in ck["model"].items()}
        if got != want:
            bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
            raise CheckpointError(f"{path} does not fit the model (first difference: {bad[0]})")
        full = StateDictOptions(full_state_dict=True, strict=True)
        set_model_state_dict(self.net, ck["model"], options=full)
        for ema, key in ((self.ema1, "model_ema1"), (self.ema2, "model_ema2")):
            src = ck.get(key, ck["model"])
            with torch.no_grad():
                for s, n, p in zip(ema.shadow, self.names, self.params, strict=True):
                    s.copy_(D.shard_like(src[n].float(), p))
        named = [(n, p.shape, p.requires_grad) for n, p in zip(self.names, self.params, strict=True)]
        osd, why = optimizer_from_official(ck.get("optimizer", {}), named) if "optimizer" in ck else (None, "absent")
        if osd is not None:
            set_optimizer_state_dict(self.net, self.opt, osd, options=StateDictOptions(full_state_dict=True))
            self._reapply_hparams()
        else:
            self.log(f"warning: optimizer state of {path} not loaded ({why}); AdamW moments start from zero")
        self.epoch, self.sie = int(ck["epoch"]) + 1, 0
        self.step = self.epoch * self.spe
        self._official = None

    # -- the step ----------------------------------------------------------------------------

    def _reset_meters(self) -> None:
        self.loss_acc = torch.zeros((), device=self.device)
        self.gnorm_acc = torch.zeros((), device=self.device)
        self.n_acc = 0
        self.meter_t0 = time.perf_counter()
        self.meter_step0 = self.step

    def _draws(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t and label-drop mask for the whole global batch of `step` (same on every rank)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(self.cfg.seed, step, _TAG_T_DROP))
        t = sample_t(self.global_batch, self.cfg.P_mean, self.cfg.P_std, device=self.device, generator=g)
        drop = torch.rand(self.global_batch, device=self.device, generator=g) < self.cfg.label_drop_prob
        return t, drop

    def _noise(self, step: int, micro: int) -> torch.Tensor:
        """Standard-normal noise of this rank's samples, each seeded by (seed, step, global position)."""
        s = self.cfg.img_size
        out = torch.empty((self.cfg.batch_size, self.model_cfg.in_channels, s, s), device=self.device)
        g = self._noise_gen
        for i, pos in enumerate(self.positions[micro]):
            g.manual_seed(mix_seed(self.cfg.seed, step, pos, _TAG_NOISE))
            out[i].normal_(generator=g)
        return out

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batches) -> None:
        cfg, step = self.cfg, self.step
        lr = lr_at(cfg, self.base_lr, self.epoch + self.sie / self.spe)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.lr = lr
        t_all, drop_all = self._draws(step)
        n_micro = cfg.grad_accum
        for m in range(n_micro):
            x, y = next(batches)
            idx = self.positions_dev[m]
            if self.has_dropout:
                torch.manual_seed(mix_seed(cfg.seed, step, self.env.rank, m, _TAG_DROPOUT))
            D.set_gradient_sync(self.net, m == n_micro - 1)
            with self._autocast():
                loss = flow_matching_loss(
                    self.net, x, y, t=t_all[idx], noise=self._noise(step, m), drop=drop_all[idx],
                    P_mean=cfg.P_mean, P_std=cfg.P_std, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps,
                    label_drop_prob=cfg.label_drop_prob, num_classes=cfg.num_classes,
                )
            (loss / n_micro).backward()
            self.loss_acc += loss.detach().float() / n_micro
        gnorm = self._grad_norm_and_clip()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        locals_ = self.local_params()
        self.ema1.update(locals_)
        self.ema2.update(locals_)
        self.gnorm_acc += gnorm
        self.n_acc += 1

    def _grad_norm_and_clip(self) -> torch.Tensor:
        """Global L2 grad norm on device (all-reduced over shards); clip in place if --grad-clip."""
        grads = [D.local(p.grad) for p in self.trainable if p.grad is not None]
        norms = torch._foreach_norm(grads)
        sq = torch.stack([n.float() for n in norms]).square().sum()
        if self.use_fsdp and self.env.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sq)
        norm = sq.sqrt()
        if self.cfg.grad_clip > 0:
            coef = (self.cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
        return norm

    def _weights_exploded(self) -> torch.Tensor:
        """1.0 (on the device, no sync) if a local parameter or EMA shard is non-finite or beyond MAX_WEIGHT_ABS."""
        tensors = [t for t in (*self.local_params(), *self.ema1.shadow, *self.ema2.shadow) if t.numel()]
        peak = torch.stack(torch._foreach_norm(tensors, math.inf)).max().float()
        return (~(peak <= MAX_WEIGHT_ABS)).float()

    def flush_metrics(self) -> None:
        """Host sync: pull the accumulated loss / grad norm, stop on NaN/Inf or exploded weights, log.

        Runs every log_freq steps and before every save, so a saved checkpoint always passed it.
        """
        if self.n_acc == 0:
            return
        vals = torch.stack([self.loss_acc / self.n_acc, self.gnorm_acc / self.n_acc, self._weights_exploded()])
        vals = D.all_reduce_mean(self.env, vals)
        loss, gnorm, exploded = vals.tolist()
        now = time.perf_counter()
        steps = self.step - self.meter_step0
        if not (math.isfinite(loss) and math.isfinite(gnorm)) or exploded > 0:
            good = self.ckpt.last_saved or (self.resume.path if self.resume else None)
            what = f"loss {loss} / grad norm {gnorm} is not finite" if not (math.isfinite(loss) and math.isfinite(
                gnorm)) else f"weights exploded (|x| > {MAX_WEIGHT_ABS:g} in a parameter or EMA; loss {loss:.4g})"
            raise TrainingDiverged(
                f"{what} (steps {self.meter_step0 + 1}-{self.step}); "
                f"stopping without saving. Last good checkpoint: {good or 'none'}"
            )
        img_s = steps * self.global_batch / max(now - self.meter_t0, 1e-9)
        peak = peak_flops(self.device, self.precision, self.cfg.peak_tflops)
        mfu = img_s * self.flops_per_image / (peak * self.env.world_size) if peak else None
        scalars = {"loss": loss, "lr": self.lr, "grad_norm": gnorm, "img_per_s": img_s,
                   "epoch": self.epoch + self.sie / self.spe, "peak_mem_gb": peak_memory_gb(self.device)}
        if mfu is not None:
            scalars["mfu"] = mfu
        self.metrics.log(self.step, scalars)
        self.last_loss = loss
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}", refresh=False)
        self._reset_meters()

    # -- checkpoints -------------------------------------------------------------------------

    def save(self) -> None:
        """Checkpoint the current step (collective); refuses to save diverged weights."""
        self.flush_metrics()
        cfg = self.cfg
        rank_state = {
            "torch_cpu_rng": torch.get_rng_state(),
            "torch_cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "python_rng": random.getstate(),
            "loader": self.loader.state_dict(),
        }
        meta = {
            "step": self.step, "epoch": self.epoch, "step_in_epoch": self.sie, "steps_per_epoch": self.spe,
            "world_size": self.env.world_size, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
            "global_batch": self.global_batch, "seed": cfg.seed, "lr": getattr(self, "lr", 0.0),
            "loader": self.loader.state_dict(), "model_meta": self.model_meta.to_dict(), "precision": self.precision,
            "fsdp": self.use_fsdp, "torch": torch.__version__, "config": dataclasses.asdict(cfg),
        }
        self.ckpt.save(self.step, self.state_dict(), meta, rank_state)
        self.last_save_step = self.step
        if not cfg.async_save:
            self.log(f"saved checkpoint {self.ckpt.last_saved}")

    # -- loop --------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self.signal_received = signal.Signals(signum).name

    def _fault_injection(self) -> None:
        spec = os.environ.get(_FAULT_STEP_ENV)
        if not spec:
            return
        step, _, rank = spec.partition(":")
        if self.step == int(step) and (not rank or int(rank) == self.env.rank):
            os.kill(os.getpid(), signal.SIGTERM)

    def _epoch_batches(self):
        if self.sie:
            self.loader.load_state_dict({"epoch": self.epoch, "batch": self.sie * self.cfg.grad_accum,
                                         "seed": self.cfg.seed, "batch_size": self.cfg.batch_size,
                                         "world_size": self.env.world_size})
        else:
            self.loader.set_epoch(self.epoch)
        return iter(self.loader)

    def run(self, step_callback: Callable[[Trainer], None] | None = None) -> int:
        """Train to `total_steps`; returns 0 (also after a preemption checkpoint)."""
        cfg, env = self.cfg, self.env
        self._noise_gen = torch.Generator(device=self.device)
        old_handlers = {}
        if threading_is_main():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        # a checkpoint we resumed from counts as this run's save only if it lives in this run's directory
        own = self.resume is not None and self.resume.kind == "dcp" and \
            self.resume.path.resolve().parent == (self.out / "checkpoints").resolve()
        self.last_save_step = self.step if own else -1
        self.last_loss = float("nan")
        self._announce()
        if self.resume is not None and self.step >= self.total_steps:
            self.log(f"{self.out} is already trained to step {self.step}: nothing to train"
                     f"{', re-running the demo evaluation' if cfg.demo_eval else ''} (a larger --max-steps "
                     "continues it, --overwrite starts over)")
        from tqdm import tqdm

        self.pbar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                         disable=not env.is_main, dynamic_ncols=True, smoothing=0.05)
        t_start = time.perf_counter()
        preempted = False
        try:
            self._reset_meters()
            while self.step < self.total_steps and not preempted:
                batches = self._epoch_batches()
                while self.sie < self.spe and self.step < self.total_steps:
                    self.train_step(batches)
                    self.step += 1
                    self.sie += 1
                    epoch_done = self.sie == self.spe
                    self.pbar.update(1)
                    if step_callback is not None:
                        step_callback(self)
                    if self.step % cfg.log_freq == 0:
                        self.flush_metrics()
                    self._fault_injection()
                    if self.step % cfg.signal_check_freq == 0 and D.any_rank(env, self.signal_received is not None):
                        preempted = True
                    self.ckpt.poll()
                    due = (cfg.save_freq_steps and self.step % cfg.save_freq_steps == 0) or (
                        epoch_done and cfg.save_last_freq
                        and (self.epoch % cfg.save_last_freq == 0 or self.epoch + 1 == cfg.epochs)
                    )
                    if epoch_done:
                        self.epoch, self.sie = self.epoch + 1, 0
                    if preempted or due:
                        self.save()
                    if preempted or epoch_done:
                        break
            if self.last_save_step != self.step:
                self.save()
            self.flush_metrics()
            self.ckpt.wait()
        finally:
            self.pbar.close()
            self.pbar = None
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
        dt = time.perf_counter() - t_start
        where = self.ckpt.last_saved or (self.resume.path if own else None)
        if preempted:
            self.log(f"preempted ({self.signal_received or 'signal on another rank'}) at step {self.step}: "
                     f"checkpoint {where}; continue with --resume {self.out}")
        else:
            loss = f", loss {self.last_loss:.4f}" if math.isfinite(self.last_loss) else ""
            self.log(f"done: step {self.step} in {dt:.0f}s{loss}, checkpoint {where}")
            if cfg.demo_eval:
                return self.demo_eval()
        return 0

    def _announce(self) -> None:
        cfg, env = self.cfg, self.env
        mode = f"FSDP2 x{env.world_size}" if self.use_fsdp else ("single process" if env.world_size == 1 else "")
        self.log(
            f"{cfg.model} ({self.n_params / 1e6:.2f}M params) {cfg.img_size}px, {cfg.num_classes} classes | "
            f"{mode}, {self.precision}, {self.device} | global batch {self.global_batch} = {cfg.batch_size} x "
            f"{env.world_size} ranks x {cfg.grad_accum} | lr {self.base_lr:.3g} | steps {self.step}->"
            f"{self.total_steps} ({self.spe}/epoch) | {self.out}"
        )

    # -- evaluation --------------------------------------------------------------------------

    def gathered_ema_model(self, which: str = "ema1") -> JiT | None:
        """A plain eval-mode copy of the net holding EMA weights (collective; returned on rank 0)."""
        ema = self.ema1 if which == "ema1" else self.ema2
        state = self._ema_state(ema)
        full = {n: D.full_tensor(state[n]).detach().cpu() for n in self.names}
        if not self.env.is_main:
            return None
        net = JiT(dataclasses.replace(self.model_cfg, attn_drop=0.0, proj_drop=0.0))
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(full[n])
        return net.to(self.device).eval()

    def demo_eval(self) -> int:
        """Sample from EMA1 and score the demo (grid, accuracy, diversity); exit code 1 if a target is missed
        after the full schedule (a run cut short by --max-steps is scored and reported, but exits 0)."""
        net = self.gathered_ema_model("ema1")
        code = 0
        if self.env.is_main:
            cfg = self.cfg
            kwargs = dict(cfg=cfg.cfg, interval=(cfg.interval_min, cfg.interval_max), steps=cfg.eval_steps,
                          solver=cfg.solver, noise_scale=cfg.noise_scale, num_classes=cfg.num_classes,
                          seed=cfg.seed, img_size=cfg.img_size, t_eps=cfg.t_eps)
            if cfg.eval_num_images:
                kwargs["num_images"] = cfg.eval_num_images
            result = evaluate_demo(net, self.out / "demo_eval", **kwargs)
            self.log(f"demo evaluation: {demo_summary(result)}")
            full = self.total_steps == cfg.epochs * self.spe
            if not (result["passed"] or full):
                self.log(f"the quality gate applies to the full schedule ({cfg.epochs * self.spe} steps); this run "
                         f"stopped at {self.total_steps}: exit 0")
            code = 0 if result["passed"] or not full else 1
        return D.broadcast_object(self.env, code)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------------------------
# entry points


def run_training(cfg: TrainConfig, explicit: set[str] | None = None,
                 step_callback: Callable[[Trainer], None] | None = None) -> int:
    """Initialize the process group (torchrun or single process), train, tear down."""
    env = D.init_distributed(cfg.device, force_group=cfg.fsdp == "on")
    try:
        trainer = Trainer(cfg, env, explicit)
        return trainer.run(step_callback)
    finally:
        D.shutdown(env)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one-line errors (exit 2) for bad flags, data or checkpoints; exit 3 on NaN/Inf."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        cfg, explicit = parse_config(argv)
        return run_training(cfg, explicit)
    except (UserError, OSError) as e:  # user errors: bad flags, data, checkpoints, files, permissions
        print(f"{prefix}error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
