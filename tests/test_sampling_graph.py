"""The static-buffer (CUDA-graph) sampler: bitwise equal to `sample` when run eagerly, NFE, schedule."""

from __future__ import annotations

import pytest
import torch
from sampling_utils import CLASSES, IMG, tiny_net

from jit_fast.sampling.sampler import (
    StaticSampler,
    forward_rows_per_image,
    image_noise,
    nfe_per_image,
    sample,
    step_schedule,
    time_grid,
)


@pytest.fixture(scope="module")
def net():
    return tiny_net()


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("cfg", [1.0, 2.9])
@pytest.mark.parametrize("interval", [(0.1, 1.0), (0.0, 0.7)])
def test_static_step_bitwise_equals_sample(net, solver, cfg, interval):
    n, steps = 6, 5
    y = torch.arange(n) % CLASSES
    noise = image_noise(7, range(100, 100 + n), (3, IMG, IMG))
    ref = sample(net, y, steps=steps, solver=solver, cfg=cfg, interval=interval, noise=noise,
                 num_classes=CLASSES, noise_scale=1.5)
    s = StaticSampler(net, n, steps=steps, solver=solver, interval=interval, num_classes=CLASSES, noise_scale=1.5)
    assert not s.use_graphs  # CPU: the very step function that is captured on CUDA runs eagerly
    out = s.run(noise, y, cfg)
    assert torch.equal(out, ref)
    # seeded draw inside sample() == the same seeds given to the static sampler
    ref_seeded = sample(net, y, steps=steps, solver=solver, cfg=cfg, interval=interval, seed=7,
                        index_offset=100, num_classes=CLASSES, noise_scale=1.5)
    assert torch.equal(out, ref_seeded)


def test_static_sampler_short_batch_is_padded_batch(net):
    """A short last batch runs padded to the static size; its rows equal `sample` on that padded batch."""
    b, n = 5, 3
    y = torch.tensor([1, 4, 7])
    noise = image_noise(0, range(n), (3, IMG, IMG))
    s = StaticSampler(net, b, steps=3, num_classes=CLASSES)
    out = s.run(noise, y, 2.0)
    assert out.shape == (n, 3, IMG, IMG)
    padded_noise = torch.cat([noise, torch.zeros(b - n, 3, IMG, IMG)])
    padded_y = torch.cat([y, torch.zeros(b - n, dtype=torch.long)])
    ref = sample(net, padded_y, steps=3, cfg=2.0, noise=padded_noise, num_classes=CLASSES)[:n]
    assert torch.equal(out, ref)


def test_static_sampler_cfg_sweep_reuses_state(net):
    """The guidance scale is a buffer: one sampler serves several cfg values, each equal to `sample`."""
    y = torch.arange(4)
    noise = image_noise(1, range(4), (3, IMG, IMG))
    s = StaticSampler(net, 4, steps=4, num_classes=CLASSES)
    for cfg in (2.9, 1.5, 2.9):
        assert torch.equal(s.run(noise, y, cfg), sample(net, y, steps=4, cfg=cfg, noise=noise, num_classes=CLASSES))


class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.batches: list[int] = []

    @property
    def input_size(self):
        return self.net.input_size

    def forward(self, z, t, y):
        self.batches.append(z.shape[0])
        return self.net(z, t, y)


@pytest.mark.parametrize("solver,steps", [("heun", 6), ("heun", 1), ("euler", 5)])
def test_net_evaluations_equal_formula(net, solver, steps):
    b, interval, cfg = 3, (0.3, 1.0), 2.5
    counting = CountingNet(net)
    s = StaticSampler(counting, b, steps=steps, solver=solver, interval=interval, num_classes=CLASSES)
    s.run(image_noise(0, range(b), (3, IMG, IMG)), torch.arange(b), cfg)
    assert len(counting.batches) == nfe_per_image(steps, solver) == s.net_calls
    assert nfe_per_image(steps, solver) == (2 * (steps - 1) + 1 if solver == "heun" else steps)
    assert set(counting.batches) <= {b, 2 * b}  # guided evaluations are one batched 2B forward
    assert sum(counting.batches) == b * forward_rows_per_image(steps, solver, interval, cfg)
    # the plain sampler makes the same calls
    counting.batches.clear()
    sample(counting, torch.arange(b), steps=steps, solver=solver, cfg=cfg, interval=interval, num_classes=CLASSES)
    assert len(counting.batches) == nfe_per_image(steps, solver)


def test_step_schedule_follows_interval_rule():
    steps, interval = 10, (0.1, 1.0)
    grid = time_grid(steps)
    kinds = step_schedule(steps, "heun", interval, 2.9)
    assert len(kinds) == steps and kinds[-1][0] == "euler"
    for i, k in enumerate(kinds[:-1]):
        assert k == ("heun", bool(0.1 < grid[i] < 1.0), bool(0.1 < grid[i + 1] < 1.0))
    assert all(not any(k[1:]) for k in step_schedule(steps, "heun", interval, 1.0))  # cfg 1: never guided
    assert step_schedule(4, "euler", (0.0, 1.0), 3.0)[0] == ("euler", True)  # zero interval_min includes t=0
    with pytest.raises(ValueError, match="solver"):
        step_schedule(4, "rk4", interval, 2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager_on_gpu():
    net = tiny_net().cuda()
    y = (torch.arange(8) % CLASSES).cuda()
    noise = image_noise(0, range(8), (3, IMG, IMG))
    for amp in (None, torch.bfloat16):
        eager = StaticSampler(net, 8, steps=6, num_classes=CLASSES, autocast_dtype=amp, cuda_graph=False)
        graph = StaticSampler(net, 8, steps=6, num_classes=CLASSES, autocast_dtype=amp, cuda_graph=True)
        for cfg in (2.9, 1.7):  # the second cfg replays the captured graphs
            assert torch.equal(graph.run(noise, y, cfg), eager.run(noise, y, cfg))
        assert len(graph.graphs) == len(set(step_schedule(6, "heun", (0.1, 1.0), 2.9)))
