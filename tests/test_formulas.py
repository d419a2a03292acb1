"""JiT's fixed formulas against independent float64 computations written from DESIGN.md section 2."""

from __future__ import annotations

import math

import pytest
import torch

import jit_fast
from jit_fast.denoiser import flow_matching_loss
from jit_fast.embeddings import rope_tables, sincos_pos_embed_2d, timestep_embedding
from jit_fast.sampler import euler_step, guidance_scale, heun_step, in_interval, solve
from kernels import reference


@pytest.mark.parametrize("dim,grid", [(768, 16), (64, 4), (1280, 8)])
def test_sincos_pos_embed(dim: int, grid: int) -> None:
    got = sincos_pos_embed_2d(dim, grid)
    want = torch.empty(grid * grid, dim, dtype=torch.float64)
    q = dim // 4
    for r in range(grid):
        for c in range(grid):
            for k in range(q):
                w = 1.0 / 10000 ** (k / q)
                # [0, D/2): the column index; [D/2, D): the row index; each half [sin | cos]
                want[r * grid + c, k] = math.sin(c * w)
                want[r * grid + c, q + k] = math.cos(c * w)
                want[r * grid + c, 2 * q + k] = math.sin(r * w)
                want[r * grid + c, 3 * q + k] = math.cos(r * w)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_timestep_embedding() -> None:
    t = torch.tensor([0.0, 0.05, 0.5, 0.999])
    got = timestep_embedding(t, 256)
    want = torch.empty(4, 256, dtype=torch.float64)
    for i, ti in enumerate(t.double().tolist()):
        for k in range(128):
            f = math.exp(-math.log(10000) * k / 128)
            want[i, k] = math.cos(ti * f)  # cosine half first; t is not scaled by 1000
            want[i, 128 + k] = math.sin(ti * f)
    assert torch.allclose(got.double(), want, atol=1e-6)


def test_rms_norm() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 96, generator=g) * 3
    w = torch.randn(96, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        got = reference.rms_norm(x.to(dtype), w)
        assert got.dtype == dtype
        xd = x.to(dtype).double()
        want = xd / torch.sqrt((xd**2).mean(-1, keepdim=True) + 1e-6) * w.double()
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol)


def rotate_literal(x: torch.Tensor, pos: tuple[int, int] | None) -> torch.Tensor:
    """One head vector (Dh,): pairs (2i, 2i+1) of the first half turn by row * f_i, of the second by col * f_i."""
    if pos is None:
        return x.clone()
    dh = x.shape[0]
    half = dh // 2
    out = x.clone()
    for part, p in enumerate(pos):
        for i in range(half // 2):
            f = 1.0 / 10000 ** (2 * i / half)
            a, b = part * half + 2 * i, part * half + 2 * i + 1
            out[a] = x[a] * math.cos(p * f) - x[b] * math.sin(p * f)
            out[b] = x[b] * math.cos(p * f) + x[a] * math.sin(p * f)
    return out


@pytest.mark.parametrize("head_dim,grid,prefix", [(64, 4, 0), (80, 3, 32), (104, 2, 3)])
def test_qk_norm_rope_with_in_context_rows(head_dim: int, grid: int, prefix: int) -> None:
    heads, n = 2, prefix + grid * grid
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(1, n, 3 * heads * head_dim, generator=g, dtype=torch.float64)
    qw, kw = torch.randn(head_dim, generator=g, dtype=torch.float64), torch.randn(head_dim, generator=g,
                                                                                     dtype=torch.float64)
    cos, sin = rope_tables(head_dim, grid, prefix)
    q, k, v = reference.qk_norm_rope(qkv, qw, kw, cos.double(), sin.double(), heads)
    parts = qkv.view(1, n, 3, heads, head_dim)
    for tok in range(n):
        pos = None if tok < prefix else divmod(tok - prefix, grid)  # (row, col); in-context rows: identity
        for h in range(heads):
            for got, raw, w in ((q, parts[0, tok, 0, h], qw), (k, parts[0, tok, 1, h], kw)):
                normed = raw / torch.sqrt((raw**2).mean() + 1e-6) * w
                assert torch.allclose(got[0, tok, h], rotate_literal(normed, pos), atol=1e-6), (tok, h)
            assert torch.equal(v[0, tok, h], parts[0, tok, 2, h])


def test_unpatchify() -> None:
    net = jit_fast.build_model("JiT-T/4", img_size=16, num_classes=3)
    p, g = 4, 4
    tokens = torch.randn(2, g * g, p * p * 3)
    img = net.unpatchify(tokens)
    for n in range(2):
        for h in range(g):
            for w in range(g):
                patch = tokens[n, h * g + w].view(p, p, 3)  # (p, q, c)
                assert torch.equal(img[n, :, h * p:(h + 1) * p, w * p:(w + 1) * p], patch.permute(2, 0, 1))


def test_cfg_interval_rule() -> None:
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    assert in_interval(t(0.5), (0.1, 1.0)) and not in_interval(t(0.1), (0.1, 1.0))
    assert not in_interval(t(0.05), (0.1, 1.0)) and not in_interval(t(1.0), (0.1, 1.0))
    assert in_interval(t(0.0), (0.0, 1.0))  # a zero interval_min includes t = 0
    assert guidance_scale(t(0.5), 2.9, (0.1, 1.0)) == 2.9 and guidance_scale(t(0.05), 2.9, (0.1, 1.0)) == 1.0


def test_heun_and_final_euler_step() -> None:
    """dz/dt = a z + b t for a toy velocity: one step each against the hand formulas."""
    a, b = -0.7, 0.3
    vel = lambda z, t: a * z + b * t  # noqa: E731
    z = torch.tensor([1.5, -2.0], dtype=torch.float64)
    t0, t1 = torch.tensor(0.2, dtype=torch.float64), torch.tensor(0.45, dtype=torch.float64)
    h = 0.25
    v0 = a * z + b * 0.2
    pred = z + h * v0
    v1 = a * pred + b * 0.45
    assert torch.allclose(heun_step(vel, z, t0, t1), z + h * (v0 + v1) / 2, atol=1e-15)
    assert torch.allclose(euler_step(vel, z, t0, t1), z + h * v0, atol=1e-15)
    # solve: Heun on all intervals but the last, Euler on the last
    zz = z.clone()
    grid = torch.linspace(0, 1, 4)
    for i in range(2):
        zz = heun_step(vel, zz, grid[i], grid[i + 1])
    assert torch.allclose(solve(vel, z, 3, "heun"), euler_step(vel, zz, grid[2], grid[3]), atol=1e-12)


def test_loss_on_fixed_tensors() -> None:
    x = torch.tensor([[[[0.5, -1.0]]], [[[0.25, 0.75]]]], dtype=torch.float64)  # (2, 1, 1, 2)
    e = torch.tensor([[[[1.0, 0.0]]], [[[-2.0, 0.5]]]], dtype=torch.float64)
    t = torch.tensor([0.3, 0.98], dtype=torch.float64)
    y = torch.tensor([4, 1])
    drop = torch.tensor([False, True])
    seen = {}

    def net(z, tt, yy):
        seen["y"] = yy
        return 0.5 * z  # an arbitrary x-predictor

    loss = flow_matching_loss(net, x, y, t=t, noise=e, drop=drop, noise_scale=2.0, t_eps=0.05, num_classes=10)
    total = 0.0
    for i in range(2):
        ti = t[i].item()
        for j in range(2):
            xi, ei = x[i, 0, 0, j].item(), 2.0 * e[i, 0, 0, j].item()
            z = ti * xi + (1 - ti) * ei
            denom = max(1 - ti, 0.05)
            v, v_pred = (xi - z) / denom, (0.5 * z - z) / denom
            total += (v - v_pred) ** 2
    assert math.isclose(loss.item(), total / 4, rel_tol=1e-12)
    assert seen["y"].tolist() == [4, 10]  # the dropped label becomes the null class
