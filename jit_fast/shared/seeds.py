"""Counter-based seeds: a draw depends only on the integers that name it, never on batching or ranks.

Two mixers, kept bit-identical to what existing runs recorded (changing either changes stored results):
`mix_seed` (splitmix64 chain) seeds training draws, so a resumed run continues draw-for-draw;
`image_seed` (NumPy SeedSequence) seeds sampling noise, so a seed gives the same samples.npz.
`dropout_seed` is the Philox key of the fused dropout masks of one forward (`JiT.set_dropout_seed`).
"""

from __future__ import annotations

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a sequence of integers (splitmix64 chain); cheap and well mixed."""
    h = _GOLDEN
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = (h + _GOLDEN) & _MASK64
        z = h
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h >> 1


# Domain tag of `dropout_seed`: its draws are independent of every other mix_seed chain of the same integers.
DROPOUT_TAG = 0x4A69545F44524F50  # "JiT_DROP"


def dropout_seed(seed: int, step: int, rank: int, micro: int = 0) -> int:
    """Key of the fused dropout masks of one forward: training `seed`, optimizer `step`, `rank` (each rank drops
    independently for its own samples) and gradient-accumulation `micro`-step. Blocks and sites share it and
    draw from disjoint Philox counters (`jit_kernels.dropout`), so one key per forward names every mask; a resumed run
    gets the same keys, hence the same masks, as an uninterrupted one."""
    return mix_seed(seed, step, rank, micro, DROPOUT_TAG)


def image_seed(seed: int, index: int) -> int:
    """Independent 63-bit seed for image `index` of run `seed` (independent of batching)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
