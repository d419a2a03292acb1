"""Attention dispatch (issue 25): FlashAttention-3, then FlashAttention-2, then cuDNN SDPA, then PyTorch SDPA, by
GPU generation, dtype, dropout and what is installed; head dims a backend cannot run are padded and cut back
exactly. On CPU the backends are fakes: which one is chosen is logic, and the padding is arithmetic."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from jit_fast.model import attention as A


def _on(monkeypatch, capability, installed=("flash_attn_interface", "flash_attn"), cudnn=True):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=capability[0], minor=capability[1]))
    monkeypatch.setattr(A, "_module", lambda name: object() if name in installed else None)
    monkeypatch.setattr(A, "_cudnn_installed", lambda: cudnn)
    backends = tuple(b if b.name != "cudnn-sdpa" else A.Backend(b.name, b.min_capability, b.dropout, b.head_dims,
                                                                  b.run, lambda: cudnn) for b in A.BACKENDS)
    monkeypatch.setattr(A, "BACKENDS", backends)


@pytest.mark.parametrize("capability,installed,cudnn,dropout,d,want", [
    ((9, 0), ("flash_attn_interface", "flash_attn"), True, 0.0, 64, ("flash-attn-3", 64)),
    ((9, 0), ("flash_attn_interface", "flash_attn"), True, 0.0, 80, ("flash-attn-3", 96)),  # JiT-H: padded
    ((9, 0), ("flash_attn_interface", "flash_attn"), True, 0.0, 104, ("flash-attn-3", 128)),  # JiT-G
    ((9, 0), ("flash_attn_interface", "flash_attn"), True, 0.2, 80, ("flash-attn-2", 80)),  # FA3 has no dropout
    ((9, 0), ("flash_attn_interface",), True, 0.2, 80, ("sdpa", 80)),  # nor has cuDNN here
    ((8, 0), ("flash_attn_interface", "flash_attn"), True, 0.0, 104, ("flash-attn-2", 104)),  # FA3 is Hopper only
    ((8, 9), (), True, 0.0, 80, ("cudnn-sdpa", 128)),
    ((8, 9), (), False, 0.0, 80, ("sdpa", 80)),
    ((7, 5), ("flash_attn_interface", "flash_attn"), True, 0.0, 64, ("sdpa", 64)),  # a T4
])
def test_the_fastest_backend_that_takes_the_call_is_chosen(monkeypatch, capability, installed, cudnn, dropout, d,
                                                           want):
    _on(monkeypatch, capability, installed, cudnn)
    with FakeTensorMode(), torch.device("cuda"):
        q = torch.randn(2, 16, 4, d, dtype=torch.bfloat16)
        backend, dim = A.choose(q, q, q, dropout)
    assert (backend.name, dim) == want


def test_fp32_and_cpu_calls_get_sdpa(monkeypatch):
    _on(monkeypatch, (9, 0))
    with FakeTensorMode(), torch.device("cuda"):
        q = torch.randn(2, 16, 4, 64)
        assert A.choose(q, q, q, 0.0) == (A.SDPA, 64)
    q = torch.randn(2, 16, 4, 64, dtype=torch.bfloat16)
    assert A.choose(q, q, q, 0.0) == (A.SDPA, 64)


@pytest.mark.parametrize("d", [80, 104])
def test_padding_is_removed_exactly(d):
    """A fake backend that only runs head dim 128 (and checks it got it) gives the unpadded attention: zero
    columns add exact zeros to q.k, the scale stays 1/sqrt(D), and the cut-off output columns are zeros."""
    seen = {}

    def only_128(q, k, v, dropout_p, scale):
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] == 128
        seen["scale"] = scale
        out = A._sdpa(q, k, v, dropout_p, scale)
        seen["tail"] = out[..., d:].abs().max().item()
        return out

    fake = A.Backend("fake-128", (0, 0), False, (128,), only_128, lambda: True)
    gen = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(2, 40, 3, d, generator=gen, dtype=torch.float64) for _ in range(3))
    got = A.run_at(fake, fake.padded_dim(d), q, k, v)
    want = A.run_at(A.SDPA, d, q, k, v)
    assert got.shape == want.shape == (2, 40, 3, d)
    assert seen["scale"] == 1.0 / math.sqrt(d) and seen["tail"] == 0.0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_cpu_path_is_unchanged():
    """On CPU `attention` is PyTorch SDPA with its default scale, bitwise (the model's numbers do not move)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 4, 64, generator=gen) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.equal(A.attention(q, k, v), ref.transpose(1, 2))


def test_the_selfcheck_judges_each_backend_against_float64():
    """The GPU selfcheck's attention check, run on CPU with fakes: a padded backend passes, one that is 1% off
    (or drops the padding wrongly) fails naming the tensor."""
    from jit_fast.selfcheck import check_attention
    from jit_kernels.selfcheck import Sizes

    sizes = Sizes(tokens=40, heads=((2, 80), (2, 104)))
    good = A.Backend("fake-128", (0, 0), False, (128,), A._sdpa, lambda: True)
    assert check_attention(good, "cpu", sizes).startswith("worst ")
    off = A.Backend("off-by-1%", (0, 0), False, (128,), lambda *a: 1.01 * A._sdpa(*a), lambda: True)
    with pytest.raises(AssertionError, match="out d=80"):
        check_attention(off, "cpu", sizes)
