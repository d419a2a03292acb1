"""The public API of DESIGN.md section 6, and the sampler against the official two-call CFG loop."""

from __future__ import annotations

import pytest
import torch

import jit_fast
from jit_fast.sampler import image_noise, nfe_per_image

CLASSES = 5


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    """A tiny JiT with every parameter non-zero, so conditioning and guidance change the output."""
    torch.manual_seed(0)
    m = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=CLASSES, depth=2, hidden_size=32, num_heads=2,
                             in_context_len=4, in_context_start=1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def official_loop(net, y, noise, steps, solver, cfg, interval, noise_scale=1.0, t_eps=0.05):
    """The official sampler's structure: separate conditional and unconditional calls, CFG inside the interval."""
    z = noise * noise_scale
    grid = torch.linspace(0, 1, steps + 1)
    null = torch.full_like(y, CLASSES)

    def v(z, t):
        tb = t.expand(z.shape[0])
        x_c = net(z, tb, y)
        x_u = net(z, tb, null)
        v_c = (x_c - z) / (1 - t).clamp_min(t_eps)
        v_u = (x_u - z) / (1 - t).clamp_min(t_eps)
        lo, hi = interval
        w = cfg if (t < hi and (lo == 0 or t > lo)) else 1.0
        return v_u + w * (v_c - v_u)

    for i in range(steps - 1):
        t, tn = grid[i], grid[i + 1]
        vt = v(z, t)
        if solver == "heun":
            vn = v(z + (tn - t) * vt, tn)
            z = z + (tn - t) * 0.5 * (vt + vn)
        else:
            z = z + (tn - t) * vt
    return z + (grid[-1] - grid[-2]) * v(z, grid[-2])


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("cfg,interval", [(2.9, (0.1, 1.0)), (2.9, (0.0, 1.0)), (1.0, (0.1, 1.0))])
def test_batched_cfg_equals_the_two_call_loop(net, solver: str, cfg: float, interval) -> None:
    y = torch.tensor([0, 3, 4, 1])
    noise = image_noise(7, range(4), (3, 16, 16))
    with torch.no_grad():
        got = jit_fast.sample(net, y, steps=6, solver=solver, cfg=cfg, interval=interval, noise=noise,
                              num_classes=CLASSES, noise_scale=1.5)
        want = official_loop(net, y, noise, 6, solver, cfg, interval, noise_scale=1.5)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    if cfg != 1.0:  # guidance really acts: the unguided images differ
        with torch.no_grad():
            plain = official_loop(net, y, noise, 6, solver, 1.0, interval, noise_scale=1.5)
        assert (plain - want).abs().max() > 1e-3


def test_images_do_not_depend_on_batch_size(net) -> None:
    y = torch.arange(8) % CLASSES
    kw = dict(steps=4, cfg=2.9, interval=(0.1, 1.0), seed=3, num_classes=CLASSES)
    with torch.no_grad():
        full = jit_fast.sample(net, y, **kw)
        for bs in (1, 3):
            parts = [jit_fast.sample(net, y[s:s + bs], index_offset=s, **kw) for s in range(0, 8, bs)]
            assert torch.allclose(torch.cat(parts), full, atol=1e-5), bs


def test_seeded_noise_and_explicit_noise(net) -> None:
    y = torch.tensor([1, 2])
    kw = dict(steps=3, cfg=2.0, num_classes=CLASSES)
    with torch.no_grad():
        a = jit_fast.sample(net, y, seed=0, **kw)
        b = jit_fast.sample(net, y, seed=0, **kw)
        c = jit_fast.sample(net, y, seed=1, **kw)
        d = jit_fast.sample(net, y, noise=image_noise(0, range(2), (3, 16, 16)), seed=1, **kw)
    assert torch.equal(a, b) and not torch.allclose(a, c) and torch.equal(a, d)  # `noise` overrides the seed


@pytest.mark.parametrize("solver,steps", [("heun", 5), ("euler", 5), ("heun", 1)])
def test_network_evaluations_per_image(net, solver: str, steps: int) -> None:
    calls = []

    def counting(z, t, y):
        calls.append(z.shape[0])
        return net(z, t, y)

    with torch.no_grad():
        jit_fast.sample(counting, torch.tensor([0, 1]), steps=steps, solver=solver, cfg=2.0, interval=(0.0, 1.0),
                        num_classes=CLASSES, img_size=16)
    assert len(calls) == nfe_per_image(steps, solver) == (2 * (steps - 1) + 1 if solver == "heun" else steps)
    assert set(calls) == {4}  # guided everywhere: conditional and unconditional batched as 2B


def test_api_as_documented() -> None:
    torch.manual_seed(0)
    net = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=10, kernels="torch", depth=2, hidden_size=32,
                               num_heads=2)
    assert (net.cfg.depth, net.cfg.hidden_size) == (2, 32)
    z, t, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 9, 4])
    assert net(z, t, y).shape == (3, 3, 16, 16)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    draw = dict(t=torch.tensor([0.2, 0.5, 0.9]), noise=torch.randn(3, 3, 16, 16), drop=torch.tensor([0, 1, 0]).bool())
    l1 = jit_fast.flow_matching_loss(net, x, y, **draw, P_mean=-0.8, P_std=0.8, noise_scale=1.0, t_eps=0.05,
                                     label_drop_prob=0.1, num_classes=10)
    torch.manual_seed(123)  # the global RNG is not consulted when every draw is given
    l2 = jit_fast.flow_matching_loss(net, x, y, **draw, num_classes=10)
    assert l1.ndim == 0 and torch.equal(l1, l2)
    torch.manual_seed(5)
    r1 = jit_fast.flow_matching_loss(net, x, y, num_classes=10)
    torch.manual_seed(5)
    assert torch.equal(r1, jit_fast.flow_matching_loss(net, x, y, num_classes=10))
    with torch.no_grad():
        imgs = jit_fast.sample(net, y, steps=3, solver="euler", cfg=2.9, interval=(0.1, 1.0), noise_scale=1.0,
                               seed=0, noise=None, num_classes=10)
    assert imgs.shape == (3, 3, 16, 16) and torch.isfinite(imgs).all()
