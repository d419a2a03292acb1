"""train.py's command line: the option table (official flag names, underscores accepted), parser, validation.

`parse_config(argv)` gives the TrainConfig of defaults <- run preset <- explicit flags and the set of
fields given explicitly (resume uses it to tell a user's choice from a default).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from jit_fast.configs import MODEL_PRESETS, RUN_PRESETS, TRAIN_RANGES, TrainConfig
from jit_fast.errors import UsageError as ConfigError  # the name train's callers and tests catch
from jit_fast.profiling import parse_step_range


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
    (("--precision",), "precision", str, "auto | bf16 | fp16 | fp32 (auto: bf16 on sm_80+, fp16 on "
                                                                     "older GPUs, fp32 on CPU)"),
    (("--device",), "device", str, "auto | cpu | cuda"),
    (("--seed",), "seed", int, "seed of init, data order and noise"),
    (("--fsdp",), "fsdp", str, "auto | on | off (auto: FSDP2 when world_size > 1)"),
    (("--log-freq",), "log_freq", int, "steps between host syncs for loss/grad-norm logging"),
    (("--save-freq-steps", "--save-freq"), "save_freq_steps", int, "checkpoint every N steps (0: off)"),
    (("--save-last-freq",), "save_last_freq", int, "checkpoint every N epochs (official meaning)"),
    (("--keep-last",), "keep_last", int, "checkpoints kept (0: all)"),
    (("--signal-check-freq",), "signal_check_freq", int, "steps between preemption-flag agreements"),
    (("--max-memory-gb",), "max_memory_gb", float, "GPU memory per rank, GiB: print the modeled memory plan and stop "
                                                   "before the first step if it does not fit (0: a GPU only warns)"),
    (("--peak-tflops",), "peak_tflops", float, "per-device peak TFLOP/s for MFU (default: from GPU name)"),
    (("--cfg",), "cfg", float, "CFG scale of the evaluations (online, --evaluate-gen, demo)"),
    (("--interval-min",), "interval_min", float, "CFG interval start (evaluations)"),
    (("--interval-max",), "interval_max", float, "CFG interval end (evaluations)"),
    (("--num-sampling-steps",), "eval_steps", int, "sampling steps (evaluations)"),
    (("--sampling-method",), "solver", str, "heun | euler (evaluations)"),
    (("--num-images",), "eval_num_images", int, "images per evaluation (0: 50000 for FID, the demo's default)"),
    (("--eval-freq",), "eval_freq", int, "epochs between online evaluations (also after the last epoch)"),
    (("--gen-bsz",), "gen_bsz", int, "images per rank per sampling batch (evaluations)"),
    (("--fid-ref",), "fid_ref", str, "FID reference: statistics .npz (mu, sigma) or image folder"),
    (("--inception-weights",), "inception_weights", str, "torch-fidelity Inception weights .pth (offline)"),
    (("--wandb",), "wandb", str, "also log scalars and grids to this Weights & Biases project"),
    (("--text-cache",), "text_cache", str, "text models: caption embeddings from python -m jit_fast.data.encode_text"),
    (("--text-encoder", "--llm-model-name"), "text_encoder", str, "text models: encoder (hub id or dir); with "
                                                                  "--text-cache it must be the cache's, without "
                                                                  "one it runs frozen per step"),
    (("--text-encoder-revision",), "text_encoder_revision", str, "hub revision of --text-encoder"),
    (("--max-text-len",), "max_text_len", int, "tokens per caption (0: the cache's, else 77)"),
    (("--text-tokens",), "text_tokens", str, "text models: pooled | sequence (= --model-arg text_tokens=...)"),
    (("--null-text",), "null_text", str, "text models: learned | empty (= --model-arg null_text=...)"),
    (("--profile-steps",), "profile_steps", str, "A:B: torch.profiler trace (and CUDA memory snapshot) of "
                                                 "steps A..B-1 in OUTPUT/profile/"),
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
    (("--online-eval",), "online_eval", "FID/IS of EMA1 every --eval-freq epochs and at the end (in memory)"),
    (("--use-text-conditioning",), "use_text_conditioning", "train the -Text twin of --model (the fork's flag)"),
    (("--freeze-llm",), "freeze_llm", "keep the text encoder frozen (default; --no-freeze-llm is not supported "
                                      "yet)"),
    (("--evaluate-gen",), "evaluate_gen", "with --resume: only generate and evaluate (as sample.py --ckpt)"),
]


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
    # accepted for compatibility with the official launcher, ignored (torchrun sets the environment)
    for flag in ("--local-rank", "--world-size", "--dist-url", "--start-epoch"):
        p.add_argument(*_spellings((flag,)), dest="ignored_" + flag[2:].replace("-", "_"), help=argparse.SUPPRESS)
    for flag in ("--pin-mem", "--no-pin-mem", "--dist-on-itp"):
        p.add_argument(*_spellings((flag,)), dest="ignored_" + flag[2:].replace("-", "_"), action="store_true",
                       help=argparse.SUPPRESS)
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, set[str]]:
    """TrainConfig from defaults <- run preset <- explicit flags; returns it and the explicit field names."""
    ns = vars(build_parser().parse_args(argv))
    for k in [k for k in ns if k.startswith("ignored_")]:
        ns.pop(k)
    if "extra_model_args" in ns:
        ns["extra_model_args"] = dict(ns["extra_model_args"])
    for k in ("text_tokens", "null_text"):  # shorthands of --model-arg KEY=VALUE
        if k in ns:
            ns["extra_model_args"] = {**ns.get("extra_model_args", {}), k: ns.pop(k)}
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
    if cfg.use_text_conditioning and f"{cfg.model}-Text" in MODEL_PRESETS:
        cfg = dataclasses.replace(cfg, model=f"{cfg.model}-Text")
        ns["model"] = cfg.model
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
    choices = dict(lr_schedule=("constant", "cosine"), precision=("auto", "bf16", "fp16", "fp32"),
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
    if not cfg.freeze_llm:
        raise ConfigError("--no-freeze-llm (training the text encoder) is not supported yet: train.py keeps the "
                          "encoder frozen and reads its embeddings from --text-cache (or runs it frozen per step)")
    if cfg.interval_min >= cfg.interval_max:
        raise ConfigError(f"--interval-min {cfg.interval_min} must be < --interval-max {cfg.interval_max}")
    if cfg.evaluate_gen:
        if not cfg.resume:
            raise ConfigError("--evaluate-gen evaluates a trained run: pass --resume RUN_DIR_OR_CHECKPOINT")
        return  # only sampling follows: no training data needed
    if not cfg.data_path and not cfg.demo_data:
        raise ConfigError("no training data: pass --data-path DIR (an ImageFolder) or --preset demo")
    if cfg.profile_steps:
        try:
            parse_step_range(cfg.profile_steps)
        except argparse.ArgumentTypeError as e:
            raise ConfigError(f"--profile-steps: {e}") from None
    for flag, path in (("--fid-ref", cfg.fid_ref), ("--inception-weights", cfg.inception_weights)):
        if path and cfg.online_eval and not Path(path).expanduser().exists():
            raise ConfigError(f"{flag} {path} does not exist")
