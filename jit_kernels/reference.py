"""Eager ground truth for every fused op of the JiT block.

These functions reproduce the official JiT numerics op for op (including the dtype
promotions that happen under bf16 autocast), so `kernels="torch"` is the official model.
With the eager backward of each fused op (`*_bwd`, same contract as the Triton backward
launch) they are the whole eager contract: the CPU kernels of the custom ops (outside the
Triton interpreter) and the reference the Triton kernels are tested against. No Triton here.
The fused dropout (`dropout=`, a `jit_kernels.dropout.Dropout`) draws the kernels' own masks through the CPU twin,
so a comparison applies the identical mask on both sides; the official model keeps `nn.Dropout` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jit_kernels.dropout import Dropout
from jit_kernels.dropout import apply as apply_dropout


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm as the official release computes it: fp32 statistics, weight, cast back."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h).to(dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation with per-sample (B, D) shift and scale over (B, N, D) tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _cast(y: torch.Tensor, out_dtype: torch.dtype | None) -> torch.Tensor:
    return y if out_dtype is None else y.to(out_dtype)


def rmsnorm_modulate(
    x: torch.Tensor,
    weight: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y = modulate(RMSNorm(x), shift, scale), optionally cast to `out_dtype` (the GEMM input dtype)."""
    return _cast(modulate(rms_norm(x, weight, eps), shift, scale), out_dtype)


def residual_rmsnorm_modulate(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    out_dtype: torch.dtype | None = None,
    branch_bias: torch.Tensor | None = None,
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual then norm+modulate: x_out = x + gate * drop(branch + branch_bias), y = modulate(RMSNorm(x_out))
    (drop: the fused dropout of `dropout`, if given)."""
    x_out = gated_residual(x, branch, gate, branch_bias, dropout)
    return x_out, rmsnorm_modulate(x_out, weight, shift, scale, eps, out_dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation (x[2i], x[2i+1]) -> (-x[2i+1], x[2i])."""
    x = x.unflatten(-1, (-1, 2))
    return torch.stack((-x[..., 1], x[..., 0]), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, N, H, Dh) by per-token tables (N, Dh); fp32 tables promote like the official code."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return x * cos + rotate_half(x) * sin


def qk_norm_rope(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the qkv GEMM output (B, N, 3*H*Dh) into q, k, v of shape (B, N, H, Dh).

    q and k get RMSNorm over the head dim and 2D RoPE; they are returned in qkv's dtype,
    which is what attention under autocast would cast them to anyway. With `bias` (the qkv
    GEMM's, left out of it) qkv + bias is formed in fp32 (float64 for float64 qkv) and q, k, v
    come out of it, rounded once to qkv's dtype: the fused op's contract.
    """
    if bias is not None:
        acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
        q, k, v = qk_norm_rope(qkv.to(acc) + bias.to(acc), q_weight, k_weight, cos, sin, num_heads, eps)
        return q.to(qkv.dtype), k.to(qkv.dtype), v.to(qkv.dtype)
    b, n, three_c = qkv.shape
    head_dim = three_c // (3 * num_heads)
    q, k, v = qkv.view(b, n, 3, num_heads, head_dim).unbind(2)
    q = apply_rope(rms_norm(q, q_weight, eps), cos, sin).to(qkv.dtype)
    k = apply_rope(rms_norm(k, k_weight, eps), cos, sin).to(qkv.dtype)
    return q, k, v


def linear_qk_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qk_norm_rope(x @ weight.T + bias): the qkv GEMM (bias in its epilogue) as the official attention runs it."""
    return qk_norm_rope(F.linear(x, weight, bias), q_weight, k_weight, cos, sin, num_heads, eps)


def swiglu(x12: torch.Tensor, bias: torch.Tensor | None = None, dropout: Dropout | None = None) -> torch.Tensor:
    """h = silu(x1) * x2 where x1, x2 are the two halves of the w12 output (then dropped out with `dropout`).

    With `bias` (the w12 bias of a GEMM run without it) or `dropout` the result is formed in fp32 (float64
    for float64 input) and returned in x12's dtype: the fused op's contract.
    """
    if bias is not None or dropout is not None:
        acc = torch.float64 if x12.dtype == torch.float64 else torch.float32
        x = x12.to(acc) if bias is None else x12.to(acc) + bias.to(acc)
        return apply_dropout(swiglu(x), dropout).to(x12.dtype)
    x1, x2 = x12.chunk(2, dim=-1)
    return F.silu(x1) * x2


def linear_swiglu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dropout: Dropout | None = None
) -> torch.Tensor:
    """swiglu(x @ weight.T + bias): the w12 GEMM (bias in its epilogue) and SwiGLU, as the official MLP."""
    return swiglu(F.linear(x, weight, bias), None, dropout)


def gated_residual(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout: Dropout | None = None,
) -> torch.Tensor:
    """x + gate * branch with a per-sample (B, D) gate, as the official block adds it.

    With `bias` (the branch GEMM's bias, left out of that GEMM) or `dropout` (of branch + bias) the whole
    expression is formed in fp32 (float64 for float64 x) and rounded once to the dtype x + gate * branch would
    have: the fused contract.
    """
    if bias is None and dropout is None:
        return x + gate.unsqueeze(1) * branch
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    full = branch.to(acc) if bias is None else branch.to(acc) + bias.to(acc)
    out = x.to(acc) + gate.to(acc).unsqueeze(1) * apply_dropout(full, dropout)
    return out.to(torch.promote_types(torch.promote_types(x.dtype, gate.dtype), branch.dtype))


def branch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GEMM closing a residual branch, bias in its epilogue as the official model has it.

    Returns (output, bias still to add): None here; the fused table's version (`branch_linear_deferred_bias`)
    returns the bias instead, for the residual op it feeds.
    """
    return F.linear(x, weight, bias), None


def branch_linear_deferred_bias(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fused table's `branch_linear`: the GEMM closing a residual branch run without its bias; returns (output,
    bias) for the next residual op to add (same result as `branch_linear`, the bias added in fp32 by that op)."""
    return F.linear(x, weight), bias


# ---------------------------------------------------------------------------------------------
# Backward contract of the fused ops: what their custom backward ops compute (the CPU kernels outside the
# Triton interpreter), in fp32 (float64 for float64 inputs).


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
    dropout: Dropout | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Eager backward of (residual_)rmsnorm_modulate with the contract of the Triton `rmsnorm_modulate_bwd` (fp32 math).

    Returns (dx, dbranch, dgate, dweight, dshift, dscale, dbias); dbranch and dgate are None without a residual,
    dbias without a branch bias. `x_norm` is the tensor that was normalized (x_out for the residual variant);
    `dropout` is the forward's, its mask applied to the gradient flowing into the branch.
    """
    acc = torch.float64 if x_norm.dtype == torch.float64 else torch.float32
    x = x_norm.to(acc)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x * rstd
    g = dy.to(acc)
    w = weight.to(acc)
    scale1 = 1 + scale.to(acc)
    s = (g * xhat).sum(1)
    dxhat = g * (w * scale1).unsqueeze(1)
    dx = (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True)) * rstd
    if dx_out is not None:
        dx = dx + dx_out.to(acc)
    dweight = (s * scale1).sum(0).to(weight.dtype)
    dshift = g.sum(1).to(shift_dtype)
    dscale = (s * w).to(scale.dtype)
    if branch is None:
        return dx.to(x_dtype), None, None, dweight, dshift, dscale, None
    dx_branch = apply_dropout(dx, dropout)
    dbranch = dx_branch * gate.to(acc).unsqueeze(1)
    full_branch = branch.to(acc) if branch_bias is None else branch.to(acc) + branch_bias.to(acc)
    dgate = (dx_branch * full_branch).sum(1).to(gate.dtype)
    dbias = None if branch_bias is None else dbranch.sum((0, 1)).to(branch_bias.dtype)
    return dx.to(x_dtype), dbranch.to(branch.dtype), dgate, dweight, dshift, dscale, dbias


def rotate_half_t(g: torch.Tensor) -> torch.Tensor:
    """Transpose of `rotate_half`: (g[2i], g[2i+1]) -> (g[2i+1], -g[2i])."""
    g = g.unflatten(-1, (-1, 2))
    return torch.stack((g[..., 1], -g[..., 0]), dim=-1).flatten(-2)


def qk_norm_rope_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Eager backward of qk_norm_rope with the contract of the Triton `qk_norm_rope_bwd` (fp32 math):
    (dqkv, dq_weight, dk_weight, dbias or None) from the gradients of q, k, v."""
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    b, n, _ = qkv.shape
    x = qkv.to(acc) if bias is None else qkv.to(acc) + bias.to(acc)
    x = x.view(b, n, 3, num_heads, -1)
    cos_, sin_ = cos.to(acc)[:, None, :], sin.to(acc)[:, None, :]
    grads = []
    for i, (dy, w) in enumerate(((dq, q_weight), (dk, k_weight))):
        xi = x[:, :, i]
        rstd = torch.rsqrt(xi.pow(2).mean(-1, keepdim=True) + eps)
        xhat = xi * rstd
        g = dy.to(acc)
        dn = g * cos_ + rotate_half_t(g * sin_)
        gw = dn * w.to(acc)
        dx = (gw - xhat * (gw * xhat).mean(-1, keepdim=True)) * rstd
        grads.append((dx, (dn * xhat).sum((0, 1, 2)).to(w.dtype)))
    dqkv = torch.stack((grads[0][0], grads[1][0], dv.to(acc)), dim=2).flatten(2)
    dbias = None if bias is None else dqkv.sum((0, 1)).to(bias.dtype)
    return dqkv.to(qkv.dtype), grads[0][1], grads[1][1], dbias


def swiglu_bwd(
    x12: torch.Tensor, bias: torch.Tensor | None, dout: torch.Tensor, dropout: Dropout | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager backward of swiglu with the contract of the Triton `swiglu_bwd` (fp32 math): (dx12, dbias or None);
    `dropout` is the forward's, its mask applied to dout."""
    acc = torch.float64 if x12.dtype == torch.float64 else torch.float32
    x = x12.to(acc) if bias is None else x12.to(acc) + bias.to(acc)
    x1, x2 = x.chunk(2, dim=-1)
    g = apply_dropout(dout.to(acc), dropout)
    s = torch.sigmoid(x1)
    dx12 = torch.cat((g * x2 * s * (1 + x1 * (1 - s)), g * x1 * s), dim=-1)
    dbias = None if bias is None else dx12.flatten(0, -2).sum(0).to(bias.dtype)
    return dx12.to(x12.dtype), dbias
