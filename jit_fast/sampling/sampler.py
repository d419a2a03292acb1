"""Heun / Euler ODE sampling of an x-prediction net with interval classifier-free guidance.

The grid is t = linspace(0, 1, steps + 1) from noise (t=0) to data (t=1): Heun for the
first steps-1 intervals and Euler for the last (as the official sampler). Conditional and
unconditional passes run as one batch of 2B, and the unconditional half is skipped where
the guidance scale is 1 (outside the CFG interval), so fewer FLOPs give the same images.
`StaticSampler` runs the same step functions over static buffers, replayed as CUDA graphs on a
GPU (the large-batch evaluation path of `jit_fast.sample`).
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable

import torch

from jit_fast.configs import Solver
from jit_fast.model.denoiser import Net, x_to_v
from jit_fast.shared.conditioning import (
    Condition,
    cat_conditions,
    condition_device,
    condition_rows,
    fill_condition_,
    null_condition,
    same_layout,
    static_condition,
)
from jit_fast.shared.seeds import image_seed

SOLVERS = typing.get_args(Solver)


def time_grid(steps: int, device=None) -> torch.Tensor:
    """fp32 grid linspace(0, 1, steps + 1), as the official sampler builds it."""
    return torch.linspace(0.0, 1.0, steps + 1, device=device)


def in_interval(t: torch.Tensor, interval: tuple[float, float]) -> bool:
    """interval_min < t < interval_max (a zero interval_min includes t=0), compared on the fp32 t."""
    lo, hi = interval
    return bool(((t < hi) & ((lo == 0) | (t > lo))).item())


def guidance_scale(t: torch.Tensor, cfg: float, interval: tuple[float, float]) -> float:
    """cfg inside the CFG interval (see `in_interval`), else 1, exactly as the official sampler decides."""
    return float(cfg) if in_interval(t, interval) else 1.0


def nfe_per_image(steps: int, solver: str) -> int:
    """Network evaluations per image (a batched CFG pair counts once): Heun 2*(steps-1)+1."""
    return 2 * (steps - 1) + 1 if solver == "heun" else steps


def image_noise(seed: int, indices: range | list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Standard-normal noise, one CPU generator per image seeded by (seed, index)."""
    g = torch.Generator()
    out = torch.empty((len(indices), *shape))
    for row, i in enumerate(indices):
        g.manual_seed(image_seed(seed, i))
        out[row] = torch.randn(shape, generator=g)
    return out


def guided_velocity(
    net: Net,
    z: torch.Tensor,
    t: torch.Tensor,
    y: Condition,
    w: float | torch.Tensor,
    null_label: int,
    t_eps: float,
    guided: bool | None = None,
) -> torch.Tensor:
    """CFG velocity v_u + w (v_c - v_u); one 2B forward when guided, the conditional pass alone otherwise.

    `w` may be a 0-dim tensor (the CUDA-graph sampler keeps it in a static buffer); then `guided`
    must say whether this evaluation is guided, since reading the tensor would sync the host.
    """
    b = z.shape[0]
    if guided is None:
        guided = float(w) != 1.0
    if not guided:
        return x_to_v(net(z, t.expand(b), y), z, t, t_eps)
    x = net(torch.cat([z, z]), t.expand(2 * b), cat_conditions(y, null_condition(y, null_label)))
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
    y: Condition,
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
    """Generate images (B, 3, S, S) in model space (about [-1, 1]) for labels y (B,) (or a TextCondition).

    Image i starts from noise seeded by (seed, index_offset + i) unless the standard-normal
    `noise` is given; either way it is scaled by `noise_scale`.
    """
    size = img_size or getattr(net, "input_size", None)
    if noise is None:
        if size is None:
            raise ValueError("img_size is required when net has no `input_size` and no noise is given")
        noise = image_noise(seed, range(index_offset, index_offset + condition_rows(y)), (3, size, size))
    if noise.shape[0] != condition_rows(y):
        raise ValueError(f"noise batch {noise.shape[0]} != labels batch {condition_rows(y)}")
    z = noise.to(condition_device(y), torch.float32) * noise_scale
    amp = (
        torch.autocast(z.device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with amp:
            return guided_velocity(net, z, t, y, guidance_scale(t, cfg, interval), num_classes, t_eps)

    return solve(velocity, z, steps, solver)


StepKind = tuple  # ("heun", guided_at_t, guided_at_t_next) or ("euler", guided_at_t)


def step_schedule(steps: int, solver: str, interval: tuple[float, float], cfg: float) -> list[StepKind]:
    """The kind of every solver step: which of its velocity evaluations are guided (2B forward).

    Decided on the CPU fp32 grid with the official interval rule; a cfg of 1 guides nothing.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = time_grid(steps)
    guided = [float(cfg) != 1.0 and in_interval(grid[i], interval) for i in range(steps + 1)]
    kinds: list[StepKind] = [
        ("heun", guided[i], guided[i + 1]) if solver == "heun" else ("euler", guided[i]) for i in range(steps - 1)
    ]
    return kinds + [("euler", guided[steps - 1])]


def forward_rows_per_image(steps: int, solver: str, interval: tuple[float, float], cfg: float) -> int:
    """Images pushed through the net per generated image: NFE plus one per guided (unconditional) half."""
    return sum(len(k) - 1 + sum(k[1:]) for k in step_schedule(steps, solver, interval, cfg))


class StaticSampler:
    """Fixed-batch Heun/Euler sampler over static buffers, replayed as CUDA graphs on a GPU.

    The state lives in static tensors (z, y, t, t_next, w); `step` advances z in place by one
    solver step of a given kind with the same `heun_step` / `euler_step` / `guided_velocity`
    as `sample`. On CUDA each step kind (Heun with the unconditional half on or off at either
    end, final Euler) is captured once as a graph and replayed; the guidance scale is a buffer,
    so a cfg sweep reuses the graphs. Elsewhere (or with cuda_graph=False) the very same
    `step` runs eagerly, which gives bitwise the images of `sample` for the same noise.
    """

    def __init__(
        self,
        net: Net,
        batch_size: int,
        steps: int = 50,
        solver: str = "heun",
        interval: tuple[float, float] = (0.1, 1.0),
        noise_scale: float = 1.0,
        num_classes: int = 1000,
        t_eps: float = 0.05,
        img_size: int | None = None,
        in_channels: int = 3,
        device: torch.device | str | None = None,
        autocast_dtype: torch.dtype | None = None,
        cuda_graph: bool | None = None,
    ) -> None:
        size = img_size or getattr(net, "input_size", None)
        if size is None:
            raise ValueError("img_size is required when net has no `input_size`")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        step_schedule(steps, solver, interval, 1.0)  # validates solver and steps
        if device is None:
            device = next(iter(net.parameters())).device if isinstance(net, torch.nn.Module) else "cpu"
        self.device = torch.device(device)
        self.net, self.batch_size, self.steps, self.solver = net, batch_size, steps, solver
        self.interval, self.noise_scale, self.num_classes, self.t_eps = tuple(interval), noise_scale, num_classes, t_eps
        self.autocast_dtype = autocast_dtype
        self.use_graphs = self.device.type == "cuda" if cuda_graph is None else bool(cuda_graph)
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {self.device}")
        f32 = dict(device=self.device, dtype=torch.float32)
        self.z = torch.zeros(batch_size, in_channels, size, size, **f32)
        self.y: Condition = static_condition(None, batch_size, self.device)  # text: replaced by run()'s layout
        self.t = torch.zeros((), **f32)
        self.t_next = torch.zeros((), **f32)
        self.w = torch.ones((), **f32)
        self.grid = time_grid(steps).to(self.device)
        self.graphs: dict[StepKind, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.net_calls = 0  # forwards issued by `step` (eager runs and captures; replays not counted)

    # -- the one step function ------------------------------------------------------------
    def _velocity(self, z: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
        self.net_calls += 1
        if self.autocast_dtype is None:
            amp = contextlib.nullcontext()
        else:  # the autocast weight cache must stay off while a graph is captured
            amp = torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=not self.use_graphs)
        with amp:
            return guided_velocity(self.net, z, t, self.y, self.w, self.num_classes, self.t_eps, guided=guided)

    def step(self, kind: StepKind) -> None:
        """Advance the static z by one step from self.t to self.t_next (in place)."""
        guided_t = kind[1]
        guided_next = kind[2] if kind[0] == "heun" else guided_t

        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self._velocity(z, t, guided_t if t is self.t else guided_next)

        stepper = heun_step if kind[0] == "heun" else euler_step
        self.z.copy_(stepper(velocity, self.z, self.t, self.t_next))

    # -- CUDA graphs ------------------------------------------------------------------------
    def _capture(self, kind: StepKind) -> torch.cuda.CUDAGraph:
        saved = self.z.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: cuBLAS handles, autotuning, torch.compile
            for _ in range(2):
                self.step(kind)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.step(kind)
        self._pool = graph.pool()
        self.z.copy_(saved)
        return graph

    def _run_step(self, kind: StepKind) -> None:
        if not self.use_graphs:
            self.step(kind)
            return
        graph = self.graphs.get(kind)
        if graph is None:
            graph = self.graphs[kind] = self._capture(kind)
        graph.replay()

    @torch.no_grad()
    def run(self, noise: torch.Tensor, y: Condition, cfg: float, progress: Callable | None = None) -> torch.Tensor:
        """Images (n, C, S, S) for n <= batch_size standard-normal `noise` rows and labels (or captions) `y`.

        A short batch is padded with zero noise and label 0 (a dropped caption); the padding rows are dropped.
        A condition of another layout than the last (text embeddings of another shape) gets new buffers and
        new graphs.
        """
        n = noise.shape[0]
        if n != condition_rows(y) or not 0 < n <= self.batch_size:
            raise ValueError(f"need 1..{self.batch_size} rows of noise and labels, got {n} and {condition_rows(y)}")
        if tuple(noise.shape[1:]) != tuple(self.z.shape[1:]):
            raise ValueError(f"noise rows {tuple(noise.shape[1:])} != sampler images {tuple(self.z.shape[1:])}")
        if not same_layout(self.y, y):
            self.y = static_condition(y, self.batch_size, self.device)
            self.graphs.clear()
        self.z[n:].zero_()
        self.z[:n].copy_(noise.to(self.device, torch.float32) * self.noise_scale)
        fill_condition_(self.y, y, n)
        self.w.fill_(float(cfg))
        for i, kind in enumerate(step_schedule(self.steps, self.solver, self.interval, cfg)):
            self.t.copy_(self.grid[i])
            self.t_next.copy_(self.grid[i + 1])
            self._run_step(kind)
            if progress is not None:
                progress()
        return self.z[:n].clone()


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] -> uint8 NHWC, rounded as a PNG write of the official output."""
    x = ((images.float() + 1) / 2 * 255).clamp(0, 255).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).contiguous()
