"""Fused q/k RMSNorm + RoPE: Triton kernels under the interpreter vs float64.

Rule of jit_kernels.numerics.assert_within_rule: fp32 runs <= 1e-5 relative (norm-wise) and max |error| <= 1e-5 x
max |expected|; bf16 and fp16 runs <= 1.25x the eager path's own norm-wise error in the same dtype and <= 2x its
max |error|.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import triton
from triton_interp import run_compiled, use_gpu_bf16_rounding

from jit_kernels import qk_norm_rope as qk
from jit_kernels import reference
from jit_kernels.numerics import assert_within_rule

use_gpu_bf16_rounding()

EPS = 1e-6
HEADS = 3
KERNEL = qk.qk_norm_rope  # the entry point every numerics test runs: the custom op, Triton fwd + bwd here


def tables(n_img: int, n_ctx: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cos/sin (fp32); the first n_ctx rows are in-context tokens (cos = 1, sin = 0)."""
    ang = torch.randn(n_img, head_dim) * 3
    cos = torch.cat((torch.ones(n_ctx, head_dim), ang.cos()))
    sin = torch.cat((torch.zeros(n_ctx, head_dim), ang.sin()))
    return cos, sin


def make_inputs(b: int, n_img: int, n_ctx: int, head_dim: int, mode: str, bias: bool = False,
                heads: int = HEADS) -> dict:
    """qkv in the activation dtype (mode fp32, bf16 or fp16), fp32 weights and tables; `bias`: an fp32 qkv bias."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    cos, sin = tables(n_img, n_ctx, head_dim)
    n = n_img + n_ctx
    inputs = {
        "qkv": (2 * torch.randn(b, n, 3 * heads * head_dim)).to(dtype),
        "q_weight": 1 + 0.2 * torch.randn(head_dim),
        "k_weight": 1 + 0.2 * torch.randn(head_dim),
        "cos": cos,
        "sin": sin,
    }
    if bias:
        inputs["bias"] = torch.randn(3 * heads * head_dim)
    return inputs


def run(fn, inputs: dict, upstream: list[torch.Tensor], cast=None):
    """Forward + backward (heads read off the inputs); returns ({q, k, v}, {qkv, q_weight, k_weight (, bias) grads})."""
    leaves = {}
    for k, v in inputs.items():
        v = v if cast is None else v.to(cast)
        leaves[k] = v.detach().clone().requires_grad_(k not in ("cos", "sin"))
    bias = [leaves["bias"]] if "bias" in leaves else []
    heads = leaves["qkv"].shape[-1] // (3 * leaves["q_weight"].shape[0])
    outs = fn(leaves["qkv"], leaves["q_weight"], leaves["k_weight"], leaves["cos"], leaves["sin"], heads, EPS, *bias)
    named = dict(zip("qkv", outs, strict=True))
    torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(upstream, outs, strict=True)])
    grads = {k: t.grad for k, t in leaves.items() if t.requires_grad}
    return {k: v.detach() for k, v in named.items()}, grads


def check_case(b: int, n_ctx: int, head_dim: int, mode: str, fn=KERNEL, bias: bool = False, n_img: int = 4,
               heads: int = HEADS) -> None:
    """Outputs and every gradient of `fn` against float64 (and, in bf16 / fp16, the eager path) by the rule."""
    inputs = make_inputs(b, n_img, n_ctx, head_dim, mode, bias, heads)
    n = n_img + n_ctx
    up = [torch.randn(b, n, heads, head_dim) for _ in range(3)]
    k_out, k_grad = run(fn, inputs, up)
    r_out, r_grad = run(reference.qk_norm_rope, inputs, up, cast=torch.float64)
    e_out, e_grad = run(reference.qk_norm_rope, inputs, up)
    eager = mode != "fp32"
    for name in r_out:
        assert k_out[name].is_contiguous()
        assert_within_rule(name, k_out[name], r_out[name], e_out[name] if eager else None)
    for name in r_grad:
        assert k_grad[name].dtype == inputs[name].dtype
        assert_within_rule("d" + name, k_grad[name], r_grad[name], e_grad[name] if eager else None)


FAST = [
    (3, 32, 104, "bf16", True),
    (1, 0, 64, "fp32", False),
    (1, 0, 64, "fp32", True),
    (1, 0, 80, "bf16", False),
    (1, 32, 128, "fp32", True),
    (1, 0, 64, "fp16", True),
]


@pytest.mark.parametrize("b,n_ctx,head_dim,mode,bias", FAST)
def test_numerics_fast(b, n_ctx, head_dim, mode, bias):
    check_case(b, n_ctx, head_dim, mode, bias=bias)


@pytest.mark.slow
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("n_ctx", [0, 32])
@pytest.mark.parametrize("head_dim", [64, 80, 104, 128])
@pytest.mark.parametrize("b", [1, 3])
def test_numerics_full(b, head_dim, n_ctx, mode, bias):
    check_case(b, n_ctx, head_dim, mode, bias=bias)


def tokens_per_program(head_dim: int) -> int:
    """Tokens of one head a backward program walks with the launched (first) config of this head dim."""
    return qk.BWD_CONFIGS[triton.next_power_of_2(head_dim)][0].kwargs["ROWS_PER_PROG"]


def check_scale_case(b: int, n_img: int, n_ctx: int, head_dim: int, heads: int, mode: str, bias: bool) -> None:
    """`check_case` at a shape whose backward splits each head over several programs, the last one partial."""
    tokens, per_prog = b * (n_img + n_ctx), tokens_per_program(head_dim)
    assert tokens > per_prog and tokens % per_prog != 0, (tokens, per_prog)
    check_case(b, n_ctx, head_dim, mode, bias=bias, n_img=n_img, heads=heads)


# (b, n_img, n_ctx, head_dim, heads, mode, bias). B*N tokens per head, 256 per backward program:
# 288 = JiT-B/16 at 256 px, batch 1 (256 + 32 in-context): 2 programs, the last with 32 tokens;
# 540 = batch 9 x 60: 3 programs, the last with 28; 396 = 3 x 132: 2 programs, the last with 140.
SCALE_FAST = [
    (1, 256, 32, 64, 2, "bf16", True),
    (9, 52, 8, 80, 1, "fp32", False),
    (3, 100, 32, 104, 1, "fp32", True),
]


@pytest.mark.parametrize("b,n_img,n_ctx,head_dim,heads,mode,bias", SCALE_FAST)
def test_numerics_several_programs_per_head(b, n_img, n_ctx, head_dim, heads, mode, bias):
    """Per-head partial sums of several backward programs (the last partial) add up to dweight and dbias."""
    check_scale_case(b, n_img, n_ctx, head_dim, heads, mode, bias)


# fp16 runs the bf16 code paths with other loads and stores: one head dim (the larger size class, bias) here.
@pytest.mark.slow
@pytest.mark.parametrize("head_dim,mode,bias", [(64, "fp32", False), (64, "bf16", True), (80, "fp32", True),
                                                (80, "bf16", False), (104, "fp32", False), (104, "bf16", True),
                                                (104, "fp16", True)])
def test_numerics_production_scale(head_dim, mode, bias):
    """JiT-B/16 tokens (256 + 32 in-context) at batch 9: 2592 tokens per head, 11 programs, the last with 32
    (one head: several heads per program grid are covered by the fast 288-token case). Each head dim runs
    fp32 and bf16, with and without bias between them (a covering set, not the 12-case product: suite budget)."""
    check_scale_case(9, 256, 32, head_dim, 1, mode, bias)


def test_in_context_rows_are_not_rotated():
    """With cos = 1, sin = 0 the output is exactly the normalized input."""
    inputs = make_inputs(1, 0, 5, 80, "fp32")
    q, k, _ = qk.qk_norm_rope_fwd(*inputs.values(), HEADS, EPS)
    b, n, _ = inputs["qkv"].shape
    x = inputs["qkv"].view(b, n, 3, HEADS, 80)
    assert_within_rule("q", q, reference.rms_norm(x[:, :, 0].double(), inputs["q_weight"].double(), EPS), None)
    assert_within_rule("k", k, reference.rms_norm(x[:, :, 1].double(), inputs["k_weight"].double(), EPS), None)


@pytest.mark.parametrize("head_dim", [64, 104])
def test_every_candidate_config(head_dim):
    inputs = make_inputs(2, 4, 32, head_dim, "bf16", bias=True)
    up = [torch.randn(2, 36, HEADS, head_dim).bfloat16() for _ in range(3)]
    r_out, r_grad = run(reference.qk_norm_rope, inputs, up, cast=torch.float64)
    e_out, e_grad = run(reference.qk_norm_rope, inputs, up)
    size = min(s for s in qk.FWD_CONFIGS if s >= head_dim)
    args = [inputs[k] for k in ("qkv", "q_weight", "k_weight", "cos", "sin")]
    for cfg in qk.FWD_CONFIGS[size]:
        for name, t in zip("qkv", qk.qk_norm_rope_fwd(*args, HEADS, EPS, inputs["bias"], config=cfg), strict=True):
            assert_within_rule(name, t, r_out[name], e_out[name])
    for cfg in qk.BWD_CONFIGS[size]:
        grads = qk.qk_norm_rope_bwd(*up, *args, HEADS, EPS, inputs["bias"], config=cfg)
        for name, g in zip(("qkv", "q_weight", "k_weight", "bias"), grads, strict=True):
            assert_within_rule("d" + name, g, r_grad[name], e_grad[name])


def backward_twice(device: str) -> None:
    """Two backward runs on `device` with several programs per head give bitwise equal gradients."""
    torch.manual_seed(0)
    inputs = {k: v.to(device) for k, v in make_inputs(8, 4, 32, 104, "bf16", bias=True).items()}
    up = [torch.randn(8, 36, HEADS, 104, device=device) for _ in range(3)]
    assert 8 * 36 > tokens_per_program(104)
    _, g1 = run(KERNEL, inputs, up)
    _, g2 = run(KERNEL, inputs, up)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_backward_bitwise_deterministic():
    """Compiled kernels, twice on the GPU (see `triton_interp.run_compiled` for why not interpreted)."""
    run_compiled("test_kernels_qk_norm_rope", "backward_twice('cuda')")


def test_no_atomics_in_kernels():
    assert "tl.atomic" not in inspect.getsource(qk)


def test_custom_op_cpu_is_reference(monkeypatch):
    """Outside Triton's interpreter the custom op's CPU kernels are the eager reference (forward bitwise)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    inputs = make_inputs(2, 4, 3, 64, "bf16")
    got = qk.qk_norm_rope(*inputs.values(), HEADS, EPS)
    want = reference.qk_norm_rope(*inputs.values(), HEADS, EPS)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b) and a.is_contiguous()
    check_case(2, 3, 64, "bf16", fn=qk.qk_norm_rope)
    check_case(2, 3, 80, "fp32", fn=qk.qk_norm_rope)
    check_case(2, 3, 64, "bf16", fn=qk.qk_norm_rope, bias=True)


def test_cuda_dispatch_runs_triton(monkeypatch):
    calls = []
    for name in ("qk_norm_rope_fwd", "qk_norm_rope_bwd"):
        orig = getattr(qk, name)
        monkeypatch.setattr(qk, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    for op in ("qk_norm_rope", "qk_norm_rope_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_fast::{op}", "CUDA")
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    inputs = make_inputs(1, 4, 2, 64, "bf16", bias=True)
    args, bias = [inputs[k] for k in ("qkv", "q_weight", "k_weight", "cos", "sin")], inputs["bias"]
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET")
        qk.qk_norm_rope(*args, HEADS, EPS, bias)  # CPU tensors outside the interpreter: the eager reference
    assert calls == []
    q, k, v = torch.ops.jit_fast.qk_norm_rope.default.redispatch(cuda, *args, HEADS, EPS, bias)
    assert calls == ["qk_norm_rope_fwd"]
    grads = torch.ops.jit_fast.qk_norm_rope_bwd.default.redispatch(cuda, q, k, v, *args, HEADS, EPS, bias)
    assert calls == ["qk_norm_rope_fwd", "qk_norm_rope_bwd"]
    assert len(grads) == 4 and grads[-1].shape == bias.shape and grads[-1].dtype == bias.dtype


class TestBadInput:
    def args(self, head_dim=64, n=4, heads=HEADS):
        cos, sin = tables(n, 0, head_dim)
        return [torch.randn(1, n, 3 * heads * head_dim), torch.ones(head_dim), torch.ones(head_dim), cos, sin]

    def test_unsupported_head_dim(self):
        with pytest.raises(ValueError, match=r"head_dim=7 .*unsupported"):
            qk.qk_norm_rope(*self.args(head_dim=7), HEADS)
        with pytest.raises(ValueError, match=r"head_dim=136 .*<= 128"):
            qk.qk_norm_rope_fwd(*self.args(head_dim=136), HEADS)

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(576,\), got \(192,\)"):
            qk.qk_norm_rope(*self.args(), HEADS, EPS, torch.zeros(192))

    def test_row_index_limit(self):
        """The backward's (token, head) row index is int32: larger inputs are refused before any launch."""
        n = 2**31 // 3 + 1
        meta = {"device": "meta"}
        qkv, dy = torch.empty(1, n, 6, **meta), torch.empty(1, n, 1, 2, **meta)
        w, tab = torch.ones(2, **meta), torch.empty(n, 2, **meta)
        with pytest.raises(ValueError, match="too many rows for one launch"):
            qk.qk_norm_rope_bwd(dy, dy, dy, qkv, w, w, tab, tab, 1)

    def test_heads_do_not_divide(self):
        with pytest.raises(ValueError, match=r"qkv last dim 576 is not divisible by 3\*num_heads \(num_heads=5\)"):
            qk.qk_norm_rope(*self.args(), 5)

    def test_tables(self):
        a = self.args()
        with pytest.raises(ValueError, match="cos must be a float32 table for the launch helper, got torch.bfloat16"):
            qk.qk_norm_rope_fwd(a[0], a[1], a[2], a[3].bfloat16(), a[4], HEADS)
        with pytest.raises(ValueError, match="sin has unsupported dtype torch.int64"):
            qk.qk_norm_rope(a[0], a[1], a[2], a[3], a[4].long(), HEADS)
        # A bf16 model's tables are converted to fp32 by the op entry points (documented).
        lo = [t.bfloat16() for t in a[3:]]
        got = KERNEL(*a[:3], *lo, HEADS)
        for x, y in zip(got, qk.qk_norm_rope_fwd(*a[:3], *(t.float() for t in lo), HEADS), strict=True):
            assert torch.equal(x, y)
        with pytest.raises(ValueError, match=r"sin must have shape \(4, 64\), got \(5, 64\)"):
            qk.qk_norm_rope(a[0], a[1], a[2], a[3], torch.zeros(5, 64), HEADS)
        with pytest.raises(ValueError, match=r"q_weight must have shape \(64,\)"):
            qk.qk_norm_rope(a[0], torch.ones(32), a[2], a[3], a[4], HEADS)

    def test_dtype_and_rank(self):
        a = self.args()
        with pytest.raises(ValueError, match="qkv has unsupported dtype torch.int32"):
            qk.qk_norm_rope(a[0].int(), *a[1:], HEADS)
        with pytest.raises(ValueError, match=r"qkv must be a non-empty \(B, N, 3\*H\*Dh\) tensor"):
            qk.qk_norm_rope(a[0][0], *a[1:], HEADS)

    def test_non_contiguous(self):
        a = self.args()
        qkv_nc = torch.randn(1, 3 * HEADS * 64, 4).transpose(1, 2)
        with pytest.raises(ValueError, match="qkv must be contiguous"):
            qk.qk_norm_rope_fwd(qkv_nc, *a[1:], HEADS)
        got = KERNEL(qkv_nc, *a[1:], HEADS)
        want = qk.qk_norm_rope_fwd(qkv_nc.contiguous(), *a[1:], HEADS)
        for x, y in zip(got, want, strict=True):
            assert torch.equal(x, y)
