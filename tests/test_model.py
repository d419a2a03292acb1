"""JiT model facts (DESIGN.md section 2) checked against values written independently in this file.

Everything "expected" here (the official state_dict, the fixed embeddings, RoPE, RMSNorm, the
sampler's step formulas, the loss and a whole float64 forward) is computed from the written
facts with plain loops / float64 torch, never by calling the library helper under test.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import jit_fast
from jit_fast.checkpoint.official import official_state_dict_shapes
from jit_fast.model.embeddings import sincos_pos_embed_2d, timestep_embedding
from jit_fast.sampling.sampler import guidance_scale, in_interval, sample, time_grid
from jit_kernels import reference

# DESIGN.md section 2 table: depth, hidden, heads, bottleneck, in-context start, patch
OFFICIAL = {
    "JiT-B/16": (12, 768, 12, 128, 4, 16),
    "JiT-B/32": (12, 768, 12, 128, 4, 32),
    "JiT-L/16": (24, 1024, 16, 128, 8, 16),
    "JiT-L/32": (24, 1024, 16, 128, 8, 32),
    "JiT-H/16": (32, 1280, 16, 256, 10, 16),
    "JiT-H/32": (32, 1280, 16, 256, 10, 32),
    "JiT-G/16": (40, 1664, 16, 256, 10, 16),
    "JiT-G/32": (40, 1664, 16, 256, 10, 32),
}
HEAD_DIM = {768: 64, 1024: 64, 1280: 80, 1664: 104}
SWIGLU_HIDDEN = {768: 2048, 1024: 2730, 1280: 3413, 1664: 4437}


pytestmark = pytest.mark.usefixtures("one_thread")


def official_shapes(
    depth: int, hidden: int, heads: int, bottleneck: int, patch: int, num_classes: int, in_context_len: int,
    img_size: int,
) -> dict[str, tuple[int, ...]]:
    """Every key (no "net." prefix) and shape of an official JiT state_dict, from the DESIGN.md facts."""
    d, p = hidden, patch
    n = (img_size // p) ** 2
    h = int(int(4 * d) * 2 / 3)
    hd = d // heads
    s: dict[str, tuple[int, ...]] = {
        "x_embedder.proj1.weight": (bottleneck, 3, p, p),
        "x_embedder.proj2.weight": (d, bottleneck, 1, 1),
        "x_embedder.proj2.bias": (d,),
        "pos_embed": (1, n, d),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
    }
    if in_context_len > 0:
        s["in_context_posemb"] = (1, in_context_len, d)
    for i in range(depth):
        b = f"blocks.{i}."
        s[b + "norm1.weight"] = (d,)
        s[b + "attn.qkv.weight"] = (3 * d, d)
        s[b + "attn.qkv.bias"] = (3 * d,)
        s[b + "attn.q_norm.weight"] = (hd,)
        s[b + "attn.k_norm.weight"] = (hd,)
        s[b + "attn.proj.weight"] = (d, d)
        s[b + "attn.proj.bias"] = (d,)
        s[b + "norm2.weight"] = (d,)
        s[b + "mlp.w12.weight"] = (2 * h, d)
        s[b + "mlp.w12.bias"] = (2 * h,)
        s[b + "mlp.w3.weight"] = (d, h)
        s[b + "mlp.w3.bias"] = (d,)
        s[b + "adaLN_modulation.1.weight"] = (6 * d, d)
        s[b + "adaLN_modulation.1.bias"] = (6 * d,)
    s["final_layer.norm_final.weight"] = (d,)
    s["final_layer.linear.weight"] = (p * p * 3, d)
    s["final_layer.linear.bias"] = (p * p * 3,)
    s["final_layer.adaLN_modulation.1.weight"] = (2 * d, d)
    s["final_layer.adaLN_modulation.1.bias"] = (2 * d,)
    return s


def preset_shapes(name: str, img: int, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    depth, d, heads, bottleneck, _, patch = OFFICIAL[name]
    return official_shapes(depth, d, heads, bottleneck, patch, num_classes, 32, img)


def shapes_of(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# 1. the official state_dict


@pytest.mark.parametrize("img", [256, 512])
@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_is_official(name: str, img: int) -> None:
    depth, d, heads, bottleneck, start, patch = OFFICIAL[name]
    want = preset_shapes(name, img)
    with torch.device("meta"):
        net = jit_fast.build_model(name, img_size=img, num_classes=1000)
    assert shapes_of(net) == want
    assert list(net.state_dict()) == list(dict(net.named_parameters()))  # no persistent buffers (RoPE tables)
    assert official_state_dict_shapes(net.cfg) == want
    assert (net.cfg.in_context_start, net.cfg.in_context_len, net.cfg.head_dim) == (start, 32, HEAD_DIM[d])
    assert net.cfg.mlp_hidden == SWIGLU_HIDDEN[d]
    assert all(v.dtype == torch.float32 for v in net.state_dict().values())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_is_official_with_fused_kernels_and_padding(name: str) -> None:
    d = OFFICIAL[name][1]
    with torch.device("meta"):
        net = jit_fast.build_model(name, img_size=256, kernels="triton", mlp_pad_to=128)
    h = SWIGLU_HIDDEN[d]
    padded = -(-h // 128) * 128
    assert net.blocks[0].mlp.w12.weight.shape == (2 * padded, d)  # padded inside ...
    assert net.blocks[0].mlp.w3.weight.shape == (d, padded)
    assert shapes_of(net) == preset_shapes(name, 256)  # ... official outside


# the paper's parameter counts (rounded as the paper prints them), summed from the shape list alone
PAPER_PARAMS = {
    ("JiT-B/16", 256): 131.3e6, ("JiT-L/16", 256): 459e6, ("JiT-H/16", 256): 953e6, ("JiT-G/16", 256): 2e9,
    ("JiT-B/32", 512): 133e6, ("JiT-L/32", 512): 462e6, ("JiT-H/32", 512): 956e6, ("JiT-G/32", 512): 2e9,
}


@pytest.mark.parametrize("name,img", list(PAPER_PARAMS))
def test_parameter_count_matches_the_paper(name: str, img: int) -> None:
    want = PAPER_PARAMS[name, img]
    n = sum(math.prod(s) for s in preset_shapes(name, img).values())
    digits = 1 if want == 131.3e6 else 0
    unit = 1e9 if want >= 1e9 else 1e6
    assert round(n / unit, digits) == round(want / unit, digits)
    with torch.device("meta"):
        net = jit_fast.build_model(name, img_size=img)
    assert sum(p.numel() for p in net.parameters()) == n


# ------------------------------------------------------------------------------------------------
# 2. official checkpoint round trip

SMALL = dict(depth=4, hidden_size=32, num_heads=2, bottleneck_dim=8, in_context_start=2, in_context_len=6,
             patch_size=4)


def small_shapes(num_classes: int = 5, img: int = 32, **kw) -> dict[str, tuple[int, ...]]:
    a = {**SMALL, **kw}
    return official_shapes(a["depth"], a["hidden_size"], a["num_heads"], a["bottleneck_dim"], a["patch_size"],
                           num_classes, a["in_context_len"], img)


def small_model(num_classes: int = 5, img: int = 32, **kw) -> jit_fast.JiT:
    return jit_fast.build_model("JiT-T/4", img_size=img, num_classes=num_classes, **{**SMALL, **kw})


@pytest.mark.parametrize("kernels,pad", [("torch", 1), ("triton", 16)])
def test_official_checkpoint_round_trip(tmp_path, kernels: str, pad: int) -> None:
    shapes = small_shapes()
    g = torch.Generator().manual_seed(0)
    sets = {
        name: {"net." + k: torch.randn(s, generator=g) for k, s in shapes.items()}
        for name in ("model", "model_ema1", "model_ema2")
    }
    path = tmp_path / "checkpoint-last.pth"
    torch.save({**sets, "epoch": 3}, path)
    sd = jit_fast.load_official_checkpoint(path)
    assert sd["epoch"] == 3
    net = small_model(kernels=kernels, mlp_pad_to=pad)
    outs = []
    z, t, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.2, 0.7]), torch.tensor([1, 5])
    for name in ("model", "model_ema1", "model_ema2"):
        assert set(sd[name]) == set(shapes)
        net.load_state_dict(sd[name], strict=True)
        got = net.state_dict()
        assert set(got) == set(shapes)
        for k in shapes:
            assert torch.equal(got[k], sets[name]["net." + k]), (name, k)
        with torch.no_grad():
            outs.append(net.eval()(z, t, y))
    # the three weight sets are different models
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_padded_mlp_is_exact() -> None:
    torch.manual_seed(3)
    plain = randomize(small_model())
    padded = small_model(mlp_pad_to=16)
    padded.load_state_dict(plain.state_dict(), strict=True)
    assert padded.blocks[0].mlp.w12.weight.shape[0] == 2 * 96  # h = 85 -> 96
    z, t, y = torch.randn(2, 3, 32, 32), torch.tensor([0.1, 0.9]), torch.tensor([0, 5])
    with torch.no_grad():
        assert torch.allclose(plain.eval()(z, t, y), padded.eval()(z, t, y), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. formulas, each against an independent float64 computation


@pytest.mark.parametrize("dim,grid", [(32, 8), (64, 4), (768, 16), (1280, 3)])
def test_sincos_pos_embed(dim: int, grid: int) -> None:
    want = torch.empty(grid * grid, dim, dtype=torch.float64)
    q = dim // 4
    for row in range(grid):
        for col in range(grid):
            n = row * grid + col
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                want[n, k] = math.sin(col * w)  # [0, D/2): the column index, [sin | cos]
                want[n, q + k] = math.cos(col * w)
                want[n, 2 * q + k] = math.sin(row * w)  # [D/2, D): the row index
                want[n, 3 * q + k] = math.cos(row * w)
    torch.testing.assert_close(sincos_pos_embed_2d(dim, grid).double(), want, atol=1e-6, rtol=0)
    if dim == 32:  # and the model holds exactly this table
        net = small_model()
        torch.testing.assert_close(net.pos_embed[0].double(), want, atol=1e-6, rtol=0)


def hand_timestep_sinusoid(t: list[float]) -> torch.Tensor:
    out = torch.empty(len(t), 256, dtype=torch.float64)
    for i, ti in enumerate(t):
        for k in range(128):
            f = 10000.0 ** (-k / 128)
            out[i, k] = math.cos(ti * f)  # cos half first, t in [0, 1] unscaled
            out[i, 128 + k] = math.sin(ti * f)
    return out


def test_timestep_embedding() -> None:
    t = [0.0, 0.02, 0.5, 0.97, 1.0]
    want = hand_timestep_sinusoid(t)
    torch.testing.assert_close(timestep_embedding(torch.tensor(t), 256).double(), want, atol=1e-6, rtol=0)
    # the model's t_embedder is Linear(256, D), SiLU, Linear(D, D) on exactly this sinusoid
    net = randomize(small_model()).double()
    mlp = net.t_embedder.mlp
    w0, b0, w2, b2 = mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias
    hand = F.silu(want @ w0.T + b0) @ w2.T + b2
    with torch.no_grad():
        torch.testing.assert_close(net.t_embedder(torch.tensor(t, dtype=torch.float64)), hand, atol=1e-5, rtol=1e-5)


def hand_rope(x: torch.Tensor, grid: int, n_prefix: int) -> torch.Tensor:
    """x (N, Dh) per head: loops over tokens and pairs; prefix (in-context) rows are not rotated."""
    dh = x.shape[-1]
    half = dh // 2
    out = x.clone()
    for tok in range(n_prefix, x.shape[0]):
        row, col = divmod(tok - n_prefix, grid)
        for part, pos in ((0, row), (1, col)):  # first half: row index, second half: column index
            for i in range(dh // 4):
                f = 1.0 / 10000 ** (2 * i / (dh / 2))
                a, b = part * half + 2 * i, part * half + 2 * i + 1
                c, s = math.cos(pos * f), math.sin(pos * f)
                out[tok, a] = x[tok, a] * c - x[tok, b] * s  # x*cos + (-x[2i+1], x[2i])*sin
                out[tok, b] = x[tok, b] * c + x[tok, a] * s
    return out


@pytest.mark.parametrize("in_context", [False, True])
@pytest.mark.parametrize("head_dim,heads,grid", [(16, 2, 8), (80, 1, 3)])
def test_qk_norm_rope(in_context: bool, head_dim: int, heads: int, grid: int) -> None:
    """The model's RoPE tables through its op entry point (RMSNorm q/k, then rotate) against loops."""
    n_prefix = 6 if in_context else 0
    net = small_model(img=4 * grid, hidden_size=head_dim * heads, num_heads=heads, patch_size=4, in_context_len=6)
    assert net.cfg.head_dim == head_dim and net.cfg.grid_size == grid
    cos = (net.rope_incontext_cos if in_context else net.rope_cos).double()
    sin = (net.rope_incontext_sin if in_context else net.rope_sin).double()
    assert torch.equal(cos[:n_prefix], torch.ones(n_prefix, head_dim))  # in-context rows: identity
    assert torch.equal(sin[:n_prefix], torch.zeros(n_prefix, head_dim))
    n = n_prefix + grid * grid
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, n, 3 * heads * head_dim, generator=g, dtype=torch.float64)
    qw = torch.randn(head_dim, generator=g, dtype=torch.float64)
    kw = torch.randn(head_dim, generator=g, dtype=torch.float64)
    q, k, v = net.ops.qk_norm_rope(qkv, qw, kw, cos, sin, heads, 1e-6)
    parts = qkv.view(2, n, 3, heads, head_dim)
    for b in range(2):
        for h in range(heads):
            for got, raw, w in ((q, parts[b, :, 0, h], qw), (k, parts[b, :, 1, h], kw)):
                normed = raw / torch.sqrt((raw * raw).mean(-1, keepdim=True) + 1e-6) * w
                # the official tables are built in fp32: ~1e-7 relative
                torch.testing.assert_close(got[b, :, h], hand_rope(normed, grid, n_prefix), atol=2e-6, rtol=0)
            assert torch.equal(v[b, :, h], parts[b, :, 2, h])


def test_rms_norm() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 48, generator=g, dtype=torch.float64) * 2
    w = torch.randn(48, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xin = x.to(dtype)
        got = reference.rms_norm(xin, w, 1e-6)
        assert got.dtype == dtype  # cast back to the input dtype
        xd = xin.double()
        want = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-6) * w.double()
        want = want.to(dtype).double()  # one rounding at the end: fp32 compute
        ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        torch.testing.assert_close(got.double(), want, atol=ulp * 4, rtol=ulp * 2)
    # fp32 statistics: fp16 squares of 300 overflow, an fp32 sum does not
    big = torch.full((1, 8), 300.0, dtype=torch.float16)
    torch.testing.assert_close(reference.rms_norm(big, torch.ones(8)).float(), torch.ones(1, 8), atol=1e-3, rtol=0)
    # eps = 1e-6 inside the root: x = 1e-4 everywhere gives 1e-4 / sqrt(1e-8 + 1e-6)
    tiny = torch.full((1, 8), 1e-4, dtype=torch.float64)
    torch.testing.assert_close(reference.rms_norm(tiny, torch.ones(8, dtype=torch.float64)),
                               torch.full((1, 8), 1e-4 / math.sqrt(1.01e-6), dtype=torch.float64))
    # the model's norm holds a weight and eps 1e-6
    net = small_model()
    assert net.blocks[0].norm1.eps == net.blocks[0].attn.q_norm.eps == net.final_layer.norm_final.eps == 1e-6


def test_unpatchify() -> None:
    net = small_model(patch_size=8)
    g, p = 4, 8
    tokens = torch.randn(2, g * g, p * p * 3)
    img = net.unpatchify(tokens)
    want = torch.empty(2, 3, g * p, g * p)
    for n in range(2):
        for h in range(g):
            for w in range(g):
                vec = tokens[n, h * g + w]
                for pi in range(p):
                    for qi in range(p):
                        for c in range(3):  # token layout (p, q, c)
                            want[n, c, h * p + pi, w * p + qi] = vec[(pi * p + qi) * 3 + c]
    assert torch.equal(img, want)


def hand_in_interval(t32: float, lo: float, hi: float) -> bool:
    """interval_min < t < interval_max with the bounds compared as fp32; interval_min 0 includes t = 0."""
    lo32 = torch.tensor(lo, dtype=torch.float32).item()
    hi32 = torch.tensor(hi, dtype=torch.float32).item()
    return t32 < hi32 and (lo == 0 or t32 > lo32)


def test_cfg_interval_rule() -> None:
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    cases = {  # (t, lo, hi): guided?
        (0.0, 0.0, 1.0): True, (0.0, 0.1, 1.0): False, (0.1, 0.1, 1.0): False, (0.1000001, 0.1, 1.0): True,
        (0.5, 0.1, 1.0): True, (1.0, 0.1, 1.0): False, (0.999, 0.1, 1.0): True, (0.75, 0.1, 0.75): False,
        (0.05, 0.0, 0.75): True,
    }
    for (t, lo, hi), want in cases.items():
        assert in_interval(f32(t), (lo, hi)) is want, (t, lo, hi)
        assert guidance_scale(f32(t), 2.9, (lo, hi)) == (2.9 if want else 1.0)
    for steps in (2, 10, 50):
        for lo, hi in ((0.1, 1.0), (0.0, 1.0), (0.2, 0.8)):
            for t in time_grid(steps):
                assert in_interval(t, (lo, hi)) == hand_in_interval(t.item(), lo, hi), (steps, lo, hi, t)


class ToyNet:
    """Analytic x-predictor: x = a z + b_y (per class); the last class row is the null class."""

    def __init__(self, a: float, b: list[float]) -> None:
        self.a, self.b = a, torch.tensor(b)

    def __call__(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a * z + self.b[y].view(-1, 1, 1, 1) + 0.0 * t.view(-1, 1, 1, 1)


def test_heun_then_final_euler_step_by_hand() -> None:
    """2 steps: one Heun step 0 -> 0.5, then the final Euler step 0.5 -> 1, with CFG inside (0, 1)."""
    a, b, w, eps = 0.6, [0.3, -0.8, 0.1], 2.5, 0.05
    net = ToyNet(a, b)  # classes 0, 1; null class 2
    noise = torch.tensor([0.7, -1.2]).view(2, 1, 1, 1).expand(2, 3, 2, 2).contiguous()
    y = torch.tensor([0, 1])
    got = sample(net, y, steps=2, solver="heun", cfg=w, interval=(0.0, 1.0), noise_scale=1.5, noise=noise,
                 num_classes=2)
    for i in range(2):
        z = 1.5 * noise[i, 0, 0, 0].item()

        def v(z: float, t: float, i: int = i) -> float:
            vc = (a * z + b[int(y[i])] - z) / max(1 - t, eps)
            vu = (a * z + b[2] - z) / max(1 - t, eps)
            return vu + w * (vc - vu)

        v0 = v(z, 0.0)
        v1 = v(z + 0.5 * v0, 0.5)
        z = z + 0.5 * (v0 + v1) / 2  # Heun
        z = z + 0.5 * v(z, 0.5)  # final Euler
        torch.testing.assert_close(got[i], torch.full((3, 2, 2), z), atol=1e-5, rtol=1e-5)
    # euler everywhere: z1 = z0 + 0.5 v(z0, 0); z2 = z1 + 0.5 v(z1, 0.5); guidance only for t < 0.4
    got = sample(net, y, steps=2, solver="euler", cfg=w, interval=(0.0, 0.4), noise=noise, num_classes=2)
    for i in range(2):
        z = noise[i, 0, 0, 0].item()
        vc = (a * z + b[int(y[i])] - z) / 1.0
        vu = (a * z + b[2] - z) / 1.0
        z = z + 0.5 * (vu + w * (vc - vu))
        z = z + 0.5 * (a * z + b[int(y[i])] - z) / 0.5  # t = 0.5 outside the interval: conditional only
        torch.testing.assert_close(got[i], torch.full((3, 2, 2), z), atol=1e-5, rtol=1e-5)


def test_flow_matching_loss_by_hand() -> None:
    x = torch.tensor([[0.5, -1.0, 0.25], [0.75, 0.0, -0.5]], dtype=torch.float64).view(2, 3, 1, 1)
    e = torch.tensor([[1.0, -0.5, 2.0], [-1.5, 0.25, 0.5]], dtype=torch.float64).view(2, 3, 1, 1)
    t = torch.tensor([0.3, 0.99], dtype=torch.float64)  # 0.99: the t_eps clamp is active
    y = torch.tensor([4, 2])
    drop = torch.tensor([True, False])
    seen = []

    def net(z: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        seen.append(yy.tolist())
        return torch.tanh(z) + 0.1 * yy.double().view(-1, 1, 1, 1)

    loss = jit_fast.flow_matching_loss(net, x, y, t=t, noise=e, drop=drop, noise_scale=2.0, t_eps=0.05,
                                       num_classes=7)
    assert seen == [[7, 2]]  # label 4 dropped to the null class 7
    total = 0.0
    for i in range(2):
        ti, yi = t[i].item(), [7, 2][i]
        for c in range(3):
            xi, ei = x[i, c, 0, 0].item(), 2.0 * e[i, c, 0, 0].item()
            z = ti * xi + (1 - ti) * ei
            v = (xi - z) / max(1 - ti, 0.05)
            v_pred = (math.tanh(z) + 0.1 * yi - z) / max(1 - ti, 0.05)
            total += (v - v_pred) ** 2
    assert math.isclose(loss.item(), total / 6, rel_tol=1e-12)


# ------------------------------------------------------------------------------------------------
# 4. an independent float64 JiT written from DESIGN.md section 2


def randomize(net: torch.nn.Module, seed: int = 1, std: float = 0.3) -> torch.nn.Module:
    """Random values in every official tensor (adaLN and the output layer start at zero), so every path matters.

    Written through load_state_dict, so a padded SwiGLU keeps its zero padding.
    """
    g = torch.Generator().manual_seed(seed)
    sd = net.state_dict()
    new = {}
    for name, p in sd.items():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64) * std
        if "norm" in name:
            r = 1 + r  # norm weights around one
        new[name] = p if name == "pos_embed" else r.to(p.dtype)
    net.load_state_dict(new, strict=True)
    return net


def ref_rope_angles(head_dim: int, grid: int, n_prefix: int) -> torch.Tensor:
    """(n_prefix + grid^2, head_dim // 2) angle of each rotation pair; in-context rows angle 0."""
    quarter = head_dim // 4
    ang = torch.zeros(n_prefix + grid * grid, head_dim // 2, dtype=torch.float64)
    for tok in range(grid * grid):
        row, col = divmod(tok, grid)
        for i in range(quarter):
            f = 1.0 / 10000 ** (2 * i / (head_dim / 2))
            ang[n_prefix + tok, i] = row * f
            ang[n_prefix + tok, quarter + i] = col * f
    return ang


def ref_rotate(x: torch.Tensor, ang: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, Dh): pairs (x[2i], x[2i+1]) turned by ang[:, i]."""
    xa, xb = x[..., 0::2], x[..., 1::2]
    c, s = ang.cos(), ang.sin()
    out = torch.empty_like(x)
    out[..., 0::2] = xa * c - xb * s
    out[..., 1::2] = xb * c + xa * s
    return out


def ref_rms(x: torch.Tensor, w: torch.Tensor, fp32_stats: bool = False) -> torch.Tensor:
    """x / sqrt(mean(x^2) + 1e-6) * w; `fp32_stats`: normalized in fp32 as the official RMSNorm does."""
    if fp32_stats:
        h = x.float()
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def ref_pos_embed(d: int, grid: int) -> torch.Tensor:
    q = d // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    col_a = cols.reshape(-1, 1).double() * omega
    row_a = rows.reshape(-1, 1).double() * omega
    return torch.cat([col_a.sin(), col_a.cos(), row_a.sin(), row_a.cos()], dim=1)


def ref_jit(sd: dict[str, torch.Tensor], z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, heads: int,
            patch: int, depth: int, in_context_len: int, in_context_start: int,
            official_precision: bool = False) -> torch.Tensor:
    """The official JiT forward, op by op, in float64 (eval: no dropout). `sd` has the official keys.

    `official_precision`: the t sinusoid and the RMSNorm statistics in fp32, as the official code
    computes them whatever the model dtype (everything else stays float64).
    """
    sd = {k: v.double() for k, v in sd.items()}
    t_sinusoid_dtype = torch.float32 if official_precision else torch.float64
    rms = lambda x, w: ref_rms(x, w, fp32_stats=official_precision)
    b, _, img, _ = z.shape
    g = img // patch
    d = sd["pos_embed"].shape[-1]
    hd = d // heads
    # patch embedding: Conv p x p without bias, then Conv 1x1 with bias; fixed 2D sin-cos positions
    x = F.conv2d(z, sd["x_embedder.proj1.weight"], stride=patch)
    x = F.conv2d(x, sd["x_embedder.proj2.weight"], sd["x_embedder.proj2.bias"])
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]  # the stored (fp32) table; its values: see below
    # conditioning c = t_emb + y_emb; sinusoid of t: cos half first, max period 10000, unscaled t
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=t_sinusoid_dtype) / 128)
    args = t.to(t_sinusoid_dtype)[:, None] * freqs[None]
    sinus = torch.cat([args.cos(), args.sin()], dim=-1).double()
    t_emb = F.linear(F.silu(F.linear(sinus, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                     sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    n_prefix = 0
    for i in range(depth):
        if in_context_len > 0 and i == in_context_start:
            ctx = y_emb[:, None, :].repeat(1, in_context_len, 1) + sd["in_context_posemb"]
            x = torch.cat([ctx, x], dim=1)
            n_prefix = in_context_len
        ang = ref_rope_angles(hd, g, n_prefix)
        k = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[k + "adaLN_modulation.1.weight"], sd[k + "adaLN_modulation.1.bias"])
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        # attention: qkv -> heads -> RMSNorm q, k over head_dim -> RoPE -> softmax(q k^T / sqrt(d)) v
        h = modulate(rms(x, sd[k + "norm1.weight"]), shift_msa, scale_msa)
        n = h.shape[1]
        qkv = F.linear(h, sd[k + "attn.qkv.weight"], sd[k + "attn.qkv.bias"]).view(b, n, 3, heads, hd)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, hd) each
        q = ref_rotate(rms(q, sd[k + "attn.q_norm.weight"]), ang)
        kk = ref_rotate(rms(kk, sd[k + "attn.k_norm.weight"]), ang)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        x = x + gate_msa[:, None] * F.linear(o, sd[k + "attn.proj.weight"], sd[k + "attn.proj.bias"])
        # SwiGLU MLP
        h = modulate(rms(x, sd[k + "norm2.weight"]), shift_mlp, scale_mlp)
        x1, x2 = F.linear(h, sd[k + "mlp.w12.weight"], sd[k + "mlp.w12.bias"]).chunk(2, dim=-1)
        x = x + gate_mlp[:, None] * F.linear(F.silu(x1) * x2, sd[k + "mlp.w3.weight"], sd[k + "mlp.w3.bias"])
    x = x[:, n_prefix:]  # drop the in-context tokens
    mod = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"], sd["final_layer.adaLN_modulation.1.bias"])
    shift, scale = mod.chunk(2, dim=-1)
    x = modulate(rms(x, sd["final_layer.norm_final.weight"]), shift, scale)
    x = F.linear(x, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    x = x.view(b, g, g, patch, patch, 3)  # (n, h, w, p, q, c) -> (n, c, h*p, w*q)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, g * patch, g * patch)


def install_exact_rope(net: jit_fast.JiT) -> None:
    """Replace the model's fp32-built RoPE tables by float64 ones (cos/sin per element, pairs interleaved)."""
    cfg = net.cfg
    for name, n_prefix in (("rope", 0), ("rope_incontext", cfg.in_context_len)):
        ang = ref_rope_angles(cfg.head_dim, cfg.grid_size, n_prefix).repeat_interleave(2, dim=-1)
        getattr(net, f"{name}_cos").copy_(ang.cos())
        getattr(net, f"{name}_sin").copy_(ang.sin())


REF_CASES = [  # patch, in_context_len, in_context_start
    (4, 6, 2),
    (8, 6, 0),
    (8, 6, 3),
    (8, 0, 2),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def ref_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([0.15, 0.8], dtype=torch.float64)
    y = torch.tensor([3, 5])  # 5 = the null class
    return z, t, y


@pytest.mark.parametrize("patch,ctx_len,ctx_start", REF_CASES)
def test_model_equals_independent_float64_reference(patch: int, ctx_len: int, ctx_start: int) -> None:
    net = small_model(patch_size=patch, in_context_len=ctx_len, in_context_start=ctx_start, attn_drop=0.2,
                      proj_drop=0.2)  # dropout is off in eval mode
    net = randomize(net).double().eval()
    z, t, y = ref_inputs()
    kw = dict(heads=2, patch=patch, depth=4, in_context_len=ctx_len, in_context_start=ctx_start)
    sd = net.state_dict()
    assert shapes_of(net) == small_shapes(patch_size=patch, in_context_len=ctx_len)
    # the stored pos_embed is the sin-cos table (kept in fp32 like the official parameter)
    torch.testing.assert_close(sd["pos_embed"][0], ref_pos_embed(32, 32 // patch), atol=1e-7, rtol=0)
    with torch.no_grad():
        got = net(z, t, y)
        # fully independent: float64 everywhere; the model builds its RoPE tables and t sinusoid in fp32
        want = ref_jit(sd, z, t, y, **kw)
        assert got.shape == (2, 3, 32, 32)
        assert rel_err(got, want) < 1e-6
        # tight: float64 RoPE tables in the model; the reference with the official fp32 t sinusoid and norms
        install_exact_rope(net)
        got = net(z, t, y)
        want = ref_jit(sd, z, t, y, official_precision=True, **kw)
        assert rel_err(got, want) < 1e-10
        # and that tolerance is meaningful: another label, time or in-context start moves the output far
        assert rel_err(net(z, t, torch.tensor([2, 5])), want) > 1e-3
        assert rel_err(net(z, t + 0.01, y), want) > 1e-4
        if ctx_len:
            moved = ref_jit(sd, z, t, y, official_precision=True, **{**kw, "in_context_start": ctx_start + 1})
            assert rel_err(moved, want) > 1e-3


@pytest.mark.parametrize("kernels,pad", [("triton", 16), ("torch", 32)])
def test_fused_padded_model_equals_independent_reference(kernels: str, pad: int) -> None:
    """The fused ops only take fp32/bf16/fp16: fp32 model against the float64 reference."""
    net = randomize(small_model(patch_size=8, in_context_start=1, kernels=kernels, mlp_pad_to=pad)).eval()
    z, t, y = ref_inputs()
    with torch.no_grad():
        got = net(z.float(), t.float(), y).double()
    want = ref_jit(net.state_dict(), z, t, y, heads=2, patch=8, depth=4, in_context_len=6, in_context_start=1)
    assert rel_err(got, want) < 1e-5


# ------------------------------------------------------------------------------------------------
# 5. init


def test_official_init() -> None:
    torch.manual_seed(0)
    net = jit_fast.build_model("JiT-T/4", img_size=32, num_classes=100, hidden_size=256, num_heads=4, depth=4,
                               bottleneck_dim=32, patch_size=4, in_context_len=8, in_context_start=1)
    sd = dict(net.named_parameters())
    for name, p in sd.items():
        if name.endswith(".bias"):
            assert not p.any(), name  # all biases zero
        if "adaLN_modulation" in name or name.startswith("final_layer.linear"):
            assert not p.any(), name  # adaLN and the final linear zero
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    # xavier-uniform on every other Linear / patch conv (flattened): |w| <= sqrt(6 / (fan_in + fan_out))
    for name, p in sd.items():
        if not name.endswith("weight") or p.ndim < 2 or "adaLN" in name or "final_layer.linear" in name:
            continue
        if name.startswith(("t_embedder", "y_embedder")):
            continue
        fan_out, fan_in = p.shape[0], p[0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert p.abs().max() <= bound and p.abs().max() > 0.95 * bound, name
        assert abs(p.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name
    # label table, t-MLP and in-context positions N(0, 0.02)
    for name in ("y_embedder.embedding_table.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight",
                 "in_context_posemb"):
        p = sd[name]
        assert abs(p.std().item() - 0.02) < 0.002 and abs(p.mean().item()) < 0.002, name
    # pos_embed: fixed, not trained, but in the state_dict
    assert not net.pos_embed.requires_grad and "pos_embed" in net.state_dict()
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["pos_embed"]


@pytest.mark.parametrize("depth", [4, 8, 10])
def test_dropout_only_in_middle_blocks(depth: int) -> None:
    net = randomize(small_model(depth=depth, in_context_start=1, attn_drop=0.3, proj_drop=0.3)).train()
    # the official expression is `depth // 4 * 3 > i >= depth // 4` (= 3 * depth // 4 when 4 divides depth,
    # as for every preset; depth 10 gives blocks 2..5)
    middle = [depth // 4 <= i < depth // 4 * 3 for i in range(depth)]
    assert sum(middle) == {4: 2, 8: 4, 10: 4}[depth]
    for i, block in enumerate(net.blocks):
        assert block.attn.attn_drop == (0.3 if middle[i] else 0.0), i
        assert block.attn.proj_drop.p == (0.3 if middle[i] else 0.0), i
    # behaviour: in train mode only the middle blocks are random
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 32, generator=g)
    c = torch.randn(2, 32, generator=g)
    rope = (net.rope_cos, net.rope_sin)
    for i, block in enumerate(net.blocks):
        with torch.no_grad():
            a = block(x, c, rope)
            b = block(x, c, rope)
        same = all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
        assert same is not middle[i], i
    # eval mode: deterministic everywhere
    net.eval()
    z, t, y = torch.randn(1, 3, 32, 32), torch.tensor([0.5]), torch.tensor([1])
    with torch.no_grad():
        assert torch.equal(net(z, t, y), net(z, t, y))


def test_presets_dropout() -> None:
    for name in OFFICIAL:
        cfg = jit_fast.model_config(name)
        want = 0.2 if name[4] in "HG" else 0.0
        assert cfg.attn_drop == cfg.proj_drop == want, name


# ------------------------------------------------------------------------------------------------
# 6. bad input


def test_wrong_image_size_raises() -> None:
    net = small_model()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*\(2, 3, 64, 64\)"):
        net(torch.zeros(2, 3, 64, 64), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 32\)"):
        net(torch.zeros(1, 1, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError) as err:
        jit_fast.build_model("JiT-X/16")
    msg = str(err.value)
    assert "JiT-X/16" in msg
    for name in OFFICIAL:
        assert name in msg
