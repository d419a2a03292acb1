"""Eager ground truth for every fused op of the JiT block.

These functions reproduce the official JiT numerics op for op (including the dtype
promotions that happen under bf16 autocast), so `kernels="torch"` is the official model.
They are also the CPU implementation of the custom ops and the reference the Triton
kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual then norm+modulate: x_out = x + gate * (branch + branch_bias), y = modulate(RMSNorm(x_out))."""
    x_out = gated_residual(x, branch, gate, branch_bias)
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


def swiglu(x12: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """h = silu(x1) * x2 where x1, x2 are the two halves of the w12 output.

    With `bias` (the w12 bias of a GEMM run without it) the sum is formed in fp32 (float64 for
    float64 input) and h is returned in x12's dtype: the fused op's contract.
    """
    if bias is not None:
        acc = torch.float64 if x12.dtype == torch.float64 else torch.float32
        return swiglu(x12.to(acc) + bias.to(acc)).to(x12.dtype)
    x1, x2 = x12.chunk(2, dim=-1)
    return F.silu(x1) * x2


def linear_swiglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """swiglu(x @ weight.T + bias): the w12 GEMM (bias in its epilogue) and SwiGLU, as the official MLP."""
    return swiglu(F.linear(x, weight, bias))


def gated_residual(
    x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x + gate * branch with a per-sample (B, D) gate, as the official block adds it.

    With `bias` (the branch GEMM's bias, left out of that GEMM) the whole expression is formed in fp32
    (float64 for float64 x) and rounded once to the dtype x + gate * branch would have: the fused contract.
    """
    if bias is None:
        return x + gate.unsqueeze(1) * branch
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = x.to(acc) + gate.to(acc).unsqueeze(1) * (branch.to(acc) + bias.to(acc))
    return out.to(torch.promote_types(torch.promote_types(x.dtype, gate.dtype), branch.dtype))


def branch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GEMM closing a residual branch, bias in its epilogue as the official model has it.

    Returns (output, bias still to add): None here; the fused table's version
    (`kernels.rmsnorm_modulate.branch_linear`) returns the bias instead, for the residual op it feeds.
    """
    return F.linear(x, weight, bias), None
