"""The JiT objective: x-prediction network trained with a velocity (v) loss.

t ~ sigmoid(N(P_mean, P_std)); z = t x + (1 - t) e with e = noise_scale * N(0, I);
v = (x - z) / max(1 - t, t_eps) and the same map turns the predicted x into v_pred.
The paper's eps- and v-prediction (the net outputs e or v, still trained with the v-loss) are
selected by `prediction`; JiT itself is x-prediction, the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from jit_fast.shared.conditioning import Condition, drop_condition

Net = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]
Prediction = Literal["x", "eps", "v"]
PREDICTIONS: tuple[str, ...] = ("x", "eps", "v")


def sample_t(n: int, P_mean: float = -0.8, P_std: float = 0.8, device=None, generator=None) -> torch.Tensor:
    """Logit-normal training times in (0, 1)."""
    return torch.sigmoid(torch.randn(n, device=device, generator=generator) * P_std + P_mean)


def x_to_v(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """Velocity implied by an x prediction at time t (broadcast over image dims)."""
    return (x_pred - z) / (1 - t).clamp_min(t_eps)


def eps_to_v(eps_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """Velocity implied by a noise prediction: (z - eps) / max(t, t_eps), the mirror of `x_to_v`'s clamp."""
    return (z - eps_pred) / t.clamp_min(t_eps)


def to_velocity(
    out: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float, prediction: Prediction = "x"
) -> torch.Tensor:
    """Velocity implied by the net's output `out` when it predicts x, eps or v (the paper's Tab. 1, row 3)."""
    if prediction == "x":
        return x_to_v(out, z, t, t_eps)
    if prediction == "eps":
        return eps_to_v(out, z, t, t_eps)
    if prediction == "v":
        return out
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def flow_matching_loss(
    net: Net,
    x: torch.Tensor,
    y: Condition,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    drop: torch.Tensor | None = None,
    P_mean: float = -0.8,
    P_std: float = 0.8,
    noise_scale: float = 1.0,
    t_eps: float = 0.05,
    label_drop_prob: float = 0.1,
    num_classes: int = 1000,
    prediction: Prediction = "x",
) -> torch.Tensor:
    """Mean squared v-error of `net` on clean images x (B, C, H, W) in [-1, 1] with labels (or captions) y.

    `t` (B,), `noise` (standard normal, like x) and `drop` (bool (B,)) may be given to
    reproduce a draw exactly; otherwise they are sampled in that order from the global RNG.
    `prediction` says what the net outputs (x for JiT; eps or v for the paper's toy comparison).
    """
    b = x.shape[0]
    if t is None:
        t = sample_t(b, P_mean, P_std, device=x.device)
    if noise is None:
        noise = torch.randn_like(x)
    if drop is None:
        drop = torch.rand(b, device=x.device) < label_drop_prob
    if noise.shape != x.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != images shape {tuple(x.shape)}")
    if t.shape != (b,) or drop.shape != (b,):
        raise ValueError(f"t and drop must have shape ({b},), got {tuple(t.shape)} and {tuple(drop.shape)}")
    tb = t.view(-1, *([1] * (x.ndim - 1)))
    e = noise * noise_scale
    z = tb * x + (1 - tb) * e
    v = x_to_v(x, z, tb, t_eps)
    out = net(z, t, drop_condition(y, drop, num_classes))
    v_pred = to_velocity(out, z, tb, t_eps, prediction)
    return ((v - v_pred) ** 2).mean(dim=tuple(range(1, x.ndim))).mean()
