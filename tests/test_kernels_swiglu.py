"""Fused SwiGLU: Triton kernels under the interpreter vs float64 (norm-wise relative error).

fp32 runs must be <= 1e-5 relative; bf16 and fp16 runs <= 1.25x the eager path's own error in the same dtype
(jit_kernels.numerics).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import triton
from triton_interp import run_compiled, use_gpu_bf16_rounding

from jit_kernels import _common, reference
from jit_kernels import swiglu as sw
from jit_kernels.numerics import assert_within_rule

use_gpu_bf16_rounding()

# The Triton entry points the numerics tests run: fwd + bwd with autograd (default configs), and the launch helpers.
KERNEL = sw.swiglu  # the entry point every numerics test runs: the custom op, Triton fwd + bwd here
FWD = sw.swiglu_fwd
BWD = sw.swiglu_bwd
# A backward config of 4 rows per program (the launched ones take 64): the same kernel code (ROWS_PER_PROG is a
# constexpr), so many programs and a multi-step bias-gradient sum cost 16x fewer interpreted rows.
FEW_ROWS = triton.Config({"BLOCK_M": 2, "BLOCK_H": 256, "ROWS_PER_PROG": 4}, num_warps=4, num_stages=1)
SUM_BLOCK_R = _common.SUM_ROWS_CONFIG.kwargs["BLOCK_R"]


def run(fn, x12: torch.Tensor, dout: torch.Tensor, bias=None, cast=None) -> tuple[torch.Tensor, ...]:
    """Output and gradients (dx12, and dbias with a bias) of `fn`, optionally on inputs cast to `cast`."""
    leaf = (x12 if cast is None else x12.to(cast)).detach().clone().requires_grad_()
    b = None if bias is None else (bias if cast is None else bias.to(cast)).detach().clone().requires_grad_()
    out = fn(leaf) if b is None else fn(leaf, b)
    out.backward(dout.to(out.dtype))
    return (out.detach(), leaf.grad) + (() if b is None else (b.grad,))


def check_case(shape: tuple[int, ...], h: int, dtype: torch.dtype, fn=KERNEL, bias: bool = False) -> None:
    """Kernel vs float64 reference (and the eager bf16 path's own error): h, dx12 and, with a bias, dbias.

    The bias is fp32, as the w12 bias under autocast; the eager path then is the op's reference contract.
    """
    x12 = (2 * torch.randn(*shape, 2 * h)).to(dtype)
    b = torch.randn(2 * h) if bias else None
    dout = torch.randn(*shape, h)
    got = run(fn, x12, dout, b)
    want = run(reference.swiglu, x12, dout, b, cast=torch.float64)
    eager = run(reference.swiglu, x12, dout, b) if dtype != torch.float32 else (None,) * len(got)
    assert len(got) == len(want) == (3 if bias else 2)
    for name, g, w, e in zip(("h", "dx12", "dbias"), got, want, eager, strict=False):
        assert_within_rule(name, g, w, e)


# Hidden widths: odd small, and the official h for D = 768 / 1280 / 1664 (2048 = B; 3413, 4437 unpadded).
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,h", [((3, 9), 97), ((1, 8), 2048), ((2, 70), 40)])
def test_numerics_fast(shape, h, dtype, bias):
    """(2, 70) rows span three backward programs of 64 rows: the bias partials are reduced across them."""
    check_case(shape, h, dtype, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
def test_numerics_fast_fp16(bias):
    """fp16 activations (fp16 autocast), fwd + bwd: the bf16 kernels' paths with fp16 loads and stores."""
    check_case((2, 70), 40, torch.float16, bias=bias)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "h"), [(3, 97), (1, 2048), (3, 3413), (1, 3456), (3, 4437), (1, 4480)])
def test_numerics_full(b, h, dtype):
    """Every width in both dtypes; batch 1 and 3 alternate over the widths (suite budget)."""
    check_case((b, 17), h, dtype, bias=True)


def test_every_candidate_config():
    x12 = torch.randn(2, 9, 2 * 200).bfloat16()
    bias = torch.randn(400)
    dout = torch.randn(2, 9, 200).bfloat16()
    for b in (None, bias):
        r_out, r_grad, *r_db = run(reference.swiglu, x12, dout, b, cast=torch.float64)
        e_out, e_grad, *e_db = run(reference.swiglu, x12, dout, b)
        for cfg in sw.FWD_CONFIGS:
            assert_within_rule("h", sw.swiglu_fwd(x12, b, config=cfg), r_out, e_out)
        for cfg in sw.BWD_CONFIGS:
            dx12, dbias = sw.swiglu_bwd(x12, b, dout, config=cfg)
            assert_within_rule("dx12", dx12, r_grad, e_grad)
            if b is None:
                assert dbias is None
            else:
                assert_within_rule("dbias", dbias, r_db[0], e_db[0])


def check_bwd_config(shape: tuple[int, ...], h: int, dtype: torch.dtype, bias: bool, config: triton.Config) -> None:
    """`check_case` with the backward launched through `BWD` with `config` (forward: the launched config)."""
    x12 = (2 * torch.randn(*shape, 2 * h)).to(dtype)
    b = torch.randn(2 * h) if bias else None
    dout = torch.randn(*shape, h)
    out = FWD(x12, b)
    dx12, dbias = BWD(x12, b, dout.to(dtype), config=config)
    want = run(reference.swiglu, x12, dout, b, cast=torch.float64)
    eager = run(reference.swiglu, x12, dout, b) if dtype != torch.float32 else (None,) * len(want)
    assert len(want) == (3 if bias else 2) and (dbias is None) == (not bias)
    for name, g, w, e in zip(("h", "dx12", "dbias"), (out, dx12, dbias), want, eager, strict=False):
        assert_within_rule(name, g, w, e)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_programs(dtype, bias):
    """117 rows = 30 programs of 4 rows (the last 1 row) x 2 column programs (h = 277, odd, the last 21 wide):
    the bias gradient sums 30 partial rows (4 loop steps, the last 6 rows) over 2 column programs of 2h = 554."""
    shape, h = (9, 13), 277
    rows = triton.cdiv(9 * 13, FEW_ROWS.kwargs["ROWS_PER_PROG"])
    assert rows > 3 * SUM_BLOCK_R and (9 * 13) % FEW_ROWS.kwargs["ROWS_PER_PROG"] != 0
    check_bwd_config(shape, h, dtype, bias, FEW_ROWS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launched_config_batch(dtype):
    """The launched config: 9 samples x 15 tokens = 3 programs of 64 rows (the last 7 rows), 2 column programs."""
    assert triton.cdiv(9 * 15, sw.BWD_CONFIGS[0].kwargs["ROWS_PER_PROG"]) == 3
    check_case((9, 15), 277, dtype, bias=True)


# Official hidden widths of JiT D = 768 / 1280 / 1664 (unpadded: 3413 and 4437 are odd).
# fp16 runs the bf16 code paths with other loads and stores: one width (unaligned) at production scale.
@pytest.mark.slow
@pytest.mark.parametrize("h,dtype", [(h, d) for h in (2048, 3413, 4437) for d in (torch.float32, torch.bfloat16)]
                         + [(3413, torch.float16)])
def test_many_programs_wide(h, dtype):
    """30 programs of 4 rows at the JiT hidden widths: 8 to 18 column programs in the backward and its row sum."""
    check_bwd_config((9, 13), h, dtype, True, FEW_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_launched_config_long(dtype):
    """The launched config at production row counts: 9 x 171 = 1539 rows = 25 programs of 64 (the last 3 rows),
    a bias-gradient sum of 25 rows in 4 loop steps."""
    assert triton.cdiv(9 * 171, sw.BWD_CONFIGS[0].kwargs["ROWS_PER_PROG"]) > 3 * SUM_BLOCK_R
    check_case((9, 171), 97, dtype, bias=True)


def test_bias_gradient_dtype():
    """dbias is written in the bias dtype (fp32 under autocast, bf16 for FSDP2's bf16 parameters): no cast launch."""
    x12, dout = torch.randn(3, 5, 2 * 96).bfloat16(), torch.randn(3, 5, 96).bfloat16()
    for bias in (torch.randn(192), torch.randn(192).bfloat16()):
        assert BWD(x12, bias, dout)[1].dtype == bias.dtype


def backward_twice(device: str) -> None:
    """Two backward runs on `device` (1539 rows: 25 programs, a 4-step bias-gradient sum) give bitwise equal
    gradients."""
    torch.manual_seed(0)
    x12 = torch.randn(9, 171, 2 * 3413, device=device).bfloat16()
    bias, dout = torch.randn(2 * 3413, device=device), torch.randn(9, 171, 3413, device=device).bfloat16()
    first, second = BWD(x12, bias, dout), BWD(x12, bias, dout)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bias_gradient_is_deterministic():
    """Compiled kernels, twice on the GPU (see `triton_interp.run_compiled` for why not interpreted)."""
    run_compiled("test_kernels_swiglu", "backward_twice('cuda')")


def test_zero_padding_stays_zero():
    """Padded hidden units (x1 = x2 = 0) give h = 0 and zero gradients, whatever flows back."""
    x12 = torch.randn(2, 5, 2 * 128)
    x12[..., 100:128] = 0
    x12[..., 128 + 100 :] = 0
    out = sw.swiglu_fwd(x12)
    dx12, dbias = sw.swiglu_bwd(x12, torch.zeros(256), torch.randn(2, 5, 128))
    assert torch.all(out[..., 100:] == 0)
    assert torch.all(dx12[..., 100:128] == 0) and torch.all(dx12[..., 228:] == 0)
    assert torch.all(dbias[100:128] == 0) and torch.all(dbias[228:] == 0)


def test_no_atomics_and_no_saved_sigmoid():
    src = inspect.getsource(sw)
    assert "tl.atomic" not in src
    assert "tl.sigmoid(x1)" in inspect.getsource(sw.swiglu_bwd_kernel.fn)


def test_custom_op_cpu_is_reference(monkeypatch):
    """Outside Triton's interpreter the custom op's CPU kernels are the eager reference (forward bitwise)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    x12 = torch.randn(2, 3, 2 * 40).bfloat16()
    assert torch.equal(sw.swiglu(x12), reference.swiglu(x12))
    for bias in (False, True):
        check_case((2, 3), 40, torch.bfloat16, fn=sw.swiglu, bias=bias)
        check_case((2, 3), 40, torch.float32, fn=sw.swiglu, bias=bias)


def test_linear_swiglu_is_the_official_mlp_gate():
    """Fused table: GEMM without bias + SwiGLU with the bias folded in == the reference GEMM-with-bias path."""
    x, w, b = torch.randn(2, 5, 24), torch.randn(64, 24) / 5, torch.randn(64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = reference.linear_swiglu(*leaves)
    ref.sum().backward()
    want = [t.grad for t in leaves]
    for fn in (sw.linear_swiglu,):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves)
        out.sum().backward()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        for g, wg in zip((t.grad for t in leaves), want, strict=True):
            torch.testing.assert_close(g, wg, rtol=1e-5, atol=1e-5)


def test_cuda_dispatch_runs_triton(monkeypatch):
    calls = []
    for name in ("swiglu_fwd", "swiglu_bwd"):
        orig = getattr(sw, name)
        monkeypatch.setattr(sw, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    x12, bias = torch.randn(2, 3, 16), torch.randn(16)
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET")
        sw.swiglu(x12, bias)  # CPU tensors outside the interpreter: the eager reference
    assert calls == []
    out = torch.ops.jit_fast.swiglu.default.redispatch(cuda, x12, bias)
    torch.ops.jit_fast.swiglu_bwd.default.redispatch(cuda, x12, bias, torch.ones_like(out))
    assert calls == ["swiglu_fwd", "swiglu_bwd"]


def test_bad_input():
    with pytest.raises(ValueError, match=r"x12 must have an even last dim .*\(2, 7\)"):
        sw.swiglu(torch.randn(2, 7))
    with pytest.raises(ValueError, match="x12 has unsupported dtype torch.int64"):
        sw.swiglu(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4\)"):
        sw.swiglu_bwd(torch.randn(2, 8), None, torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\), got \(4,\)"):
        sw.swiglu(torch.randn(2, 8), torch.randn(4))
    nc = torch.randn(8, 2).t()
    with pytest.raises(ValueError, match="x12 must be contiguous"):
        sw.swiglu_fwd(nc)
    assert torch.equal(KERNEL(nc), sw.swiglu_fwd(nc.contiguous()))
