"""Is a checkpoint's weight tensor fit to load: floating point (every JiT weight is) and finite.

One rule for every checkpoint kind, applied by each reader where its tensors come off the disk: the official
`.pth` loader (`official.load_official_checkpoint`), the `.safetensors` loader (`weights.load_safetensors`) and
the DCP reader every DCP load goes through (`jit_fast.checkpoint.safe_dcp.SafeFileSystemReader`). Sampling, export and
resume therefore all refuse NaN weights (which sample black images) and integer tensors (which loading would
silently cast) with one line naming the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from jit_fast.checkpoint.meta import CheckpointError

DCP_WEIGHT_ENTRIES = ("model", "ema1", "ema2")  # top-level entries of a DCP checkpoint that hold network weights


class WeightsError(CheckpointError):
    """A weight tensor of a checkpoint is not floating point or holds NaN/Inf."""


def dcp_weight_name(fqn: str) -> tuple[str, str] | None:
    """(entry, tensor name) of a DCP key such as "ema1.blocks.0.attn.qkv.weight"; None for non-weight entries."""
    entry, _, name = fqn.partition(".")
    return (entry, name) if entry in DCP_WEIGHT_ENTRIES and name else None


def _in(entry: str | None) -> str:
    return f" in {entry}" if entry else ""


def dtype_problem(name: str, dtype: torch.dtype, entry: str | None) -> str | None:
    """Why a weight stored as `dtype` cannot be loaded, or None when it is floating point."""
    if dtype.is_floating_point:
        return None
    return f"tensor '{name}'{_in(entry)} is {dtype}; JiT weights are floating point"


def count_nonfinite(t: torch.Tensor) -> int:
    """Number of NaN/Inf elements of a floating-point tensor (one pass when there are none)."""
    finite = torch.isfinite(t)
    return 0 if bool(finite.all()) else int(finite.numel() - finite.sum())


def nonfinite_problem(name: str, count: int, numel: int, entry: str | None) -> str:
    """The refusal of a weight holding `count` NaN/Inf values out of `numel`."""
    return f"tensor '{name}'{_in(entry)} has {count} non-finite values (NaN or Inf) of {numel}"


def check_weights(tensors: Mapping[str, Any], where: str, entry: str | None) -> None:
    """WeightsError "`where`: tensor 'NAME' in ENTRY ..." for the first non-tensor, non-float or non-finite weight."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{where}: entry '{name}'{_in(entry)} is a {type(t).__name__}, not a tensor")
        why = dtype_problem(name, t.dtype, entry)
        if why is None:
            bad = count_nonfinite(t)
            why = nonfinite_problem(name, bad, t.numel(), entry) if bad else None
        if why is not None:
            raise WeightsError(f"{where}: {why}")
