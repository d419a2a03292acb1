"""Sample order shared by every backend: per-epoch full reshuffle, rank sharding, drop-last, flips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_ORDER_STREAM = 0
_FLIP_STREAM = 1


@dataclass(frozen=True)
class EpochPlan:
    """One rank's batches for one epoch: dataset indices and horizontal-flip flags, both (batches, B)."""

    indices: np.ndarray
    flips: np.ndarray

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def tail(self, start: int) -> EpochPlan:
        """The plan from batch `start` on (used to resume mid-epoch)."""
        return EpochPlan(self.indices[start:], self.flips[start:])


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, stream])))


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int = 1) -> int:
    """Batches each rank gets per epoch; the ragged last global batch is dropped."""
    return num_samples // (batch_size * world_size)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Global sample order for an epoch: a full permutation from (seed, epoch), or 0..N-1 unshuffled."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return _rng(seed, epoch, _ORDER_STREAM).permutation(num_samples).astype(np.int64)


def flip_flags(num_samples: int, seed: int, epoch: int, flip: bool = True) -> np.ndarray:
    """Per-sample horizontal-flip flags for an epoch, indexed by dataset index (world-size independent)."""
    if not flip:
        return np.zeros(num_samples, dtype=bool)
    return _rng(seed, epoch, _FLIP_STREAM).random(num_samples) < 0.5


def plan_epoch(
    num_samples: int,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
    flip: bool = True,
) -> EpochPlan:
    """Rank `rank`'s batches: global batch j holds order[j*W*B:(j+1)*W*B], dealt round-robin to ranks.

    The union over ranks of step j is therefore the same for any world size with equal global batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    nb = batches_per_epoch(num_samples, batch_size, world_size)
    order = epoch_order(num_samples, seed, epoch, shuffle)[: nb * batch_size * world_size]
    mine = order[rank::world_size].reshape(nb, batch_size)
    return EpochPlan(mine, flip_flags(num_samples, seed, epoch, flip)[mine])
