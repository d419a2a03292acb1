"""The JiT objective: x-prediction network trained with a velocity (v) loss.

t ~ sigmoid(N(P_mean, P_std)); z = t x + (1 - t) e with e = noise_scale * N(0, I);
v = (x - z) / max(1 - t, t_eps) and the same map turns the predicted x into v_pred.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jit_fast.conditioning import Condition, drop_condition

Net = Callable[[torch.Tensor, torch.Tensor, Condition], torch.Tensor]


def sample_t(n: int, P_mean: float = -0.8, P_std: float = 0.8, device=None, generator=None) -> torch.Tensor:
    """Logit-normal training times in (0, 1)."""
    return torch.sigmoid(torch.randn(n, device=device, generator=generator) * P_std + P_mean)


def x_to_v(x_pred: torch.Tensor, z: torch.Tensor, t: torch.Tensor, t_eps: float) -> torch.Tensor:
    """Velocity implied by an x prediction at time t (broadcast over image dims)."""
    return (x_pred - z) / (1 - t).clamp_min(t_eps)


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
) -> torch.Tensor:
    """Mean squared v-error of `net` on clean images x (B, C, H, W) in [-1, 1] with labels (or captions) y.

    `t` (B,), `noise` (standard normal, like x) and `drop` (bool (B,)) may be given to
    reproduce a draw exactly; otherwise they are sampled in that order from the global RNG.
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
    x_pred = net(z, t, drop_condition(y, drop, num_classes))
    v_pred = x_to_v(x_pred, z, tb, t_eps)
    return ((v - v_pred) ** 2).mean(dim=tuple(range(1, x.ndim))).mean()
