"""Heun / Euler ODE sampling of an x-prediction net with interval classifier-free guidance.

The grid is t = linspace(0, 1, steps + 1) from noise (t=0) to data (t=1): Heun for the
first steps-1 intervals and Euler for the last (as the official sampler). Conditional and
unconditional passes run as one batch of 2B, and the unconditional half is skipped where
the guidance scale is 1 (outside the CFG interval), so fewer FLOPs give the same images.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from jit_fast.denoiser import Net, x_to_v

SOLVERS = ("heun", "euler")


def time_grid(steps: int, device=None) -> torch.Tensor:
    """fp32 grid linspace(0, 1, steps + 1), as the official sampler builds it."""
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def guidance_scale(t: torch.Tensor, cfg: float, interval: tuple[float, float]) -> float:
    """cfg inside interval_min < t < interval_max (a zero interval_min includes t=0), else 1.

    The comparison is made on the fp32 time value, exactly as the official sampler does.
    """
    lo, hi = interval
    inside = bool(((t < hi) & ((lo == 0) | (t > lo))).item())
    return float(cfg) if inside else 1.0


def nfe_per_image(steps: int, solver: str) -> int:
    """Network evaluations per image (a batched CFG pair counts once): Heun 2*(steps-1)+1."""
    return 2 * (steps - 1) + 1 if solver == "heun" else steps


def image_seed(seed: int, index: int) -> int:
    """Independent 63-bit seed for image `index` of run `seed` (independent of batching)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def image_noise(seed: int, indices: range | list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal noise, one CPU generator per image seeded by (seed, index)."""
    g = torch.Generator()
    out = torch.empty((len(indices), *shape))
    for row, i in enumerate(indices):
        g.manual_seed(image_seed(seed, i))
        out[row] = torch.randn(shape, generator=g)
    return out


def guided_velocity(
    net: Net, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: float, null_label: int, t_eps: float
) -> torch.Tensor:
    """CFG velocity v_u + w (v_c - v_u); one 2B forward when w != 1, the conditional pass alone otherwise."""
    b = z.shape[0]
    if w == 1.0:
        return x_to_v(net(z, t.expand(b), y), z, t, t_eps)
    x = net(torch.cat([z, z]), t.expand(2 * b), torch.cat([y, torch.full_like(y, null_label)]))
    v_c, v_u = x_to_v(x, torch.cat([z, z]), t, t_eps).chunk(2)
    return v_u + w * (v_c - v_u)


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def euler_step(velocity: Velocity, z: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """z + (t_next - t) v(z, t)."""
    return z + (t_next - t) * velocity(z, t)


def heun_step(velocity: Velocity, z: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """Second-order Heun step: average the velocities at both ends of an Euler predictor."""
    v_t = velocity(z, t)
    v_next = velocity(z + (t_next - t) * v_t, t_next)
    return z + (t_next - t) * (0.5 * (v_t + v_next))


def solve(velocity: Velocity, z: torch.Tensor, steps: int, solver: str, progress: Callable | None = None):
    """Integrate from t=0 to t=1: `solver` steps on all but the last interval, Euler on the last."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = time_grid(steps, z.device)
    stepper = heun_step if solver == "heun" else euler_step
    for i in range(steps - 1):
        z = stepper(velocity, z, grid[i], grid[i + 1])
        if progress is not None:
            progress()
    return euler_step(velocity, z, grid[-2], grid[-1])


@torch.no_grad()
def sample(
    net: Net,
    y: torch.Tensor,
    steps: int = 50,
    solver: str = "heun",
    cfg: float = 2.9,
    interval: tuple[float, float] = (0.1, 1.0),
    noise_scale: float = 1.0,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    num_classes: int = 1000,
    t_eps: float = 0.05,
    index_offset: int = 0,
    img_size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Generate images (B, 3, S, S) in model space (about [-1, 1]) for labels y (B,).

    Image i starts from noise seeded by (seed, index_offset + i) unless the standard-normal
    `noise` is given; either way it is scaled by `noise_scale`.
    """
    size = img_size or getattr(net, "input_size", None)
    if noise is None:
        if size is None:
            raise ValueError("img_size is required when net has no `input_size` and no noise is given")
        noise = image_noise(seed, range(index_offset, index_offset + y.shape[0]), (3, size, size))
    if noise.shape[0] != y.shape[0]:
        raise ValueError(f"noise batch {noise.shape[0]} != labels batch {y.shape[0]}")
    z = noise.to(y.device, torch.float32) * noise_scale
    amp = (
        torch.autocast(z.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with amp:
            return guided_velocity(net, z, t, y, guidance_scale(t, cfg, interval), num_classes, t_eps)

    return solve(velocity, z, steps, solver)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] -> uint8 NHWC, rounded as a PNG write of the official output."""
    x = ((images.float() + 1) / 2 * 255).clamp(0, 255).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
