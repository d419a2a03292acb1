"""train.py's command line: the parser generated from TrainConfig's fields (official flag names, underscores
accepted) and the checks of combinations no single field states.

`parse_config(argv)` gives the TrainConfig of defaults <- run preset <- explicit flags and the set of
fields given explicitly (resume uses it to tell a user's choice from a default).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from jit_fast.configs import MODEL_PRESETS, RUN_PRESETS, ModelConfig, TrainConfig
from jit_fast.options import add_options, check_options, choices
from jit_fast.shared.errors import UsageError as ConfigError  # the name train's callers and tests catch
from jit_fast.train.profiling import parse_step_range


def build_parser() -> argparse.ArgumentParser:
    """train.py's parser: one flag per TrainConfig field (from its declaration), plus the text shorthands and the
    official launcher's flags that torchrun makes moot."""
    p = argparse.ArgumentParser(
        prog="train.py", usage="%(prog)s [OPTIONS]  (train.py --help lists them)",
        description="Train JiT (pixel-space flow matching). Single process or torchrun (FSDP2).",
        argument_default=argparse.SUPPRESS,
    )
    add_options(p, TrainConfig)
    short = p.add_argument_group("Shorthands of --model-arg KEY=VALUE (text models)")
    for key, allowed in (("text_tokens", choices(ModelConfig, "text_tokens")),
                         ("null_text", choices(ModelConfig, "null_text"))):
        short.add_argument(*_spellings("--" + key.replace("_", "-")), dest=key, choices=allowed,
                           help=f"= --model-arg {key}=...")
    for flag in ("--local-rank", "--world-size", "--dist-url", "--start-epoch"):
        p.add_argument(*_spellings(flag), dest="ignored_" + flag[2:].replace("-", "_"), help=argparse.SUPPRESS)
    for flag in ("--pin-mem", "--no-pin-mem", "--dist-on-itp"):
        p.add_argument(*_spellings(flag), dest="ignored_" + flag[2:].replace("-", "_"), action="store_true",
                       help=argparse.SUPPRESS)
    return p


def _spellings(flag: str) -> list[str]:
    return [flag, "--" + flag[2:].replace("-", "_")]


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


def validate_config(cfg: TrainConfig) -> None:
    """Raise ConfigError naming the flag for a choice, range or combination that cannot work."""
    check_options(cfg, ConfigError)
    if cfg.model not in MODEL_PRESETS:
        raise ConfigError(f"unknown model {cfg.model!r}; known models: {', '.join(MODEL_PRESETS)}")
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
