"""fp16 loss scaling (`jit_fast.train.loss_scale.LossScaler`) on its own: the logged window statistics and the resumed
state. The training-loop tests log every step (windows of one step), where the per-window arithmetic cannot show."""

from __future__ import annotations

import math

import torch

from jit_fast.train.loss_scale import INIT_SCALE, LossScaler


def scaler_steps(scaler: LossScaler, w: torch.nn.Parameter, overflow: list[bool]) -> None:
    """One loss-scaled step of loss = sum(w) per entry of `overflow`: True makes that step's gradient inf."""
    for bad in overflow:
        scaler.opt.zero_grad(set_to_none=True)
        loss = (w * (math.inf if bad else 1.0)).sum()
        scaler.scale(loss).backward()
        scaler.unscale()
        scaler.step()


def new_scaler() -> tuple[LossScaler, torch.nn.Parameter]:
    w = torch.nn.Parameter(torch.ones(3))
    return LossScaler(True, torch.device("cpu"), torch.optim.SGD([w], lr=0.1)), w


def test_window_averages_the_grad_norm_over_its_applied_steps() -> None:
    """A window of 4 steps with one skipped (norm 0 in the meters) logs the mean over its 3 applied steps; the next
    window counts only its own skipped steps."""
    scaler, w = new_scaler()
    scaler_steps(scaler, w, [False, True, False, False])
    assert scaler.window(6.0 / 4, 4) == (2.0, {"skipped_steps": 1.0, "loss_scale": INIT_SCALE / 2})
    scaler_steps(scaler, w, [False, False])
    assert scaler.window(2.0, 2) == (2.0, {"skipped_steps": 1.0, "loss_scale": INIT_SCALE / 2})


def test_resumed_scaler_continues_scale_growth_tracker_and_skipped_count() -> None:
    """A scaler loaded from a saved state has the saved scale and growth tracker, and its first window counts only
    the steps it skipped itself (not the run's earlier ones again)."""
    scaler, w = new_scaler()
    scaler_steps(scaler, w, [False, True, False, False])
    scaler.window(1.5, 4)
    resumed, w2 = new_scaler()
    resumed.load_state_dict(scaler.state_dict())
    assert resumed.scaler.state_dict() == scaler.scaler.state_dict()
    assert resumed.scaler.state_dict()["_growth_tracker"] == 2
    scaler_steps(resumed, w2, [False, True, False])
    assert resumed.window(4.0 / 3, 3) == (2.0, {"skipped_steps": 2.0, "loss_scale": INIT_SCALE / 4})
