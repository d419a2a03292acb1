"""Pieces shared by the fused ops: the CPU dispatch switch, input checks, config selection, the workspace
record of a launch, the dropout mask tile and the deterministic row-sum kernel.

Every backward reduction over tokens is two-stage: the main kernel writes one fp32 partial row per
program, then `sum_rows` adds those rows in a fixed order and writes each gradient in its final
dtype. No atomics, so gradients are bitwise reproducible for a given shape and config.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from jit_kernels.dropout import Dropout, check_dropout

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_on_cpu() -> bool:
    """Whether the custom ops' CPU kernels run the Triton launch (Triton's interpreter is on) or the eager reference.

    Read at call time from Triton's own `TRITON_INTERPRET` knob, not at import: the switch then follows the
    environment of the call (a test may unset it), and the interpreter must be on before `triton` is imported
    anyway (tests/conftest.py sets it first) for the kernels to be built as interpreted functions.
    """
    return bool(triton.knobs.runtime.interpret)


class Workspace(NamedTuple):
    """Scratch a launch allocates beyond its inputs and outputs: fp32 bytes, each written once and read once,
    and the extra reduction launches that read them (what the traffic counter adds to a custom op's I/O)."""

    bytes: int
    launches: int


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


# Options a config launches with on one target only, by config identity and compute capability (e.g. 75): set with
# `arch_override` beside the config tables, read by `launch_options` and by `jit_kernels.compile_check`.
_ARCH_OPTIONS: dict[int, dict[int, dict[str, int]]] = {}


def arch_override(config: triton.Config, arch: int, **options: int) -> triton.Config:
    """Launch (and compile-check) `config` with `options` on GPUs of compute capability `arch`, e.g. the register
    cap ptxas needs there to compile it without spills; returns `config`."""
    _ARCH_OPTIONS.setdefault(id(config), {})[arch] = options
    return config


def arch_options(config: triton.Config, arch: int | None) -> dict[str, int]:
    """num_warps / num_stages (and maxnreg if set) of `config` on target `arch` (None: the config's own)."""
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None:
        options["maxnreg"] = config.maxnreg
    return {**options, **_ARCH_OPTIONS.get(id(config), {}).get(arch, {})}


@functools.cache
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def launch_options(config: triton.Config) -> dict[str, int]:
    """Launch keyword arguments of a config: its constexprs plus num_warps / num_stages (and maxnreg if set), as
    overridden for the current CUDA device's target (the launch helpers launch under `device_guard`)."""
    arch = None if triton_on_cpu() or not torch.cuda.is_initialized() else _capability(torch.cuda.current_device())
    return dict(config.kwargs, **arch_options(config, arch))


def dropout_kernel_args(dropout: Dropout | None, standin: torch.Tensor) -> dict:
    """Kernel arguments of a fused dropout (without one: `standin` for the seed pointer and HAS_DROPOUT off)."""
    if dropout is None:
        return dict(SEED=standin, SITE=0, drop_p=0.0, drop_scale=1.0, HAS_DROPOUT=False)
    return dict(SEED=dropout.seed, SITE=dropout.site, drop_p=dropout.p, drop_scale=dropout.scale, HAS_DROPOUT=True)


@triton.jit
def dropout_keep(seed, site, rows, col0, C, p, BLOCK_C: tl.constexpr):
    """Keep mask (len(rows), BLOCK_C) of dropout site `site` for global rows `rows` (int64) and columns
    col0 + [0, BLOCK_C) (col0 and BLOCK_C multiples of 4), the contract of `jit_kernels.dropout`.

    One Philox call gives the words of 4 adjacent columns (`tl.rand4x`), so a quarter-width tile of counters is
    drawn and the four keep tiles are interleaved back to full width (int8, a small layout exchange).
    """
    quads = col0 // 4 + tl.arange(0, BLOCK_C // 4)
    q = (site.to(tl.int64) << 40) + rows[:, None] * tl.cdiv(C, 4) + quads[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, q)
    k0 = (u0 >= p).to(tl.int8)
    k1 = (u1 >= p).to(tl.int8)
    k2 = (u2 >= p).to(tl.int8)
    k3 = (u3 >= p).to(tl.int8)
    return tl.interleave(tl.interleave(k0, k2), tl.interleave(k1, k3)) != 0


@triton.jit
def _sum_store(IN, OUT, g, R, C, stride_g, stride_r, cols, cmask, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[g * C + c] = sum_r IN[g * stride_g + r * stride_r + c] over r in order, cast to OUT's dtype."""
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (rows < R)[:, None] & cmask[None, :]
        tile = tl.load(IN + g * stride_g + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(OUT + g * C + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


@triton.jit
def sum_rows_kernel(
    IN,
    OUT0,
    OUT1,
    OUT2,
    OUT3,
    OUT4,
    R,
    C,
    stride_g,
    stride_r,
    stride_j,
    NUM_OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """OUTj[g, c] = sum_r IN[g * stride_g + r * stride_r + j * stride_j + c] for j < NUM_OUT, each in its own dtype.

    One launch finishes a fused backward's reductions: every gradient it produces is written
    straight in its final dtype, with no fp32 intermediate or cast launch behind it.
    """
    pid_c = tl.program_id(0)
    g = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    _sum_store(IN, OUT0, g, R, C, stride_g, stride_r, cols, cmask, BLOCK_R, BLOCK_C)
    if NUM_OUT > 1:
        _sum_store(IN + stride_j, OUT1, g, R, C, stride_g, stride_r, cols, cmask, BLOCK_R, BLOCK_C)
    if NUM_OUT > 2:
        _sum_store(IN + 2 * stride_j, OUT2, g, R, C, stride_g, stride_r, cols, cmask, BLOCK_R, BLOCK_C)
    if NUM_OUT > 3:
        _sum_store(IN + 3 * stride_j, OUT3, g, R, C, stride_g, stride_r, cols, cmask, BLOCK_R, BLOCK_C)
    if NUM_OUT > 4:
        _sum_store(IN + 4 * stride_j, OUT4, g, R, C, stride_g, stride_r, cols, cmask, BLOCK_R, BLOCK_C)


SUM_ROWS_CONFIG = triton.Config({"BLOCK_R": 8, "BLOCK_C": 512}, num_warps=4, num_stages=1)
MAX_SUM_OUTPUTS = 5


def sum_rows(
    partials: torch.Tensor,
    outs: Sequence[torch.Tensor],
    rows: int,
    stride_g: int,
    stride_r: int,
    stride_j: int | None = None,
) -> None:
    """Second reduction stage into `outs` (1 to 5 contiguous tensors of one shape (..., C), any dtypes).

    outs[j].view(G, C)[g] = sum over r < rows of partials[g * stride_g + r * stride_r + j * stride_j : ... + C],
    summed in fp32 in a fixed order (G = outs[j].numel() // C; stride_j defaults to C: adjacent partials).
    """
    if not 1 <= len(outs) <= MAX_SUM_OUTPUTS or any(o.shape != outs[0].shape for o in outs):
        raise ValueError(f"sum_rows takes 1 to {MAX_SUM_OUTPUTS} outputs of one shape, got "
                         f"{[tuple(o.shape) for o in outs]}")
    for i, o in enumerate(outs):
        check_contiguous(f"sum_rows output {i}", o)
    cols = outs[0].shape[-1]
    groups = outs[0].numel() // cols
    padded = list(outs) + [outs[0]] * (MAX_SUM_OUTPUTS - len(outs))
    block_c = SUM_ROWS_CONFIG.kwargs["BLOCK_C"]
    with device_guard(partials):
        sum_rows_kernel[(triton.cdiv(cols, block_c), groups)](
            partials, *padded, rows, cols, stride_g, stride_r, cols if stride_j is None else stride_j,
            NUM_OUT=len(outs), **launch_options(SUM_ROWS_CONFIG),
        )


def check_modulate_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    shift: torch.Tensor | None,
    scale: torch.Tensor,
    branch: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    branch_bias: torch.Tensor | None = None,
    dropout: Dropout | None = None,
    max_d: int = 8192,
) -> None:
    """Shape/dtype/device validation of the rmsnorm_modulate ops and launches (shift None: backward)."""
    if x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (B, N, D) tensor, got shape {tuple(x.shape)}")
    if (branch is None) != (gate is None):
        raise ValueError("branch and gate must be given together (gated residual) or both omitted")
    if branch_bias is not None and branch is None:
        raise ValueError("branch_bias needs the gated residual (branch and gate)")
    if dropout is not None:
        if branch is None:
            raise ValueError("dropout needs the gated residual (branch and gate)")
        check_dropout(dropout, x.device)
    b, _, d = x.shape
    if d > max_d:
        raise ValueError(f"x has hidden size D={d}; the fused kernel supports D <= {max_d}")
    named = {"x": x, "weight": weight, "shift": shift, "scale": scale, "branch": branch, "gate": gate,
             "branch_bias": branch_bias}
    named = {k: v for k, v in named.items() if v is not None}
    check_shape("weight", weight, (d,))
    if branch_bias is not None:
        check_shape("branch_bias", branch_bias, (d,))
    for name in ("shift", "scale", "gate"):
        if name in named:
            check_shape(name, named[name], (b, d))
    if branch is not None:
        check_shape("branch", branch, tuple(x.shape))
    for name, t in named.items():
        check_dtype(name, t)
    check_same_device(**named)


def promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Dtype eager PyTorch gives to an elementwise combination of `tensors` (type promotion)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
