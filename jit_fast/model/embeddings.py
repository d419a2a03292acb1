"""Fixed embeddings of JiT: 2D sin-cos positions, timestep sinusoids, 2D RoPE tables."""

from __future__ import annotations

import math

import numpy as np
import torch


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[sin, cos] of pos / 10000^(k / (dim/2)) for k < dim/2, in float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) MAE-style table: first half encodes the column, second half the row."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B, dim) sinusoid of t in [0, 1] (not scaled), cosine half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def rope_tables(head_dim: int, grid: int, num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (num_prefix + grid*grid, head_dim) for 2D RoPE on a grid of patches.

    The first half of each head rotates with the row index, the second half with the column;
    each frequency 1/10000^(2i/(head_dim/2)) is repeated for an interleaved pair. Prefix
    (in-context) tokens get the identity rotation.
    """
    half = head_dim // 2
    freqs = 1.0 / 10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half)
    pos = torch.arange(grid) / grid * grid  # the official table's positions, rounding included
    f = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (grid, half)
    rows = f[:, None, :].expand(grid, grid, half)
    cols = f[None, :, :].expand(grid, grid, half)
    ang = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    cos, sin = ang.cos(), ang.sin()
    if num_prefix:
        cos = torch.cat([torch.ones(num_prefix, head_dim), cos])
        sin = torch.cat([torch.zeros(num_prefix, head_dim), sin])
    return cos, sin
