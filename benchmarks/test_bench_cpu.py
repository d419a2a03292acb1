"""pytest-benchmark suite for what a CPU can measure (marker `bench`; outside the default `tests/` run).

    pytest benchmarks -m bench --benchmark-columns=median,min,rounds

Reference ops at JiT-B/16 block shapes, custom-op dispatch overhead, sampler step overhead, JPEG decode + crop.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cpu import decode_workload, reference_op_workloads, sampler_workloads
from benchmarks.ops import model_cases
from jit_kernels import get_ops

pytestmark = pytest.mark.bench


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", list(reference_op_workloads("JiT-T/4", batch=1, img_size=16)))
def test_reference_op(benchmark, name: str) -> None:
    """Eager reference op forward on a JiT-B/16 block at batch 2 (fp32 residual, bf16 GEMM outputs)."""
    benchmark(reference_op_workloads("JiT-B/16", batch=2)[name])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_dispatch_overhead(benchmark, backend: str) -> None:
    """rmsnorm_modulate on a tiny tensor: eager reference vs the custom op (same CPU math, plus dispatch)."""
    [case] = [c for c in model_cases("JiT-T/4", 1, 8) if c.entry == "rmsnorm_modulate"]
    data = case.make("cpu", "bf16", 0)
    benchmark(data.call, get_ops(backend), data.inputs, torch.bfloat16)


@pytest.mark.parametrize("name", ["heun_step_null_net", "heun_step_jit_t4"])
def test_sampler_step(benchmark, name: str) -> None:
    """One Heun step with CFG: with a zero-cost net it is the sampler's own per-step overhead."""
    benchmark(sampler_workloads()[name])


def test_decode_and_crop(benchmark) -> None:
    """PIL decode + ADM center crop to 256 of 16 ImageNet-sized JPEGs (divide by 16 for per-image time)."""
    fn, images = decode_workload(256, 16)
    out = benchmark(fn)
    assert len(out) == images and out[0].shape == (256, 256, 3)
