"""The traffic counter: hand-checked bytes, opaque custom ops, fake-vs-real agreement, fused-path targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.flash_standin import flash_attention
from benchmarks.roofline import H100, project
from benchmarks.traffic import (
    NON_GEMM,
    compare,
    count_block,
    count_forward,
    count_function,
    count_train_step,
    footprint,
)
from kernels import reference


def test_rmsnorm_bytes_equal_hand_count() -> None:
    """RMSNorm of bf16 (B, N, D) with an fp32 weight, op by op (T = B*N*D elements, R = B*N rows).

    to(fp32) 2T->4T; pow 4T->4T; mean 4T->4R; +eps 4R->4R; rsqrt 4R->4R; h*rstd 4T+4R->4T;
    weight*h 4D+4T->4T; to(bf16) 4T->2T. Read 22T+12R+4D, written 18T+12R, 8 launches.
    """
    b, n, d = 2, 4, 8
    x = torch.randn(b, n, d, dtype=torch.bfloat16)
    w = torch.randn(d)
    c = count_function(lambda: reference.rms_norm(x, w))
    t, r = b * n * d, b * n
    tot = c.totals()
    assert tot["launches"] == 8
    assert tot["bytes_read"] == 22 * t + 12 * r + 4 * d == 1536
    assert tot["bytes_written"] == 18 * t + 12 * r == 1248


def test_footprint_counts_broadcast_once() -> None:
    s = torch.randn(4, 16)
    assert footprint(s.unsqueeze(1).expand(4, 100, 16)) == 4 * 16 * 4
    assert footprint(torch.tensor(3.0)) == 0


@torch.library.custom_op("jit_fast::_traffic_test_axpy", mutates_args=())
def _axpy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Stand-in fused op whose CPU impl issues several aten ops."""
    return (x * 2.0 + y).relu().to(torch.bfloat16)


@_axpy.register_fake
def _axpy_fake(x, y):
    return x.new_empty(x.shape, dtype=torch.bfloat16)


@pytest.mark.parametrize("fake", [False, True])
def test_custom_op_is_one_opaque_launch(fake: bool) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    ctx = FakeTensorMode() if fake else torch.autograd.grad_mode.no_grad()
    with ctx:
        x, y = torch.randn(64, 32), torch.randn(64, 32)
        c = count_function(lambda: torch.ops.jit_fast._traffic_test_axpy(x, y))
    assert [r.op for r in c.records] == ["jit_fast::_traffic_test_axpy"]
    r = c.records[0]
    assert (r.category, r.launches, r.bytes_read, r.bytes_written) == ("fused", 1, 2 * 64 * 32 * 4, 64 * 32 * 2)


def test_gemm_flops_and_category() -> None:
    a, b = torch.randn(16, 32), torch.randn(32, 8)
    c = count_function(lambda: a @ b)
    (r,) = c.records
    assert (r.category, r.flops) == ("gemm", 2 * 16 * 32 * 8)


def test_flash_attention_standin_matches_sdpa() -> None:
    """The counting stand-in is real attention: forward and gradients equal SDPA's."""
    q, k, v = (torch.randn(2, 10, 3, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    o = flash_attention(q, k, v)[0]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(o, ref)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("path", ["eager", "fused"])
def test_fake_count_equals_real_count(path: str) -> None:
    """Fake tensors dispatch the same ops with the same bytes as real tensors (small model, real CPU run)."""
    kw = dict(model="JiT-T/4", path=path, batch=2, img_size=16)
    real, fake = count_block(fake=False, **kw), count_block(fake=True, **kw)
    key = [(r.phase, r.op, r.launches, r.bytes_read, r.bytes_written, r.flops) for r in real.records]
    assert key == [(r.phase, r.op, r.launches, r.bytes_read, r.bytes_written, r.flops) for r in fake.records]
    assert real.saved_activation_bytes == fake.saved_activation_bytes > 0


@pytest.mark.parametrize(("model", "params"), [("JiT-B/16", "fp32"), ("JiT-H/16", "fp32"), ("JiT-B/16", "bf16")])
def test_fused_internals_match_launch_helpers(model: str, params: str) -> None:
    """Opaque custom ops + their modules' workspace == the CUDA launch helpers counted launch by launch."""
    kw = dict(param_dtype=PARAMS[params])
    opaque = count_block(model, "fused", 128, **kw)
    launched = count_block(model, "fused", 128, launch_helpers=True, **kw)
    assert any(r.op.startswith("triton::") for r in launched.records)
    assert not any(r.op.startswith("jit_fast::") for r in launched.records)
    for phase in ("fwd", "bwd"):
        a, b = opaque.totals((phase,)), launched.totals((phase,))
        assert (a["launches"], a["bytes"]) == (b["launches"], b["bytes"]), phase
    assert opaque.saved_activation_bytes == launched.saved_activation_bytes


def test_eager_block_counts_scale_with_batch() -> None:
    """Token-proportional traffic: doubling the batch doubles non-GEMM bytes up to batch-independent terms."""
    one, two, four = (count_block("JiT-B/16", "eager", b).totals(("fwd", "bwd"), NON_GEMM)["bytes"] for b in (1, 2, 4))
    assert two - one == (four - two) / 2 > 0
    assert one == count_block("JiT-B/16", "eager", 1).totals(("fwd", "bwd"), NON_GEMM)["bytes"]


def test_block_flops_match_closed_form() -> None:
    """Forward GEMM+attention FLOPs of a B/16 block = 2*B*N*(D*3D + D*D + D*2h + h*D) + 4*B*N^2*D + adaLN."""
    b, n, d, h = 4, 288, 768, 2048
    c = count_block("JiT-B/16", "eager", b)
    gemm = 2 * b * n * (3 * d * d + d * d + 2 * h * d + h * d) + 2 * b * d * 6 * d
    attn = 4 * b * n * n * d
    assert c.totals(("fwd",))["flops"] == gemm + attn


_RATIOS: dict[tuple[str, str], dict] = {}
PARAMS = {"fp32": None, "bf16": torch.bfloat16}


def _ratios(model: str, params: str = "fp32") -> dict:
    """Fused/eager ratios of the standard block at batch 128, forward+backward (cached).

    params "fp32": fp32 parameters under bf16 autocast (single-GPU training, the official recipe);
    "bf16": bf16 block parameters and an fp32 root, as FSDP2 gathers them in multi-GPU training.
    """
    if (model, params) not in _RATIOS:
        kw = dict(param_dtype=PARAMS[params])
        _RATIOS[model, params] = compare(count_block(model, "eager", 128, **kw), count_block(model, "fused", 128, **kw))
        print(model, params, _RATIOS[model, params])
    return _RATIOS[model, params]


# Issue 7 acceptance on the standard block (in-context tokens, pending residual, no dropout) at batch 128.
# bf16 block params with an fp32 root (FSDP2, the multi-GPU training path): launches 38 / 194 = 19.6%,
# non-GEMM bytes 13.3%, saved activations 56.5% (B/16 and H/16). fp32 params under bf16 autocast (one
# process without FSDP): launches 52 / 210 = 24.8%, non-GEMM bytes 13.7% (B/16) / 13.9% (H/16), saved
# 56.5%. Those 52: 15 GEMMs, 2 attention, 8 fused-op kernels + 6 second-stage reductions inside their
# backwards, 16 autocast casts of weights/biases and of their gradients, 2 bias-gradient sums (w3,
# adaLN; the qkv, w12 and proj bias gradients come out of the fused backwards), adaLN SiLU,
# SiLU-backward and cat.
CASES = [(m, p) for m in ("JiT-B/16", "JiT-H/16") for p in PARAMS]


@pytest.mark.parametrize(("model", "params"), CASES)
def test_fused_block_saved_activations(model: str, params: str) -> None:
    assert _ratios(model, params)["saved_ratio"] <= 0.60


@pytest.mark.parametrize(("model", "params"), CASES)
def test_fused_block_non_gemm_bytes(model: str, params: str) -> None:
    assert _ratios(model, params)["non_gemm_bytes_ratio"] <= 0.15


@pytest.mark.parametrize(("model", "params"), CASES)
def test_fused_block_launches(model: str, params: str) -> None:
    assert _ratios(model, params)["launches_ratio"] <= 0.25


def test_dropout_block_launches() -> None:
    """A block in the dropout range (H/16, fp32 params) keeps the proj bias in its GEMM, since dropout
    sits between that GEMM and the residual: 63 / 218 = 28.9% counted, not under the 25% of the standard
    block. Fails if that regresses."""
    eager = count_block("JiT-H/16", "eager", 128, which="dropout")
    fused = count_block("JiT-H/16", "fused", 128, which="dropout")
    assert compare(eager, fused)["launches_ratio"] <= 0.29


def test_fused_block_is_modeled_faster_on_h100() -> None:
    eager, fused = count_block("JiT-B/16", "eager", 128), count_block("JiT-B/16", "fused", 128)
    assert project(fused, H100)["seconds"] < project(eager, H100)["seconds"]


@pytest.mark.parametrize(("model", "paper_gmacs"), [("JiT-B/16", 25), ("JiT-L/16", 88), ("JiT-H/16", 182),
                                                    ("JiT-G/16", 383)])
def test_forward_flops_match_paper(model: str, paper_gmacs: int) -> None:
    """Counted forward FLOPs per image = 2 x the paper's "Gflops" (multiply-adds) at 256px, within 1%."""
    gflops = count_forward(model, "eager", 1).totals()["model_flops"] / 1e9
    assert abs(gflops / (2 * paper_gmacs) - 1) < 0.01


def test_train_step_model_flops_are_three_forwards() -> None:
    """Backward = 2x forward FLOPs except the image-side patch-embedding input gradient, which is not needed."""
    step = count_train_step("JiT-B/16", "eager", 2, optimizer=False)
    fwd = step.totals(("fwd",))["model_flops"]
    assert 2.95 * fwd < step.totals()["model_flops"] <= 3 * fwd
