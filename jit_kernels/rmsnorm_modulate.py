"""Fused RMSNorm + adaLN modulation, optionally preceded by the gated residual of the previous branch.

Forward (one read of x and branch, one write of x_out and y):
    x_out = x + gate[b] * drop(branch + bias)         (residual variant only; bias and dropout optional)
    y     = x_out * rstd * weight * (1 + scale[b]) + shift[b],  rstd = 1 / sqrt(mean(x_out^2) + eps)
The bias is that of the GEMM which produced the branch, run without it: adding it here saves the
GEMM's bias cast under autocast and, in backward, the separate sum of dbranch over tokens.
drop is the attention branch's dropout (`jit_kernels.dropout`): its Philox mask is drawn in the kernel, in forward
and again in backward, so it is never stored and the proj bias folds in dropout blocks too.
Backward recomputes rstd from x_out (no saved statistics) and produces dx, dbranch, dgate, dweight,
dshift, dscale (and dbias); the sums over tokens are two-stage (see `_common`).
All arithmetic is fp32; results are rounded once, to the dtype of the tensor they are stored in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import torch
import triton
import triton.language as tl

from jit_kernels import reference
from jit_kernels._common import (
    Workspace,
    arch_override,
    check_contiguous,
    check_modulate_inputs,
    check_rows,
    check_shape,
    device_guard,
    dropout_keep,
    dropout_kernel_args,
    launch_options,
    promoted_dtype,
    rowwise,
    select_config,
    sum_rows,
)
from jit_kernels.dropout import Dropout, from_op_args
from jit_kernels.spec import (
    EPS,
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

# Size classes keyed by BLOCK_D = next_pow2(D); the first config of a class is the one launched
# (a fixed choice keeps reductions bitwise reproducible across runs), the others are candidates
# that compile_check also builds. D 768/1024 -> 1024, D 1280/1664 -> 2048. Without a GPU to time
# them, defaults were picked from compile_check: no spills, then the highest occupancy estimate.
FWD_CONFIGS: dict[int, list[triton.Config]] = {
    1024: [
        triton.Config({"BLOCK_M": 2}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_M": 4}, num_warps=8, num_stages=1),
    ],
    2048: [
        triton.Config({"BLOCK_M": 1}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 2}, num_warps=8, num_stages=1),
    ],
}
BWD_CONFIGS: dict[int, list[triton.Config]] = {
    1024: [
        # ptxas targets 32 registers for some variants at 512 threads and then spills; 40 is spill-free
        triton.Config({"BLOCK_M": 1, "ROWS_PER_PROG": 32}, num_warps=16, num_stages=1, maxnreg=40),
        triton.Config({"BLOCK_M": 2, "ROWS_PER_PROG": 32}, num_warps=16, num_stages=1),
    ],
    2048: [
        triton.Config({"BLOCK_M": 1, "ROWS_PER_PROG": 32}, num_warps=16, num_stages=1),
        triton.Config({"BLOCK_M": 1, "ROWS_PER_PROG": 32}, num_warps=8, num_stages=1),
    ],
}
# sm_75 (T4) fills its 32 warp slots even at 64 registers per thread; the 40-register cap spills there (compile_check).
arch_override(BWD_CONFIGS[1024][0], 75, maxnreg=64)
# sm_86 / sm_89: the fp32 residual+bias+dropout variant spills 4 bytes at 40 (compile_check); 48 costs occupancy
# there (2 of 3 resident programs), not spills.
arch_override(BWD_CONFIGS[1024][0], 86, maxnreg=48)
arch_override(BWD_CONFIGS[1024][0], 89, maxnreg=48)
MAX_D = max(FWD_CONFIGS)


@triton.jit(do_not_specialize=["SITE"])
def rmsnorm_modulate_fwd_kernel(
    X,
    BRANCH,
    GATE,
    BIAS,
    W,
    SHIFT,
    SCALE,
    XOUT,
    Y,
    N,
    D,
    stride_gate,
    stride_shift,
    stride_scale,
    eps,
    SEED,
    SITE,
    drop_p,
    drop_scale,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (i, b) handles rows [i*BLOCK_M, (i+1)*BLOCK_M) of sample b over the full hidden width."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < N)[:, None] & cmask[None, :]
    offs = (b * N + rows)[:, None] * D + cols[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
        branch = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            branch += tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_DROPOUT:
            keep = dropout_keep(tl.load(SEED), SITE, b * N + rows, 0, D, drop_p, BLOCK_D)
            branch = tl.where(keep, branch * drop_scale, 0.0)
        x_out = (x + gate[None, :] * branch).to(XOUT.dtype.element_ty)
        tl.store(XOUT + offs, x_out, mask=mask)
        x = x_out.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)

    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + b * stride_shift + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (x * rstd[:, None]) * (w * (1.0 + scale))[None, :] + shift[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["SITE"])
def rmsnorm_modulate_bwd_kernel(
    XN,
    DY,
    DXO,
    BRANCH,
    GATE,
    BIAS,
    W,
    SCALE,
    DX,
    DBRANCH,
    PART,
    N,
    D,
    stride_gate,
    stride_scale,
    eps,
    SEED,
    SITE,
    drop_p,
    drop_scale,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DXO: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
):
    """Program (p, b) walks rows [p*ROWS_PER_PROG, (p+1)*ROWS_PER_PROG) of sample b.

    It writes dx (and dbranch) for its rows and one fp32 partial row each for dshift, dscale,
    dweight, dgate (and dbias) into PART[b, p, 0:NUM_PART, :] (reduced later by `sum_rows`).
    With a bias, dgate = sum dx * (branch + bias) and dbias = gate * sum dx come from the column
    sums of dx, so the bias is never added per element in backward. With dropout, dx is first multiplied by
    the forward's mask (redrawn here) and scale wherever it flows to the branch: dbranch, dgate, dbias.
    """
    NUM_PART: tl.constexpr = 5 if HAS_BIAS else 4
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    num_p = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D

    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    scale1 = 1.0 + tl.load(SCALE + b * stride_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    w_eff = w * scale1
    if HAS_RESIDUAL:
        gate = tl.load(GATE + b * stride_gate + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    acc_shift = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_s = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_dx = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row0 = pid * ROWS_PER_PROG
    n_rows = tl.minimum(N - row0, ROWS_PER_PROG)
    for start in range(0, n_rows, BLOCK_M):
        rows = row0 + start + tl.arange(0, BLOCK_M)
        mask = (rows < N)[:, None] & cmask[None, :]
        offs = (b * N + rows)[:, None] * D + cols[None, :]

        x = tl.load(XN + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        xhat = x * rstd[:, None]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        acc_shift += tl.sum(dy, axis=0)
        acc_s += tl.sum(dy * xhat, axis=0)

        dxhat = dy * w_eff[None, :]
        proj = tl.sum(dxhat * xhat, axis=1) / D
        dx = (dxhat - xhat * proj[:, None]) * rstd[:, None]
        if HAS_DXO:
            dx += tl.load(DXO + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RESIDUAL:
            branch = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, SITE, b * N + rows, 0, D, drop_p, BLOCK_D)
                dx = tl.where(keep, dx * drop_scale, 0.0)
            acc_gate += tl.sum(dx * branch, axis=0)
            if HAS_BIAS:
                acc_dx += tl.sum(dx, axis=0)
            tl.store(DBRANCH + offs, (dx * gate[None, :]).to(DBRANCH.dtype.element_ty), mask=mask)

    part = PART + ((b * num_p + pid) * NUM_PART) * D + cols
    tl.store(part, acc_shift, mask=cmask)
    tl.store(part + D, acc_s * w, mask=cmask)
    tl.store(part + 2 * D, acc_s * scale1, mask=cmask)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(part + 3 * D, acc_gate + bias * acc_dx, mask=cmask)
        tl.store(part + 4 * D, acc_dx * gate, mask=cmask)
    else:
        tl.store(part + 3 * D, acc_gate, mask=cmask)


def _launch_fwd(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, branch: torch.Tensor | None,
    gate: torch.Tensor | None, branch_bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None,
    config: triton.Config | None, dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_modulate_inputs(x, weight, shift, scale, branch, gate, branch_bias, dropout, MAX_D)
    for name, t in (("x", x), ("weight", weight), ("branch", branch), ("branch_bias", branch_bias)):
        if t is not None:
            check_contiguous(name, t)
    for name, t in (("shift", shift), ("scale", scale), ("gate", gate)):
        if t is not None:
            check_rows(name, t)
    b, n, d = x.shape
    residual = branch is not None
    x_out = torch.empty_like(x, dtype=promoted_dtype(x, gate, branch)) if residual else x
    y_dtype = out_dtype or promoted_dtype(x_out, shift, scale)
    y = torch.empty(x.shape, device=x.device, dtype=y_dtype)
    cfg = config or select_config(FWD_CONFIGS, triton.next_power_of_2(d), "rmsnorm_modulate")
    grid = (triton.cdiv(n, cfg.kwargs["BLOCK_M"]), b)
    with device_guard(x):
        rmsnorm_modulate_fwd_kernel[grid](
            x, branch if residual else x, gate if residual else shift, weight if branch_bias is None else branch_bias,
            weight, shift, scale, x_out, y, n, d, gate.stride(0) if residual else 0, shift.stride(0), scale.stride(0),
            eps, HAS_RESIDUAL=residual, HAS_BIAS=branch_bias is not None, BLOCK_D=triton.next_power_of_2(d),
            **dropout_kernel_args(dropout, x), **launch_options(cfg),
        )
    return x_out, y


def rmsnorm_modulate_fwd(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
    out_dtype: torch.dtype | None = None, config: triton.Config | None = None,
) -> torch.Tensor:
    """Triton launch: y = modulate(RMSNorm(x)) on any device Triton runs on (CUDA, or CPU when interpreted)."""
    return _launch_fwd(x, weight, shift, scale, None, None, None, eps, out_dtype, config)[1]


def residual_rmsnorm_modulate_fwd(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    branch_bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launch: x_out = x + gate * drop(branch + branch_bias) and y = modulate(RMSNorm(x_out)) in one pass."""
    return _launch_fwd(x, weight, shift, scale, branch, gate, branch_bias, eps, out_dtype, config, dropout)


def rmsnorm_modulate_bwd(
    dy: torch.Tensor,
    x_norm: torch.Tensor,
    dx_out: torch.Tensor | None,
    branch: torch.Tensor | None,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    scale: torch.Tensor,
    eps: float,
    x_dtype: torch.dtype,
    shift_dtype: torch.dtype,
    branch_bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Triton backward launch: returns (dx, dbranch, dgate, dweight, dshift, dscale, dbias).

    `x_norm` is the tensor that was normalized (x_out for the residual variant); `dx_out` is the
    gradient arriving at x_out from later layers. dbranch and dgate are None without a residual,
    dbias without a branch bias. `dropout` is the forward's (its mask is redrawn).
    """
    check_modulate_inputs(x_norm, weight, None, scale, branch, gate, branch_bias, dropout, MAX_D)
    named = (("dy", dy), ("x_norm", x_norm), ("dx_out", dx_out), ("branch", branch), ("weight", weight),
             ("branch_bias", branch_bias))
    for name, t in named:
        if t is not None:
            check_contiguous(name, t)
    check_shape("dy", dy, tuple(x_norm.shape))
    if dx_out is not None:
        check_shape("dx_out", dx_out, tuple(x_norm.shape))
    check_rows("scale", scale)
    residual, has_bias = branch is not None, branch_bias is not None
    if residual:
        check_rows("gate", gate)
    b, n, d = x_norm.shape
    cfg = config or _bwd_config(d)
    part_shape, rows_shape = _bwd_scratch(b, n, d, has_bias, cfg)
    _, num_p, num_part, _ = part_shape
    dx = torch.empty(x_norm.shape, device=x_norm.device, dtype=x_dtype)
    dbranch = torch.empty_like(branch) if residual else None
    partials = torch.empty(part_shape, device=x_norm.device, dtype=torch.float32)
    with device_guard(x_norm):
        rmsnorm_modulate_bwd_kernel[(num_p, b)](
            x_norm, dy, dx_out if dx_out is not None else dy, branch if residual else dy, gate if residual else scale,
            branch_bias if has_bias else weight, weight, scale, dx, dbranch if residual else dx, partials, n, d,
            gate.stride(0) if residual else 0, scale.stride(0), eps, HAS_RESIDUAL=residual,
            HAS_DXO=dx_out is not None, HAS_BIAS=has_bias, BLOCK_D=triton.next_power_of_2(d),
            **dropout_kernel_args(dropout, x_norm), **launch_options(cfg),
        )
    # stage 2 sums each sample's partial rows into dshift, dscale and dgate (final dtypes) and fp32
    # per-sample dweight (and dbias) rows; stage 3 sums those over the batch into dweight (and dbias)
    per_sample = functools.partial(torch.empty, b, d, device=x_norm.device)
    dshift, dscale = per_sample(dtype=shift_dtype), per_sample(dtype=scale.dtype)
    dgate = per_sample(dtype=gate.dtype) if residual else None
    per_batch = torch.empty(rows_shape, device=x_norm.device, dtype=torch.float32)
    stage2 = [dshift, dscale, per_batch[0]] + ([dgate] if residual else []) + ([per_batch[1]] if has_bias else [])
    sum_rows(partials, stage2, num_p, num_p * num_part * d, num_part * d)
    dweight = torch.empty(d, device=x_norm.device, dtype=weight.dtype)
    dbias = torch.empty_like(branch_bias) if has_bias else None
    sum_rows(per_batch, [dweight] + ([dbias] if has_bias else []), b, 0, d, b * d)
    return dx, dbranch, dgate, dweight, dshift, dscale, dbias


def _bwd_config(d: int) -> triton.Config:
    """The backward config launched for hidden size `d`."""
    return select_config(BWD_CONFIGS, triton.next_power_of_2(d), "rmsnorm_modulate backward")


def _bwd_scratch(b: int, n: int, d: int, has_bias: bool, cfg: triton.Config) -> tuple[tuple[int, ...], ...]:
    """Shapes of the backward's fp32 scratch: partial rows (B, P, 4 or 5, D) and per-sample dweight (dbias) rows."""
    num_p = triton.cdiv(n, cfg.kwargs["ROWS_PER_PROG"])
    return (b, num_p, 4 + has_bias, d), (1 + has_bias, b, d)


def bwd_workspace(x_shape: Sequence[int], has_bias: bool, config: triton.Config | None = None) -> Workspace:
    """Scratch of one `rmsnorm_modulate_bwd` for x_norm of shape `x_shape`: its fp32 buffers (as the launch sizes
    them) and the two `sum_rows` launches (stage 2 and stage 3) that read them."""
    b, n, d = x_shape
    shapes = _bwd_scratch(b, n, d, has_bias, config or _bwd_config(d))
    return Workspace(4 * sum(math.prod(shape) for shape in shapes), 2)


# ---------------------------------------------------------------------------------------------
# torch.library ops (`spec.define`): the CUDA kernel is the launch; the CPU kernel the launch under the
# interpreter, else the eager reference. Their arguments are the schema: tensors and scalars only (dropout as
# seed, site, p).


def _launch_plain(
    x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    out_dtype: torch.dtype | None,
) -> torch.Tensor:
    return rmsnorm_modulate_fwd(x.contiguous(), weight.contiguous(), rowwise(shift), rowwise(scale), eps, out_dtype)


def _fake_plain(x, weight, shift, scale, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype or promoted_dtype(x, shift, scale))


def _launch_residual(
    x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
    scale: torch.Tensor, eps: float, out_dtype: torch.dtype | None, branch_bias: torch.Tensor | None = None,
    dropout_seed: torch.Tensor | None = None, dropout_site: int = 0, dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_rmsnorm_modulate_fwd(
        x.contiguous(), branch.contiguous(), rowwise(gate), weight.contiguous(), rowwise(shift), rowwise(scale), eps,
        out_dtype, None if branch_bias is None else branch_bias.contiguous(),
        dropout=from_op_args(dropout_seed, dropout_site, dropout_p),
    )


def _reference_residual(x, branch, gate, weight, shift, scale, eps, out_dtype, branch_bias=None, dropout_seed=None,
                        dropout_site=0, dropout_p=0.0):
    return reference.residual_rmsnorm_modulate(x, branch, gate, weight, shift, scale, eps, out_dtype, branch_bias,
                                               from_op_args(dropout_seed, dropout_site, dropout_p))


def _fake_residual(x, branch, gate, weight, shift, scale, eps, out_dtype, *_bias_and_dropout):
    x_out = x.new_empty(x.shape, dtype=promoted_dtype(x, gate, branch))
    return x_out, x.new_empty(x.shape, dtype=out_dtype or promoted_dtype(x_out, shift, scale))


def _launch_bwd(
    dy: torch.Tensor, x_norm: torch.Tensor, dx_out: torch.Tensor | None, branch: torch.Tensor | None,
    gate: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor, eps: float, x_dtype: torch.dtype,
    shift_dtype: torch.dtype, branch_bias: torch.Tensor | None = None, dropout_seed: torch.Tensor | None = None,
    dropout_site: int = 0, dropout_p: float = 0.0,
) -> list[torch.Tensor]:
    grads = rmsnorm_modulate_bwd(
        dy.contiguous(), x_norm.contiguous(), None if dx_out is None else dx_out.contiguous(),
        None if branch is None else branch.contiguous(), None if gate is None else rowwise(gate), weight.contiguous(),
        rowwise(scale), eps, x_dtype, shift_dtype, None if branch_bias is None else branch_bias.contiguous(),
        dropout=from_op_args(dropout_seed, dropout_site, dropout_p),
    )
    return [g for g in grads if g is not None]  # absent gradients are left out


def _reference_bwd(*args):
    grads = reference.rmsnorm_modulate_bwd(*args[:11], from_op_args(*args[11:14]) if len(args) > 11 else None)
    return [g for g in grads if g is not None]


def _fake_bwd(dy, x_norm, dx_out, branch, gate, weight, scale, eps, x_dtype, shift_dtype, branch_bias=None,
              *_dropout):
    b, _, d = x_norm.shape
    grads = [x_norm.new_empty(x_norm.shape, dtype=x_dtype)]
    if branch is not None:
        grads += [torch.empty_like(branch), gate.new_empty((b, d))]
    grads += [torch.empty_like(weight), scale.new_empty((b, d), dtype=shift_dtype), scale.new_empty((b, d))]
    return grads + ([] if branch_bias is None else [torch.empty_like(branch_bias)])


def _setup_plain(ctx, inputs, output) -> None:
    x, weight, shift, scale, eps, _ = inputs
    ctx.save_for_backward(x, weight, scale)
    ctx.eps, ctx.shift_dtype = eps, shift.dtype


def _backward_plain(ctx, dy):
    """Autograd backward of the plain op: (dx, dweight, dshift, dscale) from the backward op."""
    x, weight, scale = ctx.saved_tensors
    dx, dweight, dshift, dscale = torch.ops.jit_fast.rmsnorm_modulate_bwd(
        dy.contiguous(), x, None, None, None, weight, scale, ctx.eps, x.dtype, ctx.shift_dtype
    )
    return dx, dweight, dshift, dscale, None, None


def _setup_residual(ctx, inputs, output) -> None:
    x, branch, gate, weight, shift, scale, eps, _, branch_bias, seed, site, p = inputs
    # the seed is saved, not copied: an in-place update before this backward runs is an autograd error, not a
    # silently different mask
    ctx.save_for_backward(output[0], branch, gate, weight, scale, branch_bias, seed)
    ctx.set_materialize_grads(False)  # an unused x_out (final layer) then skips reading a zero gradient
    ctx.eps, ctx.x_dtype, ctx.shift_dtype, ctx.site, ctx.p = eps, x.dtype, shift.dtype, site, p


def _backward_residual(ctx, dx_out, dy):
    """Autograd backward of the residual op; `dx_out` is the gradient reaching x_out from later blocks."""
    x_out, branch, gate, weight, scale, branch_bias, seed = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x_out)
    dx_out = None if dx_out is None else dx_out.contiguous()
    grads = torch.ops.jit_fast.rmsnorm_modulate_bwd(
        dy.contiguous(), x_out, dx_out, branch, gate, weight, scale, ctx.eps, ctx.x_dtype, ctx.shift_dtype, branch_bias,
        seed, ctx.site, ctx.p,
    )
    dx, dbranch, dgate, dweight, dshift, dscale, *dbias = grads
    return dx, dbranch, dgate, dweight, dshift, dscale, None, None, dbias[0] if dbias else None, None, None, None


LIBRARY_OPS = define([
    LibraryOp("rmsnorm_modulate", _launch_plain, reference.rmsnorm_modulate, _fake_plain, _backward_plain,
              _setup_plain),
    LibraryOp("residual_rmsnorm_modulate", _launch_residual, _reference_residual, _fake_residual, _backward_residual,
              _setup_residual),
    LibraryOp("rmsnorm_modulate_bwd", _launch_bwd, _reference_bwd, _fake_bwd,
              workspace=lambda a: bwd_workspace(a["x_norm"].shape, a["branch_bias"] is not None)),
])


def rmsnorm_modulate(x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused op (same contract as reference.rmsnorm_modulate): validates, then dispatches the custom op."""
    check_modulate_inputs(x, weight, shift, scale, max_d=MAX_D)
    return torch.ops.jit_fast.rmsnorm_modulate(x, weight, shift, scale, eps, out_dtype)


def residual_rmsnorm_modulate(
    x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
    scale: torch.Tensor, eps: float = 1e-6, out_dtype: torch.dtype | None = None,
    branch_bias: torch.Tensor | None = None, dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused op (same contract as reference.residual_rmsnorm_modulate) via the custom op."""
    check_modulate_inputs(x, weight, shift, scale, branch, gate, branch_bias, dropout, MAX_D)
    drop = () if dropout is None else (dropout.seed, dropout.site, dropout.p)
    return torch.ops.jit_fast.residual_rmsnorm_modulate(x, branch, gate, weight, shift, scale, eps, out_dtype,
                                                        branch_bias, *drop)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile jobs: every (kernel, dtype class, variant, D, config) the launch helpers select.


def compile_jobs(classes: Sequence[DtypeClass]) -> Iterator[KernelSpec]:
    """Pointer types follow the launch helpers: the residual stream is x and x_out, GEMM outputs and adaLN chunks
    are the act dtype, norm weights and the folded branch bias the parameter dtype (the final layer's norm
    weight the root's), y is the act dtype; absent operands are replaced by the stand-ins the helpers pass
    (x for branch, shift or scale for gate, weight for the bias, dy for dx_out and branch, dx for dbranch,
    x or x_norm for the dropout seed). Dropout (the attention branch into norm2, training only) has an int64 seed.
    """
    for cls in classes:
        s, a, p = cls.stream, cls.act, cls.param
        for d in (768, 1024, 1280, 1664):
            block_d = triton.next_power_of_2(d)
            size = min(c for c in FWD_CONFIGS if c >= block_d)
            ints = {"N": 288, "D": d, "stride_gate": 6 * d, "stride_shift": 6 * d, "stride_scale": 6 * d}
            # (label, residual, bias, dropout, branch, gate, bias-or-weight, weight)
            fwd_variants = [
                ("plain", False, False, False, s, a, p, p),
                ("residual", True, False, False, a, a, p, p),
                ("residual", True, True, False, a, a, p, p),
                ("residual final-layer", True, False, False, a, a, cls.root_param, cls.root_param),
            ]
            if cls.backward:
                fwd_variants += [("residual", True, bias, True, a, a, p, p) for bias in (False, True)]
            for what, residual, bias, dropout, branch, gate, bias_t, w in fwd_variants:
                sig = {
                    "X": f"*{s}", "BRANCH": f"*{branch}", "GATE": f"*{gate}", "BIAS": f"*{bias_t}", "W": f"*{w}",
                    "SHIFT": f"*{a}", "SCALE": f"*{a}", "XOUT": f"*{s}", "Y": f"*{a}", "N": "i32", "D": "i32",
                    "stride_gate": "i32", "stride_shift": "i32", "stride_scale": "i32", "eps": "fp32",
                    **dropout_signature(dropout, s),
                }
                for cfg in FWD_CONFIGS[size]:
                    yield KernelSpec(
                        "rmsnorm_modulate_fwd", rmsnorm_modulate_fwd_kernel, sig,
                        {"HAS_RESIDUAL": residual, "HAS_BIAS": bias, "HAS_DROPOUT": dropout, "BLOCK_D": block_d},
                        cfg, ints, f"D={d} {what} bias={bias}{' dropout' if dropout else ''}", cls.name, bias, dropout,
                    )
            if not cls.backward:
                continue
            # (label, residual, dx_out, bias, dropout, dxo, branch, gate, bias-or-weight, weight, dbranch)
            bwd_variants = [
                ("plain", False, False, False, False, a, a, a, p, p, s),
                ("residual", True, True, False, False, s, a, a, p, p, a),
                ("residual", True, True, True, False, s, a, a, p, p, a),
                ("residual final-layer", True, False, False, False, a, a, a, cls.root_param, cls.root_param, a),
                ("residual no-dx_out", True, False, True, False, a, a, a, p, p, a),
            ]
            bwd_variants += [("residual", True, True, bias, True, s, a, a, p, p, a) for bias in (False, True)]
            for what, residual, has_dxo, bias, dropout, dxo, branch, gate, bias_t, w, dbranch in bwd_variants:
                sig = {
                    "XN": f"*{s}", "DY": f"*{a}", "DXO": f"*{dxo}", "BRANCH": f"*{branch}", "GATE": f"*{gate}",
                    "BIAS": f"*{bias_t}", "W": f"*{w}", "SCALE": f"*{a}", "DX": f"*{s}", "DBRANCH": f"*{dbranch}",
                    "PART": "*fp32", "N": "i32", "D": "i32", "stride_gate": "i32", "stride_scale": "i32",
                    "eps": "fp32", **dropout_signature(dropout, s),
                }
                for cfg in BWD_CONFIGS[size]:
                    yield KernelSpec(
                        "rmsnorm_modulate_bwd", rmsnorm_modulate_bwd_kernel, sig,
                        {"HAS_RESIDUAL": residual, "HAS_DXO": has_dxo, "HAS_BIAS": bias, "HAS_DROPOUT": dropout,
                         "BLOCK_D": block_d}, cfg,
                        ints, f"D={d} {what} bias={bias}{' dropout' if dropout else ''}", cls.name, bias, dropout,
                    )


# ---------------------------------------------------------------------------------------------
# Cases (selfcheck numerics and determinism, benchmarks.ops): fp32 stream, the mode's autocast dtype elsewhere.


def _case(entry: str, b: int, n: int, d: int, bias: bool = False, dropout_site: int | None = None,
          kind: str = "numerics") -> OpCase:
    """rmsnorm_modulate (entry "rmsnorm_modulate") or the residual op, optionally with the folded branch bias and
    dropout 0.2 at `dropout_site` (the reference draws the same mask)."""
    residual = entry == "residual_rmsnorm_modulate"
    label = f"B={b} N={n} D={d}{' bias' if bias else ''}{' dropout 0.2' if dropout_site is not None else ''}"

    def make(device: torch.device | str, mode: str, seed: int) -> CaseData:
        gen = torch.Generator().manual_seed(seed)
        act = MODE_DTYPES[mode]
        t = {"x": randn(gen, b, n, d), "weight": randn(gen, d, scale=0.2, shift=1.0),
             "shift": randn(gen, b, d, scale=0.3).to(act), "scale": randn(gen, b, d, scale=0.3).to(act)}
        if residual:
            t["branch"] = randn(gen, b, n, d).to(act)
            t["gate"] = randn(gen, b, d, scale=0.5).to(act)
        if bias:
            t["branch_bias"] = randn(gen, d, scale=0.5)
        up = [randn(gen, b, n, d).to(device) for _ in range(2 if residual else 1)]
        drop = None if dropout_site is None else Dropout(
            0.2, torch.tensor([-12345], dtype=torch.int64, device=device), dropout_site)

        def call(table, v, out):
            if not residual:
                return (table.rmsnorm_modulate(v["x"], v["weight"], v["shift"], v["scale"], EPS, out),)
            args = (v["x"], v["branch"], v["gate"], v["weight"], v["shift"], v["scale"], EPS, out, v.get("branch_bias"))
            return table.residual_rmsnorm_modulate(*args) if drop is None else table.residual_rmsnorm_modulate(
                *args, drop)

        return CaseData({k: v.to(device) for k, v in t.items()}, tuple(t), ("x_out", "y") if residual else ("y",),
                        up, call)

    return OpCase(entry, label, make, kind)


def _cases(sizes) -> list[OpCase]:
    b, n = sizes.norm_batch, sizes.tokens
    out = []
    for d in sizes.widths:
        out += [_case("rmsnorm_modulate", b, n, d), _case("residual_rmsnorm_modulate", b, n, d),
                _case("residual_rmsnorm_modulate", b, n, d, bias=True)]
    d = sizes.widths[-1]
    return out + [_case("rmsnorm_modulate", b, n, d, kind="determinism"),
                  _case("residual_rmsnorm_modulate", b, n, d, bias=True, kind="determinism"),
                  _case("residual_rmsnorm_modulate", b, n, d, bias=True, dropout_site=5, kind="dropout")]


SPEC = OpSpec(
    name="rmsnorm_modulate",
    entries={"rmsnorm_modulate": rmsnorm_modulate, "residual_rmsnorm_modulate": residual_rmsnorm_modulate},
    library_ops=LIBRARY_OPS,
    compile_jobs=compile_jobs,
    cases=_cases,
)
