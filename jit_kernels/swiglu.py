"""Fused SwiGLU on the w12 GEMM output: h = silu(x1) * x2 with x1, x2 = x12.chunk(2, -1).

The backward recomputes the sigmoid from x1 instead of saving it:
    dx1 = dh * x2 * s * (1 + x1 * (1 - s)),  dx2 = dh * x1 * s,  s = sigmoid(x1).
Rows are the flattened leading dims. An optional bias (the w12 bias, when the GEMM runs without it) is
added in fp32 on load, and its gradient (column sums of dx12) is reduced in the backward pass that
writes dx12 anyway: two-stage, deterministic, written in the bias dtype (`linear_swiglu`).
Optional dropout of h (the MLP's, before w3; `jit_kernels.dropout`): the kernel draws the Philox mask of its tile
in forward and again in backward (dout is masked and scaled on load), so no mask is stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from jit_kernels import reference
from jit_kernels._common import (
    Workspace,
    check_contiguous,
    check_dtype,
    check_same_device,
    check_shape,
    device_guard,
    dropout_keep,
    dropout_kernel_args,
    launch_options,
    sum_rows,
)
from jit_kernels.dropout import Dropout, check_dropout, from_op_args
from jit_kernels.spec import (
    MODE_DTYPES,
    CaseData,
    DtypeClass,
    KernelSpec,
    LibraryOp,
    OpCase,
    OpSpec,
    define,
    dropout_signature,
    randn,
)

# One size class: the kernel is elementwise, so the tile only trades registers for fewer programs.
# The first config is launched; the second is a candidate that compile_check also builds. A backward
# program walks ROWS_PER_PROG rows so the bias-gradient partials stay small (P = M / ROWS_PER_PROG rows);
# its 256-wide tiles keep the two column accumulators at 56-64 registers (512 wide: 128, 19-25% occupancy).
FWD_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_M": 4, "BLOCK_H": 512}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 8, "BLOCK_H": 512}, num_warps=8, num_stages=1),
]
BWD_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_M": 2, "BLOCK_H": 256, "ROWS_PER_PROG": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 4, "BLOCK_H": 256, "ROWS_PER_PROG": 64}, num_warps=8, num_stages=1),
]


@triton.jit(do_not_specialize=["SITE"])
def swiglu_fwd_kernel(
    X12,
    BIAS,
    OUT,
    M,
    H,
    SEED,
    SITE,
    drop_p,
    drop_scale,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """OUT[m, j] = silu(x1) * x2 for a BLOCK_M x BLOCK_H tile, x1 = X12[m, j] (+ BIAS[j]), x2 = X12[m, H + j]
    (+ BIAS[H + j]); with dropout, kept elements scaled by drop_scale and the others zero."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    mask = (rows < M)[:, None] & cmask[None, :]
    src = rows[:, None] * (2 * H) + cols[None, :]
    x1 = tl.load(X12 + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X12 + src + H, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x1 += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        x2 += tl.load(BIAS + H + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    out = x1 * tl.sigmoid(x1) * x2
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(SEED), SITE, rows, tl.program_id(1) * BLOCK_H, H, drop_p, BLOCK_H)
        out = tl.where(keep, out * drop_scale, 0.0)
    tl.store(OUT + rows[:, None] * H + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["SITE"])
def swiglu_bwd_kernel(
    X12,
    BIAS,
    DOUT,
    DX12,
    PART,
    M,
    H,
    SEED,
    SITE,
    drop_p,
    drop_scale,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
):
    """Program (p, j) writes DX12 = (dx1, dx2) for rows [p*ROWS_PER_PROG, (p+1)*ROWS_PER_PROG) of hidden
    block j, recomputing sigmoid(x1); with a bias it also writes the fp32 column sums of dx1 and dx2 over
    its rows into PART[p, :] (the bias-gradient partials, reduced later by `sum_rows`). With dropout, dout is
    masked and scaled by the forward's mask, redrawn here."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < H
    if HAS_BIAS:
        b1 = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        b2 = tl.load(BIAS + H + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    acc1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(0, ROWS_PER_PROG, BLOCK_M):
        rows = pid * ROWS_PER_PROG + start + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & cmask[None, :]
        src = rows[:, None] * (2 * H) + cols[None, :]
        x1 = tl.load(X12 + src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(X12 + src + H, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x1 += b1[None, :]
            x2 += b2[None, :]
        dout = tl.load(DOUT + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, SITE, rows, tl.program_id(1) * BLOCK_H, H, drop_p, BLOCK_H)
            dout = tl.where(keep, dout * drop_scale, 0.0)
        s = tl.sigmoid(x1)
        dx1 = dout * x2 * s * (1.0 + x1 * (1.0 - s))
        dx2 = dout * x1 * s
        tl.store(DX12 + src, dx1.to(DX12.dtype.element_ty), mask=mask)
        tl.store(DX12 + src + H, dx2.to(DX12.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc1 += tl.sum(dx1, axis=0)
            acc2 += tl.sum(dx2, axis=0)
    if HAS_BIAS:
        tl.store(PART + pid * 2 * H + cols, acc1, mask=cmask)
        tl.store(PART + pid * 2 * H + H + cols, acc2, mask=cmask)


def _check_inputs(x12: torch.Tensor, bias: torch.Tensor | None = None, dropout: Dropout | None = None) -> None:
    """x12 must be (..., 2h) with a supported float dtype; a bias must be a contiguous (2h,) vector."""
    if x12.dim() < 1 or x12.shape[-1] % 2 != 0:
        raise ValueError(f"x12 must have an even last dim (x1 | x2 halves), got shape {tuple(x12.shape)}")
    check_dtype("x12", x12)
    if bias is not None:
        check_shape("bias", bias, (x12.shape[-1],))
        check_dtype("bias", bias)
        check_contiguous("bias", bias)
        check_same_device(x12=x12, bias=bias)
    if dropout is not None:
        check_dropout(dropout, x12.device)


def swiglu_fwd(
    x12: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
    dropout: Dropout | None = None,
) -> torch.Tensor:
    """Triton launch: drop(silu(x1 + b1) * (x2 + b2)), shape (..., h), in x12's dtype (bias, dropout optional)."""
    _check_inputs(x12, bias, dropout)
    check_contiguous("x12", x12)
    h = x12.shape[-1] // 2
    m = x12.numel() // max(2 * h, 1)
    out = torch.empty(x12.shape[:-1] + (h,), device=x12.device, dtype=x12.dtype)
    cfg = config or FWD_CONFIGS[0]
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]), triton.cdiv(h, cfg.kwargs["BLOCK_H"]))
    with device_guard(x12):
        swiglu_fwd_kernel[grid](x12, x12 if bias is None else bias, out, m, h, HAS_BIAS=bias is not None,
                                **dropout_kernel_args(dropout, x12), **launch_options(cfg))
    return out


def swiglu_bwd(
    x12: torch.Tensor,
    bias: torch.Tensor | None,
    dout: torch.Tensor,
    config: triton.Config | None = None,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Triton backward launch: (dx12 (..., 2h), dbias (2h,) in the bias dtype or None) from dout (..., h);
    `dropout` is the forward's (its mask is redrawn)."""
    _check_inputs(x12, bias, dropout)
    check_contiguous("x12", x12)
    check_contiguous("dout", dout)
    h = x12.shape[-1] // 2
    if tuple(dout.shape) != tuple(x12.shape[:-1]) + (h,):
        raise ValueError(f"dout must have shape {tuple(x12.shape[:-1]) + (h,)}, got {tuple(dout.shape)}")
    m = x12.numel() // max(2 * h, 1)
    dx12 = torch.empty_like(x12)
    dbias = None if bias is None else torch.empty_like(bias)
    if dx12.numel() == 0:
        return dx12, None if dbias is None else dbias.zero_()
    cfg = config or BWD_CONFIGS[0]
    part_shape = _bwd_scratch(m, h, cfg)
    num_p = part_shape[0]
    partials = None if bias is None else torch.empty(part_shape, device=x12.device, dtype=torch.float32)
    grid = (num_p, triton.cdiv(h, cfg.kwargs["BLOCK_H"]))
    with device_guard(x12):
        swiglu_bwd_kernel[grid](
            x12, x12 if bias is None else bias, dout, dx12, dx12 if partials is None else partials, m, h,
            HAS_BIAS=bias is not None, **dropout_kernel_args(dropout, x12), **launch_options(cfg),
        )
    if dbias is not None:
        sum_rows(partials, [dbias], num_p, 0, 2 * h)
    return dx12, dbias


def _bwd_scratch(m: int, h: int, cfg: triton.Config) -> tuple[int, int]:
    """Shape of the backward's fp32 bias-gradient partials (P, 2h), P = row programs (allocated with a bias only)."""
    return triton.cdiv(m, cfg.kwargs["ROWS_PER_PROG"]), 2 * h


def bwd_workspace(x12_shape: Sequence[int], has_bias: bool, config: triton.Config | None = None) -> Workspace:
    """Scratch of one `swiglu_bwd` for x12 of shape `x12_shape`: with a bias, its fp32 partials (as the launch sizes
    them) and the one `sum_rows` launch that reads them; without, none."""
    h = x12_shape[-1] // 2
    m = math.prod(x12_shape[:-1])
    if not has_bias or m * h == 0:
        return Workspace(0, 0)
    return Workspace(4 * math.prod(_bwd_scratch(m, h, config or BWD_CONFIGS[0])), 1)


# ---------------------------------------------------------------------------------------------
# torch.library ops (`spec.define`): the CUDA kernel is the launch; the CPU kernel the launch under the
# interpreter, else the eager reference. Dropout travels as (seed, site, p).


def _launch(x12: torch.Tensor, bias: torch.Tensor | None, dropout_seed: torch.Tensor | None = None,
            dropout_site: int = 0, dropout_p: float = 0.0) -> torch.Tensor:
    return swiglu_fwd(x12.contiguous(), bias, dropout=from_op_args(dropout_seed, dropout_site, dropout_p))


def _reference(x12, bias, dropout_seed=None, dropout_site=0, dropout_p=0.0):
    return reference.swiglu(x12, bias, from_op_args(dropout_seed, dropout_site, dropout_p))


def _fake(x12, bias, *_dropout):
    return x12.new_empty(x12.shape[:-1] + (x12.shape[-1] // 2,))


def _launch_bwd(x12: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor,
                dropout_seed: torch.Tensor | None = None, dropout_site: int = 0,
                dropout_p: float = 0.0) -> list[torch.Tensor]:
    dropout = from_op_args(dropout_seed, dropout_site, dropout_p)
    grads = swiglu_bwd(x12.contiguous(), bias, dout.contiguous(), dropout=dropout)
    return [g for g in grads if g is not None]  # an absent bias gradient is left out


def _reference_bwd(x12, bias, dout, dropout_seed=None, dropout_site=0, dropout_p=0.0):
    grads = reference.swiglu_bwd(x12, bias, dout, from_op_args(dropout_seed, dropout_site, dropout_p))
    return [g for g in grads if g is not None]


def _fake_bwd(x12, bias, dout, *_dropout):
    return [torch.empty_like(x12)] + ([] if bias is None else [torch.empty_like(bias)])


def _setup(ctx, inputs, output) -> None:
    x12, bias, seed, site, p = inputs
    ctx.save_for_backward(x12, bias, seed)  # the seed saved: an in-place update before backward is an error
    ctx.site, ctx.p = site, p


def _backward(ctx, dout):
    """Autograd backward: (dx12, dbias) from the backward op."""
    x12, bias, seed = ctx.saved_tensors
    grads = torch.ops.jit_fast.swiglu_bwd(x12, bias, dout.contiguous(), seed, ctx.site, ctx.p)
    return grads[0], (grads[1] if bias is not None else None), None, None, None


LIBRARY_OPS = define([
    LibraryOp("swiglu", _launch, _reference, _fake, _backward, _setup),
    LibraryOp("swiglu_bwd", _launch_bwd, _reference_bwd, _fake_bwd,
              workspace=lambda a: bwd_workspace(a["x12"].shape, a["bias"] is not None)),
])


def swiglu(x12: torch.Tensor, bias: torch.Tensor | None = None, dropout: Dropout | None = None) -> torch.Tensor:
    """Fused op (contract of reference.swiglu): validates, then dispatches the custom op."""
    _check_inputs(x12, bias, dropout)
    drop = () if dropout is None else (dropout.seed, dropout.site, dropout.p)
    return torch.ops.jit_fast.swiglu(x12, bias, *drop)


def linear_swiglu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropout: Dropout | None = None
) -> torch.Tensor:
    """The w12 GEMM without its bias, then SwiGLU with the bias folded in (and the MLP's dropout): the bias gradient
    comes out of the SwiGLU backward, which writes dx12 anyway, instead of a separate pass over dx12."""
    return swiglu(F.linear(x, weight), bias, dropout)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile jobs.


def compile_jobs(classes: Sequence[DtypeClass]) -> Iterator[KernelSpec]:
    """Both kernels x every config x dtype class x bias and dropout variant (dropout: training classes), at a
    hidden width divisible by 16 (JiT-B, padded widths) and one that is not (unpadded JiT-L/H/G: 2730, 3413, 4437),
    which compile differently.

    x12, h and their gradients are the act dtype, the folded w12 bias the parameter dtype; without a bias x12
    stands in for it, and dx12 for the (unused) fp32 partials; without dropout x12 stands in for the seed.
    """
    for cls in classes:
        a, p = cls.act, cls.param
        for h in (2048, 4480, 2730, 3413, 4437):
            ints = {"M": 256 * 288, "H": h}
            for bias in (False, True):
                for dropout in (False, True) if cls.backward else (False,):
                    bias_t, drop = p if bias else a, dropout_signature(dropout, a)
                    label = f"h={h} bias={bias}{' dropout' if dropout else ''}"
                    constexprs = {"HAS_BIAS": bias, "HAS_DROPOUT": dropout}
                    for cfg in FWD_CONFIGS:
                        yield KernelSpec("swiglu_fwd", swiglu_fwd_kernel,
                                         {"X12": f"*{a}", "BIAS": f"*{bias_t}", "OUT": f"*{a}", "M": "i32",
                                          "H": "i32", **drop},
                                         constexprs, cfg, ints, label, cls.name, bias, dropout)
                    if not cls.backward:
                        continue
                    for cfg in BWD_CONFIGS:
                        yield KernelSpec("swiglu_bwd", swiglu_bwd_kernel,
                                         {"X12": f"*{a}", "BIAS": f"*{bias_t}", "DOUT": f"*{a}", "DX12": f"*{a}",
                                          "PART": "*fp32" if bias else f"*{a}", "M": "i32", "H": "i32", **drop},
                                         constexprs, cfg, ints, label, cls.name, bias, dropout)


# ---------------------------------------------------------------------------------------------
# Cases (selfcheck, benchmarks.ops): x12 in the mode's autocast dtype, fp32 bias, optional dropout of h.


def _case(rows: int, h: int, bias: bool, dropout_site: int | None = None, kind: str = "numerics") -> OpCase:
    def make(device: torch.device | str, mode: str, seed: int) -> CaseData:
        gen = torch.Generator().manual_seed(seed)
        t = {"x12": randn(gen, rows, 2 * h).to(MODE_DTYPES[mode])}
        if bias:
            t["bias"] = randn(gen, 2 * h, scale=0.5)
        up = [randn(gen, rows, h).to(device)]
        drop = None if dropout_site is None else Dropout(
            0.2, torch.tensor([-12345], dtype=torch.int64, device=device), dropout_site)

        def call(table, v, _out):
            args = (v["x12"], v.get("bias"))
            return (table.swiglu(*args) if drop is None else table.swiglu(*args, drop),)

        return CaseData({k: v.to(device) for k, v in t.items()}, tuple(t), ("h",), up, call)

    label = f"M={rows} h={h}{' bias' if bias else ''}{' dropout 0.2' if dropout_site is not None else ''}"
    return OpCase("swiglu", label, make, kind)


def _cases(sizes) -> list[OpCase]:
    rows, h = sizes.swiglu_rows, sizes.hidden[-1]
    return [_case(rows, hid, bias) for hid in sizes.hidden for bias in (False, True)] + [
        _case(rows, h, True, kind="determinism"), _case(rows, h, True, dropout_site=6, kind="dropout")]


SPEC = OpSpec(
    name="swiglu",
    entries={"swiglu": swiglu, "linear_swiglu": linear_swiglu},
    library_ops=LIBRARY_OPS,
    compile_jobs=compile_jobs,
    cases=_cases,
)
