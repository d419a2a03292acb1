"""Fused dropout's mask contract and its CPU twin (torch, no Triton): the masks the kernels draw, bit for bit.

A dropout site (the attention branch or the SwiGLU output of one block) views its tensor as (M rows, C columns):
the flattened leading dims by the last dim. Element (m, c) is kept iff u >= p, where u is word c % 4 of
Philox4x32-10 (Salmon et al., SC'11; Triton's `tl.philox`) with key = the 64-bit seed (low word first) and counter
(q mod 2^32, q >> 32, 0, 0), q = (site << 40) + m * ceil(C / 4) + c // 4, converted to a float the way
`tl.rand4x` converts its words: the word as int32, negatives complemented (~w), times 4.6566127342e-10 in fp32.
Kept elements are scaled by 1 / (1 - p). The mask depends only on (seed, site, m, c, C, p): not on the tile a
kernel program covers, the launch config, or the pass (forward and backward draw the same mask, none is stored).

`keep_mask` is the twin: the same words from int64 torch arithmetic (32-bit products split into 16-bit halves,
so nothing overflows). The custom ops' CPU kernels outside Triton's interpreter use it, and the tests check it
against the interpreted kernels and against Random123's known-answer vectors for Philox4x32-10.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_M32 = 0xFFFFFFFF
PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
PHILOX_ROUNDS = 10
UNIFORM_SCALE = 4.6566127342e-10  # tl.rand's int32 -> [0, 1) factor (applied in fp32)
SITE_SHIFT = 40  # the site id occupies the counter bits above 2^40 words (4.4e12 elements per site)
MAX_SITE = (1 << (63 - SITE_SHIFT)) - 1


class Dropout(NamedTuple):
    """One fused dropout site: drop probability `p`, Philox key `seed` (an int64 tensor of one element, read by the
    kernel on the device, so a new value per step needs neither a recompile nor a new CUDA graph) and `site`
    (which mask of the step: blocks and sites use disjoint Philox counters)."""

    p: float
    seed: torch.Tensor
    site: int

    @property
    def scale(self) -> float:
        """Factor of the kept elements, 1 / (1 - p)."""
        return 1.0 / (1.0 - self.p)


def from_op_args(seed: torch.Tensor | None, site: int, p: float) -> Dropout | None:
    """The custom ops' (dropout_seed, dropout_site, dropout_p) arguments as a `Dropout` (None: no seed, or p = 0)."""
    return None if seed is None or p == 0 else Dropout(p, seed, site)


def check_dropout(dropout: Dropout, device: torch.device) -> None:
    """Raise ValueError unless `dropout` is a valid site for tensors on `device`."""
    p, seed, site = dropout
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if not 0 <= site <= MAX_SITE:
        raise ValueError(f"dropout site must be in [0, {MAX_SITE}], got {site}")
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError("dropout seed must be an int64 tensor of one element")
    if seed.device != device:
        raise ValueError(f"dropout seed is on {seed.device}, the operands on {device}")


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for uint32 values `a` (held in int64) and a uint32 constant `b`."""
    lo = a * (b & 0xFFFF)
    t = a * (b >> 16) + (lo >> 16)
    return t >> 16, ((t & 0xFFFF) << 16) | (lo & 0xFFFF)


def philox4x32(
    key: tuple[int, int], c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor,
    rounds: int = PHILOX_ROUNDS,
) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 counter words; returns the four output words (uint32 in int64)."""
    k0, k1 = key
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(c2, PHILOX_ROUND[1])
        hi_a, lo_a = _mulhilo(c0, PHILOX_ROUND[0])
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + PHILOX_KEY[0]) & _M32, (k1 + PHILOX_KEY[1]) & _M32
    return c0, c1, c2, c3


def uniform(words: torch.Tensor) -> torch.Tensor:
    """Philox words (uint32 in int64) -> fp32 uniforms in [0, 1), exactly as `tl.rand4x` converts them."""
    signed = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return torch.where(signed < 0, ~signed, signed).to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)


def keep_mask(dropout: Dropout, rows: int, cols: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (rows, cols) keep mask of `dropout` (see the module docstring), computed on `device` (default: the
    seed's). Bit-identical to the kernels' masks."""
    seed = int(dropout.seed.reshape(()).item()) & ((1 << 64) - 1)
    device = dropout.seed.device if device is None else device
    quads = -(-cols // 4)
    q = (dropout.site << SITE_SHIFT) + torch.arange(rows, device=device, dtype=torch.int64)[:, None] * quads
    q = q + torch.arange(quads, device=device, dtype=torch.int64)[None, :]
    zero = torch.zeros_like(q)
    words = philox4x32((seed & _M32, seed >> 32), q & _M32, q >> 32, zero, zero)
    u = uniform(torch.stack(words, dim=-1).reshape(rows, 4 * quads)[:, :cols])
    return u >= torch.tensor(dropout.p, dtype=torch.float32)


def apply(t: torch.Tensor, dropout: Dropout | None) -> torch.Tensor:
    """`t` with the dropout of `dropout` applied over its (M, C) view (kept elements scaled), in `t`'s dtype; the
    reference implementations compute in fp32 or float64 and call this on their accumulator."""
    if dropout is None:
        return t
    keep = keep_mask(dropout, t.numel() // t.shape[-1], t.shape[-1], t.device).reshape(t.shape)
    return torch.where(keep, t * dropout.scale, torch.zeros((), dtype=t.dtype, device=t.device))
