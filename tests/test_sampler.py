"""jit_fast.sample against a literal official sampling loop written here (DESIGN.md section 2).

The reference calls the net twice per velocity evaluation (conditional, then unconditional with
the null class), applies CFG only where interval_min < t < interval_max (a zero interval_min
includes t = 0), uses Heun for the first steps-1 intervals and Euler for the last. The library
batches the two passes into one 2B forward and skips the unconditional half outside the
interval; the images must not change.
"""

from __future__ import annotations

import pytest
import torch

import jit_fast
from jit_fast.sampling.sampler import StaticSampler, forward_rows_per_image, image_noise, nfe_per_image

IMG, CLASSES = 16, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0) -> jit_fast.JiT:
    """JiT-T/4 at 16 px with every official tensor perturbed (adaLN and the output layer start at zero)."""
    net = jit_fast.build_model("JiT-T/4", img_size=IMG, num_classes=CLASSES)
    g = torch.Generator().manual_seed(seed)
    sd = {
        k: v if k == "pos_embed" else v + 0.1 * torch.randn(v.shape, generator=g)
        for k, v in net.state_dict().items()
    }
    net.load_state_dict(sd, strict=True)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> jit_fast.JiT:
    return tiny_model()


def official_sample(net, y, noise, steps, solver, cfg, interval, noise_scale=1.0, num_classes=CLASSES, t_eps=0.05):
    """The official loop: per-sample t of shape (B, 1, 1, 1), two forwards per evaluation, torch.where CFG."""
    b = y.shape[0]
    null = torch.full_like(y, num_classes)
    z = noise_scale * noise
    ts = torch.linspace(0.0, 1.0, steps + 1).view(-1, 1, 1, 1, 1).expand(-1, b, 1, 1, 1)
    lo, hi = interval

    def forward_sample(z, t):
        x_cond = net(z, t.flatten(), y)
        v_cond = (x_cond - z) / (1.0 - t).clamp_min(t_eps)
        x_uncond = net(z, t.flatten(), null)
        v_uncond = (x_uncond - z) / (1.0 - t).clamp_min(t_eps)
        mask = (t < hi) & ((lo == 0) | (t > lo))
        w = torch.where(mask, cfg, 1.0)
        return v_uncond + w * (v_cond - v_uncond)

    def euler(z, t, t_next):
        return z + (t_next - t) * forward_sample(z, t)

    def heun(z, t, t_next):
        v_t = forward_sample(z, t)
        z_euler = z + (t_next - t) * v_t
        v_next = forward_sample(z_euler, t_next)
        return z + (t_next - t) * (0.5 * (v_t + v_next))

    stepper = heun if solver == "heun" else euler
    with torch.no_grad():
        for i in range(steps - 1):
            z = stepper(z, ts[i], ts[i + 1])
        return euler(z, ts[-2], ts[-1])


LABELS = torch.tensor([3, 0, 9])


def std_noise(n: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [1.0, 2.9])
@pytest.mark.parametrize("interval", [(0.1, 1.0), (0.0, 1.0)])
@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_batched_cfg_with_interval_skip_equals_official_loop(net, solver, interval, cfg) -> None:
    noise = std_noise(3)
    for steps in (1, 10):  # steps=10: t = 0.1 sits on the grid (excluded: interval_min < t)
        got = jit_fast.sample(net, LABELS, steps=steps, solver=solver, cfg=cfg, interval=interval, noise=noise,
                              num_classes=CLASSES)
        want = official_sample(net, LABELS, noise, steps, solver, cfg, interval)
        assert got.shape == (3, 3, IMG, IMG) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if cfg != 1.0:  # guidance changes the images (the comparison is not vacuous)
        plain = official_sample(net, LABELS, noise, 10, solver, 1.0, interval)
        assert (got - plain).abs().max() > 1e-2


def test_noise_scale_narrow_interval_and_t_eps(net) -> None:
    """25 steps: the last evaluations (t = 0.96) divide by max(1 - t, t_eps) = t_eps."""
    noise = std_noise(3, seed=9)
    got = jit_fast.sample(net, LABELS, steps=25, solver="heun", cfg=3.5, interval=(0.3, 0.7), noise_scale=2.0,
                          noise=noise, num_classes=CLASSES)
    want = official_sample(net, LABELS, noise, 25, "heun", 3.5, (0.3, 0.7), noise_scale=2.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - official_sample(net, LABELS, noise, 25, "heun", 3.5, (0.3, 0.7))).abs().max() > 1e-2
    other_eps = official_sample(net, LABELS, noise, 25, "heun", 3.5, (0.3, 0.7), noise_scale=2.0, t_eps=0.1)
    assert (got - other_eps).abs().max() > 1e-3


def test_static_sampler_equals_official_loop(net) -> None:
    """The evaluation sampler (static buffers; CUDA graphs on a GPU, eager here), on a short padded batch."""
    noise = std_noise(3)
    sampler = StaticSampler(net, batch_size=4, steps=6, solver="heun", interval=(0.1, 1.0), num_classes=CLASSES,
                            cuda_graph=False)
    got = sampler.run(noise, LABELS, cfg=2.9)
    torch.testing.assert_close(got, official_sample(net, LABELS, noise, 6, "heun", 2.9, (0.1, 1.0)), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_images_do_not_depend_on_batch_size(net, solver) -> None:
    y = torch.tensor([1, 4, 4, 7, 0, 9, 2, 5])
    kw = dict(steps=4, solver=solver, cfg=2.9, interval=(0.1, 1.0), seed=11, num_classes=CLASSES)
    full = jit_fast.sample(net, y, **kw)
    for bs in (1, 3, 8):
        parts = [jit_fast.sample(net, y[i : i + bs], index_offset=i, **kw) for i in range(0, len(y), bs)]
        torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=0)


def test_seeded_noise(net) -> None:
    y = torch.tensor([2, 2, 6])
    kw = dict(steps=3, solver="heun", cfg=2.0, interval=(0.0, 1.0), num_classes=CLASSES)
    a = jit_fast.sample(net, y, seed=1, **kw)
    assert torch.equal(a, jit_fast.sample(net, y, seed=1, **kw))  # same seed, same images
    b = jit_fast.sample(net, y, seed=2, **kw)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # another seed changes every image
    assert (a[0] - a[1]).abs().max() > 1e-2  # same label, different index: different noise
    # image i's noise is drawn from (seed, i): a lone image at index 2 is row 2 of the batch
    torch.testing.assert_close(jit_fast.sample(net, y[2:], seed=1, index_offset=2, **kw), a[2:], atol=1e-5, rtol=0)
    # and the label of another image does not matter
    c = jit_fast.sample(net, torch.tensor([5, 2, 6]), seed=1, **kw)
    torch.testing.assert_close(c[1:], a[1:], atol=1e-5, rtol=0)
    # the seeded draw is standard normal per image, independent across indices
    n = image_noise(1, range(3), (3, IMG, IMG))
    assert torch.equal(n, image_noise(1, range(3), (3, IMG, IMG)))
    assert torch.equal(n[1:], image_noise(1, [1, 2], (3, IMG, IMG)))
    big = image_noise(4, range(64), (3, IMG, IMG))
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02
    corr = torch.corrcoef(big.flatten(1))
    assert (corr - torch.eye(64)).abs().max() < 0.2  # 1/sqrt(768) = 0.036 per pair
    torch.testing.assert_close(jit_fast.sample(net, y, noise=n, **kw), a, atol=1e-6, rtol=0)


def test_explicit_noise_overrides_seed(net) -> None:
    noise = std_noise(3, seed=3)
    kw = dict(steps=3, solver="heun", cfg=2.9, interval=(0.1, 1.0), noise=noise, num_classes=CLASSES)
    a = jit_fast.sample(net, LABELS, seed=0, **kw)
    assert torch.equal(a, jit_fast.sample(net, LABELS, seed=123, **kw))
    assert (a - jit_fast.sample(net, LABELS, seed=0, steps=3, cfg=2.9, num_classes=CLASSES)).abs().max() > 1e-2
    torch.testing.assert_close(a, official_sample(net, LABELS, noise, 3, "heun", 2.9, (0.1, 1.0)), atol=1e-5,
                               rtol=1e-5)


class CountingNet(torch.nn.Module):
    """Wraps a net; counts forward calls and the images pushed through."""

    def __init__(self, net: jit_fast.JiT) -> None:
        super().__init__()
        self.net, self.input_size = net, net.input_size
        self.calls = self.rows = 0

    def forward(self, z, t, y):
        self.calls += 1
        self.rows += z.shape[0]
        return self.net(z, t, y)


def guided_hand(t: float, cfg: float, interval: tuple[float, float]) -> bool:
    lo, hi = (torch.tensor(v, dtype=torch.float32).item() for v in interval)
    return cfg != 1.0 and t < hi and (interval[0] == 0 or t > lo)


@pytest.mark.parametrize("solver", ["heun", "euler"])
@pytest.mark.parametrize("steps,cfg,interval", [(5, 1.0, (0.1, 1.0)), (5, 2.9, (0.0, 1.0)), (10, 2.9, (0.1, 1.0)),
                                                (8, 2.0, (0.3, 0.7))])
def test_nfe_per_image(net, solver, steps, cfg, interval) -> None:
    counter = CountingNet(net)
    b = 3
    jit_fast.sample(counter, LABELS, steps=steps, solver=solver, cfg=cfg, interval=interval, num_classes=CLASSES)
    grid = torch.linspace(0, 1, steps + 1).tolist()
    if solver == "heun":
        evals = [t for i in range(steps - 1) for t in (grid[i], grid[i + 1])] + [grid[steps - 1]]
        assert len(evals) == 2 * (steps - 1) + 1
    else:
        evals = grid[:-1]
    assert counter.calls == len(evals) == nfe_per_image(steps, solver)  # a batched CFG pair is one evaluation
    rows = sum(2 if guided_hand(t, cfg, interval) else 1 for t in evals)
    assert counter.rows == b * rows
    assert forward_rows_per_image(steps, solver, interval, cfg) == rows
    if cfg == 1.0:
        assert rows == len(evals)  # no unconditional pass at all
