"""Official checkpoint import/export and safe loading.

An official JiT checkpoint (`checkpoint-last.pth`) is a pickle holding `model`,
`model_ema1`, `model_ema2` (keys prefixed "net."), `optimizer`, `epoch` and the argparse
`args`. It is loaded weights-only with an allow-list for that Namespace.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

OFFICIAL_MODEL_KEYS = ("model", "model_ema1", "model_ema2")
# Non-persistent RoPE tables that some releases stored; they are rebuilt from the config.
_DERIVED_PREFIXES = ("feat_rope.", "feat_rope_incontext.")


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def safe_load(path: str | Path) -> dict:
    """torch.load with weights_only=True plus argparse.Namespace; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: it needs a global outside the allow-list ({e})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict")
    return obj


def strip_net_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the Denoiser's "net." prefix and derived buffers from an official state dict."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("net.")
        if not k.startswith(_DERIVED_PREFIXES):
            out[k] = v
    return out


def add_net_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names for a JiT state dict."""
    return {f"net.{k}": v for k, v in sd.items()}


def load_official_checkpoint(path: str | Path) -> dict:
    """Read an official checkpoint: {"model", "model_ema1", "model_ema2", ...}, keys without "net."."""
    ckpt = safe_load(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path} has no 'model' entry (keys: {sorted(ckpt)[:8]})")
    out = dict(ckpt)
    for key in OFFICIAL_MODEL_KEYS:
        if key in ckpt:
            out[key] = strip_net_prefix(ckpt[key])
    return out


def export_official_checkpoint(
    path: str | Path, model: dict, ema1: dict, ema2: dict, epoch: int, args: argparse.Namespace | None = None
) -> None:
    """Write EMA and model weights in the official `.pth` layout (keys prefixed "net.")."""
    torch.save(
        {
            "model": add_net_prefix(model),
            "model_ema1": add_net_prefix(ema1),
            "model_ema2": add_net_prefix(ema2),
            "epoch": epoch,
            "args": args or argparse.Namespace(),
        },
        path,
    )
