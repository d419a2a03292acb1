"""Inputs of the fused-op boundaries at JiT block shapes, shared by CPU, GPU and counting benchmarks.

Dtypes follow a bf16-autocast training step: the residual stream x is fp32, GEMM outputs (branch,
adaLN chunks, qkv, w12 output) are bf16, norm weights and RoPE tables are fp32.
"""

from __future__ import annotations

import torch

from jit_fast.configs import model_config
from jit_fast.embeddings import rope_tables

OP_NAMES = ("rmsnorm_modulate", "residual_rmsnorm_modulate", "qk_norm_rope", "swiglu")


def op_inputs(
    model: str = "JiT-B/16",
    batch: int = 2,
    img_size: int = 256,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    requires_grad: bool = False,
    seed: int = 0,
) -> dict[str, tuple]:
    """Positional arguments of each op-table function for one block of `model` (in-context tokens included)."""
    cfg = model_config(model, img_size=img_size)
    n, d, h = cfg.grid_size**2 + cfg.in_context_len, cfg.hidden_size, cfg.mlp_hidden
    g = torch.Generator().manual_seed(seed)

    def act(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_(requires_grad)

    def param(size: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(size, generator=g)).to(device).requires_grad_(requires_grad)

    cos, sin = (t.to(device) for t in rope_tables(cfg.head_dim, cfg.grid_size, cfg.in_context_len))
    eps = 1e-6
    return {
        "rmsnorm_modulate": (act(batch, n, d, dt=torch.float32), param(d), act(batch, d), act(batch, d), eps, dtype),
        "residual_rmsnorm_modulate": (
            act(batch, n, d, dt=torch.float32), act(batch, n, d), act(batch, d), param(d), act(batch, d),
            act(batch, d), eps, dtype,
        ),
        "qk_norm_rope": (act(batch, n, 3 * d), param(cfg.head_dim), param(cfg.head_dim), cos, sin, cfg.num_heads, eps),
        "swiglu": (act(batch, n, 2 * h),),
    }
