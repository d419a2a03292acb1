"""The model is the official JiT: state_dict names/shapes, checkpoint loading, init, and a literal float64 twin.

The expected key list and the reference forward are written here from the facts in DESIGN.md
section 2, independently of jit_fast.model, so a wrong shape or a wrong op in the model fails.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import jit_fast
from jit_fast.configs import MODEL_PRESETS
from jit_fast.model import official_state_dict_shapes

OFFICIAL = {  # preset: depth, hidden, heads, bottleneck, in-context start, patch (DESIGN.md table)
    "JiT-B/16": (12, 768, 12, 128, 4, 16), "JiT-B/32": (12, 768, 12, 128, 4, 32),
    "JiT-L/16": (24, 1024, 16, 128, 8, 16), "JiT-L/32": (24, 1024, 16, 128, 8, 32),
    "JiT-H/16": (32, 1280, 16, 256, 10, 16), "JiT-H/32": (32, 1280, 16, 256, 10, 32),
    "JiT-G/16": (40, 1664, 16, 256, 10, 16), "JiT-G/32": (40, 1664, 16, 256, 10, 32),
}
SWIGLU_HIDDEN = {768: 2048, 1024: 2730, 1280: 3413, 1664: 4437}
PAPER_PARAMS_M = {"JiT-B/16": 131, "JiT-L/16": 459, "JiT-H/16": 953, "JiT-G/16": 2008}  # paper: 131M/459M/953M/2B


def expected_shapes(depth: int, d: int, heads: int, bottleneck: int, patch: int, img: int, classes: int,
                    in_context: int = 32) -> dict[str, tuple[int, ...]]:
    """The official state_dict, written out from the architecture description."""
    h = int(int(4 * d) * 2 / 3)
    out = patch * patch * 3
    s = {
        "pos_embed": (1, (img // patch) ** 2, d),
        "x_embedder.proj1.weight": (bottleneck, 3, patch, patch),
        "x_embedder.proj2.weight": (d, bottleneck, 1, 1), "x_embedder.proj2.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "in_context_posemb": (1, in_context, d),
        "final_layer.norm_final.weight": (d,),
        "final_layer.linear.weight": (out, d), "final_layer.linear.bias": (out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        for name, shape in {
            "norm1.weight": (d,), "norm2.weight": (d,),
            "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
            "attn.q_norm.weight": (d // heads,), "attn.k_norm.weight": (d // heads,),
            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
            "mlp.w12.weight": (2 * h, d), "mlp.w12.bias": (2 * h,),
            "mlp.w3.weight": (d, h), "mlp.w3.bias": (d,),
            "adaLN_modulation.1.weight": (6 * d, d), "adaLN_modulation.1.bias": (6 * d,),
        }.items():
            s[f"blocks.{i}.{name}"] = shape
    return s


def model_shapes(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_presets_are_the_official_table() -> None:
    for name, (depth, d, heads, bottleneck, start, patch) in OFFICIAL.items():
        p = MODEL_PRESETS[name]
        assert (p["depth"], p["hidden_size"], p["num_heads"], p["bottleneck_dim"], p["in_context_start"],
                p["patch_size"]) == (depth, d, heads, bottleneck, start, patch), name
        assert int(int(4 * d) * 2 / 3) == SWIGLU_HIDDEN[d]
        assert p.get("attn_drop", 0.0) == p.get("proj_drop", 0.0) == (0.2 if name[4] in "HG" else 0.0)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("img", [256, 512])
def test_state_dict_keys_and_shapes_are_official(name: str, img: int) -> None:
    depth, d, heads, bottleneck, _, patch = OFFICIAL[name]
    want = expected_shapes(depth, d, heads, bottleneck, patch, img, 1000)
    with torch.device("meta"):
        net = jit_fast.build_model(name, img_size=img, num_classes=1000)
    assert model_shapes(net) == want
    assert official_state_dict_shapes(net.cfg) == want
    if img == 256 and name in PAPER_PARAMS_M:
        n = sum(math.prod(s) for s in want.values())
        assert round(n / 1e6) == PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", ["JiT-L/16", "JiT-H/16", "JiT-G/16"])
def test_fused_and_padded_models_keep_the_official_state_dict(name: str) -> None:
    depth, d, heads, bottleneck, _, patch = OFFICIAL[name]
    with torch.device("meta"):
        net = jit_fast.build_model(name, kernels="triton", mlp_pad_to=128)
    assert net.blocks[0].mlp.w12.weight.shape[0] % 256 == 0  # padded inside
    assert model_shapes(net) == expected_shapes(depth, d, heads, bottleneck, patch, 256, 1000)


def small(**kw) -> torch.nn.Module:
    args = dict(depth=3, hidden_size=48, num_heads=4, bottleneck_dim=8, in_context_start=1, in_context_len=5,
                patch_size=4)
    args.update(kw)
    return jit_fast.build_model("JiT-T/4", img_size=16, num_classes=7, **args)


def randomize(net: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Non-zero values everywhere (adaLN and the output layer start at zero), so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net


def test_official_checkpoint_dict_loads_strict(tmp_path) -> None:
    shapes = expected_shapes(3, 48, 4, 8, 4, 16, 7, in_context=5)
    g = torch.Generator().manual_seed(0)
    sets = {w: {"net." + k: torch.randn(s, generator=g) for k, s in shapes.items()}
            for w in ("model", "model_ema1", "model_ema2")}
    torch.save({**sets, "epoch": 3}, tmp_path / "checkpoint-last.pth")
    sd = jit_fast.load_official_checkpoint(tmp_path / "checkpoint-last.pth")
    net = small()
    for w in ("model", "model_ema1", "model_ema2"):
        net.load_state_dict(sd[w], strict=True)
        for k, v in net.state_dict().items():
            assert torch.equal(v, sets[w]["net." + k]), (w, k)


def test_official_init() -> None:
    net = jit_fast.build_model("JiT-S/4", img_size=32, num_classes=10)
    for block in net.blocks:
        assert not block.adaLN_modulation[1].weight.any() and not block.adaLN_modulation[1].bias.any()
        for lin in (block.attn.qkv, block.attn.proj, block.mlp.w12, block.mlp.w3):
            assert not lin.bias.any()
            fan_in, fan_out = lin.weight.shape[1], lin.weight.shape[0]
            bound = math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    fl = net.final_layer
    assert not any(p.any() for p in (fl.linear.weight, fl.linear.bias, *fl.adaLN_modulation.parameters()))
    for w in (net.y_embedder.embedding_table.weight, net.t_embedder.mlp[0].weight, net.t_embedder.mlp[2].weight,
              net.in_context_posemb):
        assert abs(w.std().item() - 0.02) < 0.004
    assert not net.pos_embed.requires_grad and "pos_embed" in net.state_dict()
    assert all(p.requires_grad for n, p in net.named_parameters() if n != "pos_embed")


def test_dropout_only_in_the_middle_blocks() -> None:
    depth = 8
    net = small(depth=depth, attn_drop=0.2, proj_drop=0.2)
    for i, block in enumerate(net.blocks):
        middle = depth // 4 <= i < depth // 4 * 3
        assert block.attn.attn_drop == (0.2 if middle else 0.0), i
        assert block.attn.proj_drop.p == (0.2 if middle else 0.0), i


# ---- a literal float64 JiT written from the architecture description ----------------------------


def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w


def rope_rotate(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """x (B, H, N, Dh); first half of Dh rotates with the row index, second half with the column."""
    dh = x.shape[-1]
    half = dh // 2
    out = x.clone()
    freqs = [1.0 / 10000 ** (2 * i / half) for i in range(half // 2)]
    for tok in range(n_prefix, x.shape[2]):
        for part, pos in ((0, rows[tok - n_prefix]), (1, cols[tok - n_prefix])):
            for i, f in enumerate(freqs):
                a, b = part * half + 2 * i, part * half + 2 * i + 1
                c, s = math.cos(pos * f), math.sin(pos * f)
                xa, xb = x[:, :, tok, a], x[:, :, tok, b]
                out[:, :, tok, a] = xa * c - xb * s
                out[:, :, tok, b] = xb * c + xa * s
    return out


def literal_jit(sd: dict[str, torch.Tensor], z: torch.Tensor, t: torch.Tensor, y: torch.Tensor, depth: int,
                heads: int, patch: int, start: int, n_ctx: int) -> torch.Tensor:
    """The official forward, op by op, in float64 (no dropout)."""
    sd = {k: v.double() for k, v in sd.items()}
    b, _, img, _ = z.shape
    g = img // patch
    x = F.conv2d(F.conv2d(z, sd["x_embedder.proj1.weight"], stride=patch), sd["x_embedder.proj2.weight"],
                 sd["x_embedder.proj2.bias"])
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    d = x.shape[-1]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    temb = F.linear(F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    yemb = sd["y_embedder.embedding_table.weight"][y]
    c = temb + yemb
    idx = torch.arange(g * g)
    rows, cols = (idx // g).tolist(), (idx % g).tolist()
    prefix = 0
    for i in range(depth):
        if i == start:
            x = torch.cat([yemb[:, None, :] + sd["in_context_posemb"], x], dim=1)
            prefix = n_ctx
        k = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[k + "adaLN_modulation.1.weight"], sd[k + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod[:, None, :].chunk(6, dim=-1)
        h = rms(x, sd[k + "norm1.weight"]) * (1 + sc1) + sh1
        n = h.shape[1]
        qkv = F.linear(h, sd[k + "attn.qkv.weight"], sd[k + "attn.qkv.bias"])
        q, kk, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q = rope_rotate(rms(q, sd[k + "attn.q_norm.weight"]), rows, cols, prefix)
        kk = rope_rotate(rms(kk, sd[k + "attn.k_norm.weight"]), rows, cols, prefix)
        att = torch.softmax(q @ kk.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        x = x + g1 * F.linear(o, sd[k + "attn.proj.weight"], sd[k + "attn.proj.bias"])
        h = rms(x, sd[k + "norm2.weight"]) * (1 + sc2) + sh2
        x1, x2 = F.linear(h, sd[k + "mlp.w12.weight"], sd[k + "mlp.w12.bias"]).chunk(2, dim=-1)
        x = x + g2 * F.linear(F.silu(x1) * x2, sd[k + "mlp.w3.weight"], sd[k + "mlp.w3.bias"])
    x = x[:, prefix:]
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"])[:, None, :].chunk(2, dim=-1)
    x = rms(x, sd["final_layer.norm_final.weight"]) * (1 + scale) + shift
    x = F.linear(x, sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    x = x.reshape(b, g, g, patch, patch, 3)  # (n, h, w, p, q, c) -> (n, c, h*p, w*q)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, 3, img, img)


@pytest.mark.parametrize("start", [0, 1, 3])
def test_model_equals_the_literal_official_forward(start: int) -> None:
    net = randomize(small(in_context_start=start)).double().eval()
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([0.3, 0.85], dtype=torch.float64)
    y = torch.tensor([2, 7])  # 7 = the null class
    with torch.no_grad():
        got = net(z, t, y)
        other = net(z, t, torch.tensor([3, 7]))
    want = literal_jit(net.state_dict(), z, t, y, depth=3, heads=4, patch=4, start=start, n_ctx=5)
    assert got.shape == (2, 3, 16, 16)
    # the official model builds its RoPE tables and timestep sinusoid in fp32: ~1e-7 relative
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    # and the comparison is sensitive: another label moves the output far beyond that
    assert ((other - want).norm() / want.norm()).item() > 1e-3


def test_bad_input_errors() -> None:
    net = small()
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 16, 16\), got \(1, 3, 32, 32\)"):
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown model 'JiT-Q/9'; known presets: JiT-B/16"):
        jit_fast.build_model("JiT-Q/9")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        jit_fast.build_model("JiT-B/16", img_size=250)
    with pytest.raises(ValueError, match="unknown model override"):
        jit_fast.build_model("JiT-B/16", hiden_size=3)
