"""Pieces shared by the fused ops: input checks, config selection and the deterministic row-sum kernel.

Every backward reduction over tokens is two-stage: the main kernel writes one fp32 partial row per
program, then `sum_rows` adds those rows in a fixed order. No atomics, so gradients are bitwise
reproducible for a given shape and config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class KernelSpec:
    """One ahead-of-time compile job: a kernel, its argument types and constexprs, and one launch config."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    config: triton.Config
    int_args: dict[str, int] = field(default_factory=dict)
    label: str = ""


def check_dtype(name: str, t: torch.Tensor) -> None:
    """Raise ValueError unless `t` is a floating dtype the kernels implement."""
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has unsupported dtype {t.dtype}; supported: {SUPPORTED_DTYPES}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    """Raise ValueError naming `name` when `t.shape != shape`."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    """Launch helpers index tensors as dense row-major buffers; anything else is rejected."""
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, stride {t.stride()})")


def check_rows(name: str, t: torch.Tensor) -> None:
    """Per-sample (B, D) vectors may be strided views (chunks of the adaLN output) but rows must be dense."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dim, got stride {t.stride()}")


def rowwise(t: torch.Tensor) -> torch.Tensor:
    """Return `t` if its rows are dense, else a contiguous copy (the documented fallback)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_same_device(**tensors: torch.Tensor) -> None:
    """All operands of one launch must live on one device."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"operands are on different devices: {devices}")


def select_config(table: dict[int, list[triton.Config]], block: int, what: str) -> triton.Config:
    """Pick the default (first) config of the smallest size class that holds a `block`-wide tile."""
    for size in sorted(table):
        if block <= size:
            return table[size][0]
    raise ValueError(f"{what}: tile width {block} exceeds the largest supported size {max(table)}")


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `t`'s GPU current while launching (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_options(config: triton.Config) -> dict[str, int]:
    """Launch keyword arguments of a config: its constexprs plus num_warps / num_stages."""
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


@triton.jit
def sum_rows_kernel(
    IN,
    OUT,
    R,
    C,
    stride_g,
    stride_r,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """OUT[g, c] = sum_r IN[g * stride_g + r * stride_r + c], summed in a fixed order."""
    pid_c = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (rows < R)[:, None] & cmask[None, :]
        tile = tl.load(IN + g * stride_g + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + g * C + cols, acc, mask=cmask)


SUM_ROWS_CONFIG = triton.Config({"BLOCK_R": 8, "BLOCK_C": 512}, num_warps=4, num_stages=1)


def sum_rows(partials: torch.Tensor, groups: int, rows: int, cols: int, stride_g: int, stride_r: int) -> torch.Tensor:
    """Second reduction stage: (groups, cols) fp32 sums over `rows` partial rows of an fp32 buffer."""
    out = torch.empty(groups, cols, device=partials.device, dtype=torch.float32)
    block_c = SUM_ROWS_CONFIG.kwargs["BLOCK_C"]
    with device_guard(partials):
        sum_rows_kernel[(triton.cdiv(cols, block_c), groups)](
            partials, out, rows, cols, stride_g, stride_r, **launch_options(SUM_ROWS_CONFIG)
        )
    return out


def sum_rows_specs() -> Iterator[KernelSpec]:
    """Compile jobs for the row-sum kernel (fp32 partial buffers only)."""
    yield KernelSpec(
        name="sum_rows",
        fn=sum_rows_kernel,
        signature={"IN": "*fp32", "OUT": "*fp32", "R": "i32", "C": "i32", "stride_g": "i32", "stride_r": "i32"},
        constexprs={},
        config=SUM_ROWS_CONFIG,
        int_args={"C": 4 * 1664, "stride_g": 8 * 4 * 1664, "stride_r": 4 * 1664},
    )
