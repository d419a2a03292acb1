"""The public API of DESIGN.md section 6, called exactly as written there, on tiny models."""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch

import jit_fast

OVERRIDES = dict(depth=3, hidden_size=48, num_heads=4, mlp_ratio=4.0, bottleneck_dim=12, in_context_len=4,
                 in_context_start=1, patch_size=8, attn_drop=0.0, proj_drop=0.0)
IMG, CLASSES = 32, 10


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(kernels: str = "torch", seed: int = 0, **kw) -> jit_fast.JiT:
    """A tiny JiT with every official tensor perturbed away from the (partly zero) official init."""
    net = jit_fast.build_model("JiT-B/16", img_size=IMG, num_classes=CLASSES, kernels=kernels, **{**OVERRIDES, **kw})
    g = torch.Generator().manual_seed(seed)
    sd = {k: v if k == "pos_embed" else v + 0.1 * torch.randn(v.shape, generator=g)
          for k, v in net.state_dict().items()}
    net.load_state_dict(sd, strict=True)
    return net.eval()


def test_exports() -> None:
    import jit_fast.sampling.generate  # noqa: F401  (the sample.py library must not shadow jit_fast.sample)
    import jit_fast.train.trainer  # noqa: F401

    for name in ("build_model", "flow_matching_loss", "sample", "load_official_checkpoint", "JiT"):
        assert name in jit_fast.__all__ and callable(getattr(jit_fast, name))


def test_signatures_and_defaults() -> None:
    p = inspect.signature(jit_fast.build_model).parameters
    assert list(p)[:4] == ["name", "img_size", "num_classes", "kernels"]
    assert (p["img_size"].default, p["num_classes"].default, p["kernels"].default) == (256, 1000, "torch")
    p = inspect.signature(jit_fast.flow_matching_loss).parameters
    assert list(p)[:3] == ["net", "x", "y"]
    want = dict(t=None, noise=None, drop=None, P_mean=-0.8, P_std=0.8, noise_scale=1.0, t_eps=0.05,
                label_drop_prob=0.1, num_classes=1000)
    assert {k: p[k].default for k in want} == want
    p = inspect.signature(jit_fast.sample).parameters
    assert list(p)[:2] == ["net", "y"]
    want = dict(steps=50, solver="heun", cfg=2.9, interval=(0.1, 1.0), noise_scale=1.0, seed=0, noise=None,
                num_classes=1000)
    assert {k: p[k].default for k in want} == want


def test_build_model_overrides_land() -> None:
    net = jit_fast.build_model("JiT-B/16", img_size=IMG, num_classes=CLASSES, kernels="torch", **OVERRIDES)
    cfg = net.cfg
    for k, v in OVERRIDES.items():
        assert getattr(cfg, k) == v, k
    assert len(net.blocks) == 3 and net.in_context_posemb.shape == (1, 4, 48)
    assert net.blocks[0].attn.q_norm.weight.shape == (12,)
    assert net.x_embedder.proj1.weight.shape == (12, 3, 8, 8)
    assert net.blocks[0].mlp.w12.weight.shape == (2 * 128, 48)  # int(int(48 * 4) * 2 / 3) = 128
    net = jit_fast.build_model("JiT-B/16", img_size=IMG, num_classes=CLASSES, **{**OVERRIDES, "mlp_ratio": 2.0})
    assert net.blocks[0].mlp.w3.weight.shape == (48, 64)  # int(int(96) * 2 / 3)
    net = jit_fast.build_model("JiT-B/16", img_size=IMG, num_classes=CLASSES,
                               **{**OVERRIDES, "depth": 8, "attn_drop": 0.25, "proj_drop": 0.5})
    assert [b.attn.attn_drop for b in net.blocks] == [0.0, 0.0, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0]
    assert [b.attn.proj_drop.p for b in net.blocks] == [0.0, 0.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    with pytest.raises(ValueError, match="hiden_size"):
        jit_fast.build_model("JiT-B/16", img_size=IMG, hiden_size=48)
    with pytest.raises(ValueError):
        jit_fast.build_model("JiT-B/16", img_size=IMG, kernels="cuda-magic")


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_forward_shapes(kernels: str) -> None:
    ref = tiny("torch")
    net = jit_fast.build_model("JiT-B/16", img_size=IMG, num_classes=CLASSES, kernels=kernels, **OVERRIDES)
    net.load_state_dict(ref.state_dict(), strict=True)
    net.eval()
    z = torch.randn(5, 3, IMG, IMG)
    t = torch.rand(5)
    y = torch.tensor([0, 3, 9, 10, 1])  # 10 = the null class
    with torch.no_grad():
        x_pred = net(z, t, y)
    assert x_pred.shape == (5, 3, IMG, IMG) and x_pred.dtype == torch.float32
    assert torch.isfinite(x_pred).all()
    with torch.no_grad():  # batch rows are independent
        torch.testing.assert_close(net(z[2:3], t[2:3], y[2:3]), x_pred[2:3], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # same weights, same outputs whatever the kernels
        torch.testing.assert_close(x_pred, ref(z, t, y), atol=1e-5, rtol=1e-5)
        assert (x_pred - net(z, 1 - t, y)).abs().max() > 1e-2  # t matters
        assert (x_pred[:1] - net(z[:1], t[:1], y[1:2])).abs().max() > 1e-2  # y matters


def test_state_dict_is_official_whatever_kernels_or_padding() -> None:
    plain = tiny("torch")
    want = {k: v.shape for k, v in plain.state_dict().items()}
    for kernels in ("torch", "triton"):
        for pad in (1, 64):
            net = jit_fast.build_model("JiT-B/16", img_size=IMG, num_classes=CLASSES, kernels=kernels,
                                       mlp_pad_to=pad, **OVERRIDES)
            assert {k: v.shape for k, v in net.state_dict().items()} == want
            net.load_state_dict(plain.state_dict(), strict=True)
            for k, v in net.state_dict().items():
                assert torch.equal(v, plain.state_dict()[k]), (kernels, pad, k)


def loss_inputs():
    g = torch.Generator().manual_seed(7)
    x = torch.rand(4, 3, IMG, IMG, generator=g) * 2 - 1
    y = torch.tensor([1, 2, 3, 4])
    t = torch.sigmoid(torch.randn(4, generator=g) * 0.8 - 0.8)
    noise = torch.randn(4, 3, IMG, IMG, generator=g)
    drop = torch.tensor([False, True, False, False])
    return x, y, t, noise, drop


def test_flow_matching_loss_explicit_draws() -> None:
    net = tiny()
    x, y, t, noise, drop = loss_inputs()
    kw = dict(P_mean=-0.8, P_std=0.8, noise_scale=2.0, t_eps=0.05, label_drop_prob=0.1, num_classes=CLASSES)
    a = jit_fast.flow_matching_loss(net, x, y, t=t, noise=noise, drop=drop, **kw)
    b = jit_fast.flow_matching_loss(net, x, y, t=t, noise=noise, drop=drop, **kw)
    assert a.ndim == 0 and torch.equal(a, b)  # bitwise reproducible
    # by hand: z = t x + (1 - t) e, e = noise_scale * noise; v = (x - z) / max(1 - t, t_eps); same map on x_pred
    tb = t.view(-1, 1, 1, 1)
    z = tb * x + (1 - tb) * (2.0 * noise)
    y_in = torch.where(drop, torch.full_like(y, CLASSES), y)
    assert y_in.tolist() == [1, 10, 3, 4]
    with torch.no_grad():
        x_pred = net(z, t, y_in)
    denom = torch.clamp(1 - tb, min=0.05)
    want = (((x - z) / denom - (x_pred - z) / denom) ** 2).mean()
    torch.testing.assert_close(a.detach(), want, atol=0, rtol=1e-5)
    # every explicit input matters
    assert not torch.equal(a, jit_fast.flow_matching_loss(net, x, y, t=t * 0.9, noise=noise, drop=drop, **kw))
    assert not torch.equal(a, jit_fast.flow_matching_loss(net, x, y, t=t, noise=-noise, drop=drop, **kw))
    assert not torch.equal(a, jit_fast.flow_matching_loss(net, x, y, t=t, noise=noise, drop=~drop, **kw))
    # it trains every parameter except the fixed pos_embed
    net.train()
    jit_fast.flow_matching_loss(net, x, y, t=t, noise=noise, drop=drop, **kw).backward()
    for name, p in net.named_parameters():
        assert (p.grad is None) == (name == "pos_embed"), name
        if p.grad is not None:
            assert p.grad.abs().sum() > 0, name


def test_flow_matching_loss_random_draws_are_seeded() -> None:
    net = tiny()
    x, y, *_ = loss_inputs()
    torch.manual_seed(3)
    a = jit_fast.flow_matching_loss(net, x, y, num_classes=CLASSES)
    torch.manual_seed(3)
    b = jit_fast.flow_matching_loss(net, x, y, num_classes=CLASSES)
    assert torch.equal(a, b)
    c = jit_fast.flow_matching_loss(net, x, y, num_classes=CLASSES)
    assert not torch.equal(a, c)
    # label_drop_prob=1: every label becomes the null class num_classes
    seen = []

    def spy(z, t, yy):
        seen.append(yy.clone())
        return net(z, t, yy)

    jit_fast.flow_matching_loss(spy, x, y, label_drop_prob=1.0, num_classes=CLASSES)
    jit_fast.flow_matching_loss(spy, x, y, label_drop_prob=0.0, num_classes=CLASSES)
    assert seen[0].tolist() == [CLASSES] * 4 and torch.equal(seen[1], y)


def test_sample_with_explicit_noise_and_seed() -> None:
    net = tiny()
    y = torch.tensor([0, 5, 9])
    noise = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    imgs = jit_fast.sample(net, y, steps=50, solver="heun", cfg=2.9, interval=(0.1, 1.0), noise_scale=1.0, seed=0,
                           noise=noise, num_classes=CLASSES)
    assert imgs.shape == (3, 3, IMG, IMG) and torch.isfinite(imgs).all()
    kw = dict(steps=4, cfg=2.9, interval=(0.1, 1.0), num_classes=CLASSES)
    for solver in ("heun", "euler"):
        a = jit_fast.sample(net, y, solver=solver, seed=0, noise=noise, **kw)
        assert torch.equal(a, jit_fast.sample(net, y, solver=solver, seed=5, noise=noise, **kw))  # noise wins
        s0 = jit_fast.sample(net, y, solver=solver, seed=0, **kw)
        assert torch.equal(s0, jit_fast.sample(net, y, solver=solver, seed=0, **kw))
        assert not torch.allclose(s0, jit_fast.sample(net, y, solver=solver, seed=1, **kw))
        assert not torch.allclose(s0, a)
    # `noise` is the standard-normal draw, scaled by noise_scale afterwards
    a = jit_fast.sample(net, y, noise=noise, noise_scale=2.0, **kw)
    torch.testing.assert_close(a, jit_fast.sample(net, y, noise=2.0 * noise, noise_scale=1.0, **kw), atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(ValueError):
        jit_fast.sample(net, y, solver="rk4", **kw)


def test_load_official_checkpoint(tmp_path) -> None:
    nets = {k: tiny(seed=i) for i, k in enumerate(("model", "model_ema1", "model_ema2"))}
    ckpt = {k: {"net." + n: v for n, v in net.state_dict().items()} for k, net in nets.items()}
    ckpt["epoch"] = 3
    ckpt["args"] = argparse.Namespace(model="JiT-B/16", img_size=IMG, class_num=CLASSES)
    path = tmp_path / "checkpoint-last.pth"
    torch.save(ckpt, path)
    sd = jit_fast.load_official_checkpoint(path)
    assert sd["epoch"] == 3 and sd["args"].class_num == CLASSES
    z, t, y = torch.randn(2, 3, IMG, IMG), torch.tensor([0.2, 0.6]), torch.tensor([1, 10])
    for k, src in nets.items():
        assert not any(n.startswith("net.") for n in sd[k])
        net = jit_fast.build_model("JiT-B/16", img_size=IMG, num_classes=CLASSES, **OVERRIDES)
        net.load_state_dict(sd[k], strict=True)
        with torch.no_grad():
            assert torch.equal(net.eval()(z, t, y), src(z, t, y)), k
