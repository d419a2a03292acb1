"""What a CPU can measure: eager reference-op times, sampler per-step overhead, JPEG decode + ADM crop rate.

These are wall-clock CPU timings (labeled with the CPU they ran on); they say nothing about GPU speed.
The same workload builders back the pytest-benchmark suite in `benchmarks/test_bench_cpu.py`.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from PIL import Image

from benchmarks.ops import model_cases
from jit_kernels import get_ops


def time_fn(fn: Callable[[], object], repeats: int = 5, number: int = 1, warmup: int = 1) -> dict[str, float]:
    """Median and min seconds per call of `fn` over `repeats` rounds of `number` calls each."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - start) / number)
    return dict(median_s=statistics.median(rounds), min_s=min(rounds), calls=repeats * number)


def reference_op_workloads(
    model: str = "JiT-B/16", batch: int = 2, img_size: int = 256
) -> dict[str, Callable[[], object]]:
    """Closures running each eager reference op once on block-shaped CPU tensors, one per registered case
    (`benchmarks.ops.model_cases`: fp32 residual stream, bf16 GEMM outputs), keyed "entry case"."""
    ops, out = get_ops("torch"), {}
    for case in model_cases(model, batch, img_size):
        data = case.make("cpu", "bf16", 0)
        out[f"{case.entry} {case.label}"] = partial(data.call, ops, data.inputs, torch.bfloat16)
    return out


def sampler_workloads(batch: int = 4) -> dict[str, Callable[[], object]]:
    """One Heun step with a zero-cost net (pure sampler overhead) and with the tiny JiT-T/4 net."""
    from jit_fast.model.network import build_model
    from jit_fast.sampling.sampler import guided_velocity, heun_step

    z = torch.randn(batch, 3, 16, 16)
    y = torch.zeros(batch, dtype=torch.long)
    t, t_next = torch.tensor(0.2), torch.tensor(0.22)
    tiny = build_model("JiT-T/4", img_size=16, num_classes=10).eval()

    def null_net(z_in: torch.Tensor, _t: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return z_in

    def step(net) -> Callable[[], object]:
        def velocity(zz: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
            return guided_velocity(net, zz, tt, y, 2.9, 10, 0.05)

        return lambda: heun_step(velocity, z, t, t_next)

    return {"heun_step_null_net": torch.no_grad()(step(null_net)), "heun_step_jit_t4": torch.no_grad()(step(tiny))}


def jpeg_corpus(count: int = 16, long_side: int = 500, seed: int = 0) -> list[bytes]:
    """ImageNet-sized JPEG bytes cut from the photos packaged with scikit-learn/-image (no download)."""
    from benchmarks.data import photos

    rng = np.random.default_rng(seed)
    out = []
    for i, src in enumerate(photos() * (count // len(photos()) + 1)):
        if i == count:
            break
        img = Image.fromarray(np.ascontiguousarray(src))
        scale = long_side / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
        out.append(buf.getvalue())
    return out


def decode_workload(size: int = 256, count: int = 16) -> tuple[Callable[[], object], int]:
    """Closure that decodes `count` JPEGs and applies the reference ADM center crop to each, and `count`."""
    from jit_fast.data.crop import center_crop

    corpus = jpeg_corpus(count)

    def run() -> list[np.ndarray]:
        return [center_crop(Image.open(io.BytesIO(b)), size) for b in corpus]

    return run, len(corpus)


def measure_all(model: str = "JiT-B/16", img_size: int = 256, quick: bool = False) -> dict:
    """Every CPU measurement as a JSON-ready dict (seconds per call; decode as images/s)."""
    reps = 3 if quick else 7
    torch.set_num_threads(1)
    ops = {name: time_fn(fn, reps) for name, fn in reference_op_workloads(model, 2, img_size).items()}
    sampler = {name: time_fn(fn, reps, number=5) for name, fn in sampler_workloads().items()}
    decode, images = decode_workload(img_size)
    d = time_fn(decode, reps)
    return dict(
        threads=torch.get_num_threads(),
        reference_ops=dict(shape=f"{model} block, batch 2, bf16 GEMM outputs, fp32 residual", seconds=ops),
        sampler=dict(shape="batch 4, 16x16 images", seconds=sampler),
        decode=dict(images=images, size=img_size, images_per_s=images / d["median_s"], seconds=d),
    )
