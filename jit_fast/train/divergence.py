"""When a training run has diverged: a non-finite loss or gradient, exploded weights, or a loss that stays far above
its own running average. `TrainingDiverged` stops the run before it saves, so the last good checkpoint is kept."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from jit_fast.configs import TrainConfig
from jit_fast.train.state import MAX_WEIGHT_ABS


def divergence_reason(loss: float, gnorm: float, exploded: bool) -> str | None:
    """Why the logged window diverged (a non-finite loss or grad norm, exploded weights), else None."""
    if not (math.isfinite(loss) and math.isfinite(gnorm)):
        return f"loss {loss} / grad norm {gnorm} is not finite"
    if exploded:
        return f"weights exploded (|x| > {MAX_WEIGHT_ABS:g} in a parameter or EMA; loss {loss:.4g})"
    return None


@dataclass
class LossWatch:
    """Running average of the logged loss and the lowest it has been; `observe` names a sustained explosion.

    A logged loss above `factor` x the lowest running average so far, at `patience` consecutive log points, is an
    explosion. One spike is not (a normal loss between spikes resets the count), and a loss that climbs slowly is
    caught too: the average follows it, its lowest value does not. The first `warmup` log points only build the
    average. `patience` 0 turns the check off. Nothing is checkpointed: a resumed run warms up again."""

    factor: float = 10.0
    patience: int = 3
    warmup: int = 5
    decay: float = 0.9
    average: float | None = field(default=None, init=False)
    floor: float = field(default=math.inf, init=False)
    seen: int = field(default=0, init=False)
    strikes: int = field(default=0, init=False)

    @classmethod
    def of(cls, cfg: TrainConfig, history: list[float]) -> LossWatch:
        """The watch a run's config asks for (`--loss-explosion 0`: off), fed the losses it already logged."""
        watch = cls(cfg.loss_explosion, cfg.loss_explosion_logs if cfg.loss_explosion else 0)
        for loss in history:
            watch.observe(loss)
        return watch

    def observe(self, loss: float) -> str | None:
        """Take one logged (finite) loss; the reason the run exploded, or None."""
        if self.patience <= 0 or not math.isfinite(loss):
            return None
        self.seen += 1
        self.strikes = self.strikes + 1 if self.seen > self.warmup and loss > self.factor * self.floor else 0
        if self.strikes >= self.patience:
            return (f"loss {loss:.4g} stayed above {self.factor:g} x its lowest running average {self.floor:.4g} "
                    f"for {self.strikes} log points")
        self.average = loss if self.average is None else self.decay * self.average + (1 - self.decay) * loss
        if self.seen >= self.warmup:
            self.floor = min(self.floor, self.average)
        return None


def logged_losses(path: Path) -> list[float]:
    """The training losses a run's metrics.jsonl holds, in order (rows of other kinds and unreadable lines skipped:
    the file is only a hint for the watch, never trusted to be well formed)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        loss = row.get("loss") if isinstance(row, dict) and "kind" not in row else None
        if isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss):
            out.append(float(loss))
    return out
