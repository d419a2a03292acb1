"""The divergence guard's loss watch: a sustained explosion against the running average stops a run, noise and a
single spike do not, a slow climb does (issue: `--lr 1` drove the loss to ~96,656 and the run exited 0)."""

from __future__ import annotations

import random

from jit_fast.train.divergence import LossWatch


def feed(watch: LossWatch, losses: list[float]) -> list[str]:
    return [r for r in (watch.observe(x) for x in losses) if r]


def test_noisy_healthy_losses_never_trip():
    rng = random.Random(0)
    losses = [0.8 * 0.999**i * (1 + 0.5 * rng.random()) for i in range(2000)]
    assert feed(LossWatch(), losses) == []


def test_one_spike_is_not_divergence():
    assert feed(LossWatch(), [0.5] * 20 + [50.0] + [0.5] * 20 + [60.0, 0.5, 70.0] + [0.5] * 5) == []


def test_sustained_explosion_trips_at_the_patience_point():
    watch = LossWatch(factor=10, patience=3)
    reasons = [watch.observe(x) for x in [0.5] * 20 + [96656.0] * 5]
    first = next(i for i, r in enumerate(reasons) if r)
    assert first == 22 and "9.666e+04" in reasons[first] and "10 x its lowest running average 0.5" in reasons[first]


def test_a_slow_climb_is_caught_though_the_average_follows_it():
    """As with --lr 1: the loss climbs by a factor per log point; against the average alone it would never stand
    out (the average climbs with it)."""
    assert feed(LossWatch(), [0.5 * 1.3**i for i in range(13)])[0].startswith("loss 11.65 stayed above 10 x")


def test_warmup_and_off_switch():
    assert feed(LossWatch(warmup=5), [0.5, 500.0, 500.0, 500.0]) == []  # still building the average
    assert feed(LossWatch(patience=0), [0.5] * 10 + [1e6] * 10) == []
