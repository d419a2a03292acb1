"""The paper's toy experiment: x-, eps- and v-prediction of a Swiss roll buried in D dimensions.

A 2-D Swiss roll is embedded in R^D by a fixed random column-orthogonal P (D x 2, P^T P = I); the
same 5-layer ReLU MLP (256 hidden units) is trained for each D with x-, eps- and v-prediction, all
with the v-loss of `jit_fast.model.denoiser.flow_matching_loss`, and sampled with `jit_fast.sampling.sampler.solve`.
Samples are mapped back to 2-D with P^T. Writes `toy_manifold.png` (rows: prediction, columns: D)
and `results.json` ({prediction: {D: {nearest_distance, off_manifold}}}) to --out.

    python examples/toy_manifold.py --out toy_out            # the full run (a few minutes on 2 cores)
    python examples/toy_manifold.py --out toy_out --quick    # seconds; for tests
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from jit_fast.model.denoiser import PREDICTIONS, Prediction, flow_matching_loss, sample_t, to_velocity
from jit_fast.sampling.sampler import SOLVERS, solve
from jit_fast.shared.files import atomic_write
from jit_fast.shared.seeds import mix_seed
from jit_fast.train.ema import EMA

T_EPS = 0.05  # the paper's clip of (1 - t) (and here of t for eps-prediction)


@dataclass
class ToyConfig:
    """Everything one run depends on; the defaults are the full run of the README."""

    dims: list[int] = field(default_factory=lambda: [2, 8, 16, 512])
    predictions: list[str] = field(default_factory=lambda: list(PREDICTIONS))
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    ema: float = 0.995
    p_mean: float = 0.8
    p_std: float = 1.0
    hidden: int = 256
    layers: int = 5
    samples: int = 1000
    sample_steps: int = 50
    solver: str = "heun"
    seed: int = 0
    workers: int = field(default_factory=lambda: min(2, os.cpu_count() or 1))
    threads: int = 1


QUICK = dict(dims=[2, 8], steps=10, batch_size=32, hidden=32, samples=100, sample_steps=3, workers=1)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
ROLL_TURNS = (1.5 * math.pi, 4.5 * math.pi)  # angle range of the roll


def _roll(s: torch.Tensor) -> torch.Tensor:
    """Points (s cos s, s sin s) of the roll at angles s, before normalisation."""
    return torch.stack([s * torch.cos(s), s * torch.sin(s)], dim=1)


_ROLL_STD = float(_roll(torch.linspace(*ROLL_TURNS, 20000, dtype=torch.float64)).std())


def roll_curve(n: int = 20000) -> torch.Tensor:
    """A dense, evenly spaced-in-angle trace of the clean roll (n, 2): the reference for nearest distances."""
    return (_roll(torch.linspace(*ROLL_TURNS, n, dtype=torch.float64)) / _ROLL_STD).float()


def swiss_roll(n: int, generator: torch.Generator) -> torch.Tensor:
    """n clean 2-D points on the roll, angle uniform, scaled to unit standard deviation overall."""
    lo, hi = ROLL_TURNS
    s = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return (_roll(s) / _ROLL_STD).float()


def projection(dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random column-orthogonal P (dim, 2): QR of a Gaussian matrix, so P^T P = I."""
    q, r = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
class ToyMLP(torch.nn.Module):
    """ReLU MLP on [z, t] -> R^D with `layers` linear layers of `hidden` units (the paper: 5 x 256)."""

    def __init__(self, dim: int, hidden: int = 256, layers: int = 5) -> None:
        super().__init__()
        widths = [dim + 1] + [hidden] * (layers - 1) + [dim]
        mods: list[torch.nn.Module] = []
        for i in range(layers):
            mods.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i < layers - 1:
                mods.append(torch.nn.ReLU())
        self.net = torch.nn.Sequential(*mods)

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The prediction (x, eps or v, depending on how it was trained) at z (B, D), times t (B,); y is unused."""
        return self.net(torch.cat([z, t.view(-1, 1).to(z.dtype)], dim=1))


# ------------------------------------------------------------------------------------------------
# One run: train, sample, measure
# ------------------------------------------------------------------------------------------------
Progress = Callable[[int], object]


def train(net: ToyMLP, P: torch.Tensor, prediction: Prediction, cfg: ToyConfig, generator: torch.Generator,
          progress: Progress) -> EMA:
    """Adam on the v-loss of `flow_matching_loss` with fresh roll points each step; returns the weights' EMA."""
    params = list(net.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    ema = EMA(params, cfg.ema)
    b = cfg.batch_size
    y = torch.zeros(b, dtype=torch.long)
    keep = torch.zeros(b, dtype=torch.bool)  # unconditional: no label is dropped
    for _ in range(cfg.steps):
        x = swiss_roll(b, generator) @ P.T
        t = sample_t(b, cfg.p_mean, cfg.p_std, generator=generator)
        noise = torch.randn(x.shape, generator=generator)
        loss = flow_matching_loss(net, x, y, t=t, noise=noise, drop=keep, t_eps=T_EPS, num_classes=1,
                                  prediction=prediction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(params)
        progress(1)
    return ema


@torch.no_grad()
def generate(net: ToyMLP, dim: int, prediction: Prediction, cfg: ToyConfig, generator: torch.Generator,
             progress: Progress) -> torch.Tensor:
    """cfg.samples points in R^D from N(0, I) noise, integrated by `jit_fast.sampling.sampler.solve`."""
    z = torch.randn(cfg.samples, dim, generator=generator)

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return to_velocity(net(z, t.expand(z.shape[0])), z, t, T_EPS, prediction)

    out = solve(velocity, z, cfg.sample_steps, cfg.solver, progress=lambda: progress(1))
    progress(1)  # the final Euler step
    return out


def measure(samples: torch.Tensor, P: torch.Tensor, curve: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(P^T s in 2-D, {nearest_distance: mean 2-D distance to the clean roll, off_manifold: mean |s - P P^T s|})."""
    flat = samples @ P
    nearest = torch.cat([torch.cdist(chunk, curve).min(dim=1).values for chunk in flat.split(1024)])
    off = (samples - flat @ P.T).norm(dim=1)
    return flat, {"nearest_distance": float(nearest.mean()), "off_manifold": float(off.mean())}


def run_one(prediction: Prediction, dim: int, cfg: ToyConfig, progress: Progress) -> tuple[torch.Tensor, dict]:
    """Train and sample one (prediction, D); its draws depend only on (seed, D), never on the order of runs."""
    # Every prediction at a given D sees the same P, initial weights, data, times and noise.
    P = projection(dim, torch.Generator().manual_seed(mix_seed(cfg.seed, dim, 0)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(cfg.seed, dim, 1))
        net = ToyMLP(dim, cfg.hidden, cfg.layers)
    ema = train(net, P, prediction, cfg, torch.Generator().manual_seed(mix_seed(cfg.seed, dim, 2)), progress)
    with ema.swapped_in(list(net.parameters())):
        samples = generate(net, dim, prediction, cfg, torch.Generator().manual_seed(mix_seed(cfg.seed, dim, 3)),
                           progress)
    return measure(samples, P, roll_curve())


_TICKS: Any = None  # a worker process's channel to the parent's progress bar


class _Ticks:
    """Progress callback of a worker process: sends step counts to the parent's bar in chunks of 25."""

    def __init__(self, queue: Any) -> None:
        self.queue, self.n = queue, 0

    def __call__(self, n: int) -> None:
        self.n += n
        if self.n >= 25:
            self.flush()

    def flush(self) -> None:
        if self.n:
            self.queue.put(self.n)
            self.n = 0


def _init_worker(queue: Any, threads: int) -> None:
    """Worker process setup: its progress channel and its torch thread count."""
    global _TICKS
    _TICKS = _Ticks(queue)
    torch.set_num_threads(threads)


def _worker_run(prediction: Prediction, dim: int, cfg: ToyConfig) -> tuple[torch.Tensor, dict]:
    """`run_one` in a worker process, reporting its steps to the parent's bar."""
    try:
        return run_one(prediction, dim, cfg, _TICKS)
    finally:
        _TICKS.flush()


def run_all(cfg: ToyConfig) -> dict[tuple[str, int], tuple[torch.Tensor, dict]]:
    """Every (prediction, D), on cfg.workers processes of cfg.threads threads each, under one progress bar."""
    jobs = [(p, d) for p in cfg.predictions for d in cfg.dims]
    done: dict[tuple[str, int], tuple[torch.Tensor, dict]] = {}
    bar = tqdm(total=len(jobs) * (cfg.steps + cfg.sample_steps), desc="train + sample", unit="step",
               dynamic_ncols=True)
    with bar:
        if cfg.workers == 1:
            threads = torch.get_num_threads()
            torch.set_num_threads(cfg.threads)
            try:
                for job in jobs:
                    bar.set_postfix_str(f"{job[0]}-pred D={job[1]}")
                    done[job] = run_one(*job, cfg, bar.update)
            finally:
                torch.set_num_threads(threads)
            return done
        ctx = mp.get_context("fork")  # the workers inherit this module, however it was loaded
        queue = ctx.Queue()
        with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(queue, cfg.threads)) as pool:
            pending = {pool.submit(_worker_run, *job, cfg): job for job in jobs}
            while pending:
                finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.update(queue.get())
                for f in finished:
                    done[pending.pop(f)] = f.result()
        while not queue.empty():
            bar.update(queue.get())
        return done


def run(cfg: ToyConfig, out: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Train and sample every (prediction, D); write the figure and results.json to `out`; return the results."""
    out.mkdir(parents=True, exist_ok=True)
    done = run_all(cfg)
    results = {p: {str(d): done[p, d][1] for d in cfg.dims} for p in cfg.predictions}
    panels = {job: flat for job, (flat, _) in done.items()}
    atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")
    img = figure(panels, results, cfg, roll_curve()).quantize(colors=16)  # a few flat colours: a small PNG
    img.save(out / "toy_manifold.png", optimize=True)
    return results


# ------------------------------------------------------------------------------------------------
# Figure (PIL: matplotlib is not a dependency)
# ------------------------------------------------------------------------------------------------
PANEL, MARGIN, TOP, LEFT = 200, 8, 28, 64
VIEW = 2.6  # half-width of each panel in normalised roll units


def figure(panels: dict[tuple[str, int], torch.Tensor], results: dict, cfg: ToyConfig,
           curve: torch.Tensor) -> Image.Image:
    """Grid of scatter panels (rows: prediction, columns: D): generated points in blue over the roll in grey."""
    rows, cols = cfg.predictions, cfg.dims
    w = LEFT + len(cols) * (PANEL + MARGIN)
    h = TOP + len(rows) * (PANEL + MARGIN)
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def to_px(p: torch.Tensor, x0: int, y0: int) -> list[tuple[float, float]]:
        keep = (p.abs() <= VIEW).all(dim=1)
        q = (p[keep] + VIEW) / (2 * VIEW) * (PANEL - 1)
        return [(x0 + float(a), y0 + PANEL - 1 - float(b)) for a, b in q.tolist()]

    for j, dim in enumerate(cols):
        draw.text((LEFT + j * (PANEL + MARGIN) + PANEL // 2 - 20, 8), f"D = {dim}", fill="black", font=font)
    for i, prediction in enumerate(rows):
        y0 = TOP + i * (PANEL + MARGIN)
        draw.text((6, y0 + PANEL // 2 - 6), f"{prediction}-pred", fill="black", font=font)
        for j, dim in enumerate(cols):
            x0 = LEFT + j * (PANEL + MARGIN)
            draw.rectangle([x0, y0, x0 + PANEL - 1, y0 + PANEL - 1], outline=(160, 160, 160))
            draw.point(to_px(curve[::10], x0, y0), fill=(190, 190, 190))
            for px, py in to_px(panels[prediction, dim], x0, y0):
                draw.rectangle([px - 0.5, py - 0.5, px + 0.5, py + 0.5], fill=(31, 90, 180))
            nd = results[prediction][str(dim)]["nearest_distance"]
            draw.text((x0 + 4, y0 + PANEL - 14), f"nearest {nd:.3f}", fill="black", font=font)
            outside = int((panels[prediction, dim].abs() > VIEW).any(dim=1).sum())
            if outside:
                draw.text((x0 + 4, y0 + 4), f"{outside} of {len(panels[prediction, dim])} outside the view",
                          fill=(180, 40, 40), font=font)
    return img


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> tuple[ToyConfig, Path]:
    """The run's config and output directory from the command line (--quick swaps in the test-sized defaults)."""
    d = ToyConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for toy_manifold.png and results.json")
    ap.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    ap.add_argument("--quick", action="store_true", help="tiny run (D 2 and 8, 10 steps, 32 hidden units) for tests")
    ap.add_argument("--dims", type=int, nargs="+", help=f"ambient dimensions D (default {d.dims})")
    ap.add_argument("--predictions", nargs="+", choices=PREDICTIONS, help="what the net predicts (default all)")
    ap.add_argument("--steps", type=int, help=f"training steps per run (default {d.steps})")
    ap.add_argument("--batch-size", type=int, help=f"training batch (default {d.batch_size})")
    ap.add_argument("--lr", type=float, help=f"Adam learning rate, constant (default {d.lr})")
    ap.add_argument("--ema", type=float, help=f"EMA decay of the weights used for sampling (default {d.ema})")
    ap.add_argument("--p-mean", type=float, help=f"logit-normal time sampler mean (default {d.p_mean})")
    ap.add_argument("--p-std", type=float, help=f"logit-normal time sampler std (default {d.p_std})")
    ap.add_argument("--hidden", type=int, help=f"MLP width (default {d.hidden})")
    ap.add_argument("--layers", type=int, help=f"MLP linear layers (default {d.layers})")
    ap.add_argument("--samples", type=int, help=f"generated points per run (default {d.samples})")
    ap.add_argument("--sample-steps", type=int, help=f"ODE steps (default {d.sample_steps})")
    ap.add_argument("--solver", choices=SOLVERS, help=f"ODE solver (default {d.solver})")
    ap.add_argument("--seed", type=int, help=f"seed of projections, weights, data and noise (default {d.seed})")
    ap.add_argument("--workers", type=int, help=f"runs trained at once, one process each (default {d.workers})")
    ap.add_argument("--threads", type=int, help=f"torch CPU threads per run (default {d.threads})")
    a = ap.parse_args(argv)
    cfg = ToyConfig(**QUICK) if a.quick else d
    for name in ("dims", "predictions", "steps", "batch_size", "lr", "ema", "p_mean", "p_std", "hidden", "layers",
                 "samples", "sample_steps", "solver", "seed", "workers", "threads"):
        if getattr(a, name) is not None:
            setattr(cfg, name, getattr(a, name))
    for name in ("steps", "batch_size", "hidden", "samples", "sample_steps", "workers", "threads"):
        if getattr(cfg, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.layers < 2:
        ap.error(f"--layers must be >= 2, got {cfg.layers}")
    if min(cfg.dims) < 2:
        ap.error(f"--dims must all be >= 2 (the roll is 2-D), got {cfg.dims}")
    if not cfg.lr > 0:
        ap.error(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.ema < 1:
        ap.error(f"--ema must be in [0, 1), got {cfg.ema}")
    if not cfg.p_std > 0:
        ap.error(f"--p-std must be > 0, got {cfg.p_std}")
    if a.out.exists() and not a.out.is_dir():
        ap.error(f"--out {a.out}: exists and is not a directory")
    earlier = [n for n in ("results.json", "toy_manifold.png") if (a.out / n).exists()]
    if earlier and not a.overwrite:
        ap.error(f"--out {a.out}: already holds {' and '.join(earlier)}; pass --overwrite to replace them")
    cfg.dims = list(dict.fromkeys(cfg.dims))
    cfg.predictions = list(dict.fromkeys(cfg.predictions))
    return cfg, a.out


def main(argv: list[str] | None = None) -> int:
    """Run the experiment and print results.json's table."""
    cfg, out = parse_args(argv)
    results = run(cfg, out)
    for prediction, by_dim in results.items():
        row = "  ".join(f"D={d}: {m['nearest_distance']:.3f} / {m['off_manifold']:.3f}" for d, m in by_dim.items())
        print(f"{prediction:>3}-pred  nearest / off-manifold  {row}")
    print(f"wrote {out / 'toy_manifold.png'} and {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
