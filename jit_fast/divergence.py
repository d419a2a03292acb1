"""When a training run has diverged: a non-finite loss or gradient, exploded weights, or a loss that stays far above
its own running average. `TrainingDiverged` stops the run before it saves, so the last good checkpoint is kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class LossWatch:
    """Running average of the logged loss; `observe` names a sustained explosion.

    A logged loss above `factor` x the average of the losses before it, at `patience` consecutive log points, is an
    explosion (one spike is not: the average is not updated by a suspect loss, so a spike cannot raise the bar).
    The first `warmup` log points only build the average. `patience` 0 turns the check off. The average is not
    checkpointed: a resumed run warms it up again."""

    factor: float = 10.0
    patience: int = 3
    warmup: int = 5
    decay: float = 0.9
    average: float | None = field(default=None, init=False)
    seen: int = field(default=0, init=False)
    strikes: int = field(default=0, init=False)

    def observe(self, loss: float) -> str | None:
        """Take one logged (finite) loss; the reason the run exploded, or None."""
        if self.patience <= 0 or not math.isfinite(loss):
            return None
        self.seen += 1
        if self.average is not None and self.seen > self.warmup and loss > self.factor * self.average:
            self.strikes += 1
            if self.strikes >= self.patience:
                return (f"loss {loss:.4g} stayed above {self.factor:g} x its running average {self.average:.4g} for "
                        f"{self.strikes} log points")
            return None
        self.strikes = 0
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        return None
