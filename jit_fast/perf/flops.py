"""FLOP rules of the counted ops: GEMMs and convolutions from their aten arguments, softmax attention."""

from __future__ import annotations

import math

import torch


def gemm_flops(name: str, args: tuple) -> int:
    """Multiply-add FLOPs (2 per MAC) of a GEMM or convolution aten op from its argument shapes."""
    if name == "mm":
        a, b = args[0], args[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name == "addmm":
        a, b = args[1], args[2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name == "convolution":
        x, w = args[0], args[1]
        n_out = x.shape[0] * w.shape[0] * math.prod(_conv_out_hw(x, w, args[3], args[4], args[5]))
        return 2 * n_out * math.prod(w.shape[1:])
    if name == "convolution_backward":
        grad_out, w, mask = args[0], args[2], args[10]
        per = 2 * grad_out.numel() * math.prod(w.shape[1:])
        return per * (int(mask[0]) + int(mask[1]))
    raise ValueError(f"no FLOP rule for {name}")


def _conv_out_hw(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation) -> list[int]:
    spatial = x.shape[2:]
    return [
        (spatial[i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
        for i in range(len(spatial))
    ]


def attention_flops(q: torch.Tensor, k: torch.Tensor, heads_dim: int) -> int:
    """Forward FLOPs 4*B*H*Nq*Nk*Dh of softmax attention (QK^T and PV); `heads_dim` is H's axis in q."""
    b, dh = q.shape[0], q.shape[-1]
    h = q.shape[heads_dim]
    nq = q.shape[2] if heads_dim == 1 else q.shape[1]
    nk = k.shape[2] if heads_dim == 1 else k.shape[1]
    return 4 * b * h * nq * nk * dh
