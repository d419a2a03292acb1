"""Attention behind one function: flash-attn on CUDA when installed, else PyTorch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention over (B, N, H, D) tensors, returning (B, N, H, D)."""
    if (
        flash_attn_func is not None
        and q.is_cuda
        and v.dtype in (torch.float16, torch.bfloat16)
        and q.dtype == v.dtype == k.dtype
    ):
        return flash_attn_func(q, k, v, dropout_p=dropout_p)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)

