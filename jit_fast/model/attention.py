"""Attention behind one function: flash-attn on CUDA when installed and the GPU supports it, else PyTorch SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere and newer; Turing (T4) and Volta get SDPA


def flash_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether flash-attn takes these inputs: installed, fp16 / bf16 CUDA tensors of one dtype, an sm_80+ GPU."""
    if flash_attn_func is None or not q.is_cuda or v.dtype not in (torch.float16, torch.bfloat16):
        return False
    if not q.dtype == k.dtype == v.dtype:
        return False
    props = torch.cuda.get_device_properties(q.device)
    return (props.major, props.minor) >= FLASH_MIN_CAPABILITY


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention over (B, N, H, D) tensors, returning (B, N, H, D)."""
    if flash_supported(q, k, v):
        return flash_attn_func(q, k, v, dropout_p=dropout_p)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)
