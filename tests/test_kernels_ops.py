"""Op tables and torch.compile: the fused ops are opaque custom ops with fake impls and autograd."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves
from triton_interp import count_launches, use_gpu_bf16_rounding

from jit_kernels import get_ops
from jit_kernels.numerics import assert_within_rule, max_abs_err

use_gpu_bf16_rounding()

NAMES = ("rmsnorm_modulate", "residual_rmsnorm_modulate", "qk_norm_rope", "swiglu")  # the custom ops
TABLE = NAMES + ("linear_qk_norm_rope", "linear_swiglu", "branch_linear")  # + the GEMM boundaries the model calls
B, N, D, H = 2, 6, 48, 4
ROOT = Path(__file__).resolve().parents[1]


def block(ops, x, branch, ada, w1, w2, qkv_w, qw, kw, cos, sin, w12, w3, b12, b_in, proj_w, proj_b, b3, qkv_b):
    """A JiT-block-shaped function touching every fused op once, in the model's order (branch biases folded
    into the residual ops by the fused table, added in the GEMMs by the reference one)."""
    shift1, scale1, gate1, shift2, scale2, gate2 = ada.chunk(6, dim=-1)
    x, h = ops.residual_rmsnorm_modulate(x, branch, gate1, w1, shift1, scale1, 1e-6, None, b_in)
    q, k, v = ops.linear_qk_norm_rope(h, qkv_w, qkv_b, qw, kw, cos, sin, H, 1e-6)
    q2, _, _ = ops.qk_norm_rope(F.linear(h, qkv_w), qw, kw, cos, sin, H, 1e-6)  # the op without a bias too
    q = q + 0.5 * q2
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    a, a_bias = ops.branch_linear(o.transpose(1, 2).reshape(B, N, D), proj_w, proj_b)
    x, h = ops.residual_rmsnorm_modulate(x, a, gate2, w2, shift2, scale2, 1e-6, None, a_bias)
    y, y_bias = ops.branch_linear(ops.linear_swiglu(h, w12, b12), w3, b3)
    x, h = ops.residual_rmsnorm_modulate(x, y, gate1, w2, shift2, scale2, 1e-6, None, y_bias)
    return (x + ops.rmsnorm_modulate(h, w1, shift1, scale1, 1e-6, None)).square().mean()


def block_inputs() -> list[torch.Tensor]:
    dh = D // H
    ang = torch.randn(N, dh)
    return [
        torch.randn(B, N, D), torch.randn(B, N, D), 0.3 * torch.randn(B, 6 * D), 1 + 0.1 * torch.randn(D),
        1 + 0.1 * torch.randn(D), torch.randn(3 * D, D) / D**0.5, 1 + 0.1 * torch.randn(dh),
        1 + 0.1 * torch.randn(dh), ang.cos(), ang.sin(), torch.randn(2 * 64, D) / D**0.5, torch.randn(D, 64) / 8,
        0.1 * torch.randn(2 * 64), 0.1 * torch.randn(D), torch.randn(D, D) / D**0.5, 0.1 * torch.randn(D),
        0.1 * torch.randn(D), 0.3 * torch.randn(3 * D),
    ]


def grads_of(fn, inputs: list[torch.Tensor], cast=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [(t if cast is None else t.to(cast)).detach().clone().requires_grad_(i not in (8, 9))
              for i, t in enumerate(inputs)]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves if t.requires_grad]


def test_tables_share_names_and_declare_capabilities():
    """Both tables fill every function the model calls; the fused one declares what changes the model's forward,
    and its branch GEMM is the deferred-bias one that declaration names."""
    from jit_kernels import reference
    from jit_kernels.table import FUNCTIONS

    assert sorted(FUNCTIONS) == sorted(TABLE)
    fused, eager = get_ops("triton"), get_ops("torch")
    for table in (fused, eager):
        assert all(callable(getattr(table, name)) for name in TABLE)
    assert (fused.fused_dropout, fused.deferred_bias, fused.activated_conditioning) == (True, True, True)
    assert (eager.fused_dropout, eager.deferred_bias, eager.activated_conditioning) == (False, False, False)
    assert fused.branch_linear is reference.branch_linear_deferred_bias
    assert eager.branch_linear is reference.branch_linear
    assert all(getattr(eager, name) is getattr(reference, name) for name in TABLE)
    assert all(getattr(fused, name).__module__.startswith("jit_kernels.") and getattr(fused, name) is not
               getattr(reference, name) for name in NAMES)


def test_tables_are_frozen():
    """Nothing can swap an op of a table at run time (the old fallback overwrote the fused table in place)."""
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        get_ops("triton").swiglu = get_ops("torch").swiglu


def test_triton_table_block_matches_float64():
    """Every op of the block through get_ops("triton") (custom ops running the Triton kernels in the interpreter),
    gradients for all inputs."""
    inputs = block_inputs()
    loss, grads = grads_of(lambda *a: block(get_ops("triton"), *a), inputs)
    ref_loss, ref_grads = grads_of(lambda *a: block(get_ops("torch"), *a), inputs, cast=torch.float64)
    assert_within_rule("loss", loss, ref_loss, None)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_within_rule(f"grad[{i}]", g, r, None)


def op_args(name: str) -> tuple:
    """Small arguments for one call of the op-table entry `name` (tensors that take gradients are leaves)."""
    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape).requires_grad_()

    dh, ang = D // H, torch.randn(N, D // H)
    args = {
        "rmsnorm_modulate": lambda: (leaf(B, N, D), leaf(D), leaf(B, D), leaf(B, D), 1e-6, None),
        "residual_rmsnorm_modulate": lambda: (leaf(B, N, D), leaf(B, N, D), leaf(B, D), leaf(D), leaf(B, D),
                                              leaf(B, D), 1e-6, None, leaf(D)),
        "qk_norm_rope": lambda: (leaf(B, N, 3 * D), leaf(dh), leaf(dh), ang.cos(), ang.sin(), H, 1e-6, leaf(3 * D)),
        "linear_qk_norm_rope": lambda: (leaf(B, N, D), leaf(3 * D, D), leaf(3 * D), leaf(dh), leaf(dh), ang.cos(),
                                        ang.sin(), H, 1e-6),
        "swiglu": lambda: (leaf(B, N, 128), leaf(128)),
        "linear_swiglu": lambda: (leaf(B, N, D), leaf(128, D), leaf(128)),
        "branch_linear": lambda: (leaf(B, N, D), leaf(D, D), leaf(D)),
    }
    return args[name]()


def launches_per_op() -> dict[str, list[dict[str, int]]]:
    """Triton launches by kernel name of one forward and one backward of every entry of get_ops("triton") on CPU
    tensors: {name: [forward launches, backward launches]}."""
    ops, out = get_ops("triton"), {}
    for name in TABLE:
        with count_launches() as fwd:
            result = getattr(ops, name)(*op_args(name))
        outs = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor) and t.requires_grad]
        with count_launches() as bwd:
            torch.autograd.backward(outs, [torch.randn_like(t) for t in outs])
        out[name] = [dict(fwd), dict(bwd)]
    return out


RMS_LAUNCHES = [{"rmsnorm_modulate_fwd_kernel": 1}, {"rmsnorm_modulate_bwd_kernel": 1, "sum_rows_kernel": 2}]
QK_LAUNCHES = [{"qk_norm_rope_fwd_kernel": 1}, {"qk_norm_rope_bwd_kernel": 1, "qk_sum_kernel": 1}]
SWIGLU_LAUNCHES = [{"swiglu_fwd_kernel": 1}, {"swiglu_bwd_kernel": 1, "sum_rows_kernel": 1}]


def test_triton_table_runs_the_kernels_on_cpu_under_the_interpreter():
    """With TRITON_INTERPRET=1 (tests/conftest.py) the custom ops' CPU kernels are the Triton launches: every fused
    entry launches its forward kernel, then its backward kernel and second-stage reductions (biases folded in)."""
    assert launches_per_op() == {
        "rmsnorm_modulate": RMS_LAUNCHES,
        "residual_rmsnorm_modulate": RMS_LAUNCHES,
        "qk_norm_rope": QK_LAUNCHES,
        "linear_qk_norm_rope": QK_LAUNCHES,
        "swiglu": SWIGLU_LAUNCHES,
        "linear_swiglu": SWIGLU_LAUNCHES,
        "branch_linear": [{}, {}],  # a plain GEMM
    }


def test_triton_table_runs_the_reference_on_cpu_without_the_interpreter():
    """Without TRITON_INTERPRET (a fresh process) the same calls run the eager references: no Triton launch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    code = "import json, test_kernels_ops as t; print(json.dumps(t.launches_per_op()))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {name: [{}, {}] for name in TABLE}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """fullgraph=True fails on any graph break; compiled forward and gradients match eager."""
    torch._dynamo.reset()
    inputs = block_inputs()
    ops = get_ops("triton")
    compiled = torch.compile(lambda *a: block(ops, *a), fullgraph=True, backend=backend)
    loss_c, grads_c = grads_of(compiled, inputs)
    loss_e, grads_e = grads_of(lambda *a: block(ops, *a), inputs)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


def test_compiled_graph_keeps_custom_ops_opaque():
    """The traced forward and backward graphs call the jit_fast ops instead of inlining their math."""
    torch._dynamo.reset()
    seen: list[str] = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._functorch.aot_autograd import aot_module_simplified

        def record(g, _):
            seen.extend(str(n.target) for n in g.graph.nodes if n.op == "call_function")
            return make_boxed_func(g.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)

    ops = get_ops("triton")
    compiled = torch.compile(lambda *a: block(ops, *a), fullgraph=True, backend=backend)
    grads_of(compiled, block_inputs())
    for op in NAMES + ("rmsnorm_modulate_bwd", "qk_norm_rope_bwd", "swiglu_bwd"):
        assert any(f"jit_fast.{op}." in s for s in seen), op


def test_sum_rows_writes_each_output_in_its_dtype() -> None:
    """The second reduction stage: sums of strided partial rows into up to five outputs of mixed dtypes."""
    from jit_kernels._common import sum_rows

    g, r, c = 3, 5, 700  # C spans two column blocks, the second one masked
    part = torch.randn(g, r, 5, c, dtype=torch.float64).float()
    dtypes = (torch.bfloat16, torch.float32, torch.float32, torch.float16, torch.float32)
    outs = [torch.empty(g, c, dtype=dt) for dt in dtypes]
    sum_rows(part, outs, r, r * 5 * c, 5 * c)
    want = part.double().sum(1)
    for j, out in enumerate(outs):
        torch.testing.assert_close(out.double(), want[:, j], rtol=1e-6 if out.dtype == torch.float32 else 1e-2,
                                   atol=1e-5)
    total = torch.empty(c, dtype=torch.bfloat16)
    sum_rows(outs[1], [total], g, 0, c)  # stride_g 0: one group summing the rows of a (G, C) buffer
    torch.testing.assert_close(total.double(), outs[1].double().sum(0), rtol=1e-2, atol=1e-2)
    stacked = torch.stack((outs[1], outs[4]))  # (2, G, C): stride_j = G * C between the two inputs
    pair = [torch.empty(c), torch.empty(c)]
    sum_rows(stacked, pair, g, 0, c, g * c)
    for j, out in zip((1, 4), pair, strict=True):
        torch.testing.assert_close(out, outs[j].sum(0), rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="one shape"):
        sum_rows(part, [outs[0], torch.empty(c)], r, r * 5 * c, 5 * c)
    with pytest.raises(ValueError, match="1 to 5 outputs"):
        sum_rows(part, outs + outs[:1], r, r * 5 * c, 5 * c)


def test_no_atomics_in_any_kernel_source() -> None:
    """Backward reductions are two-stage so runs are bitwise reproducible: no module of jit_kernels/ names an atomic."""
    sources = sorted((Path(__file__).resolve().parents[1] / "jit_kernels").glob("*.py"))
    assert len(sources) >= 4
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
            assert not name.startswith("atomic"), f"{path.name}:{node.lineno} uses {name}"


def test_rule_catches_one_wrong_element() -> None:
    """One element off by more than the element-wise bound fails the rule though the norm-wise ratio passes."""
    expected = torch.randn(100_000, dtype=torch.float64)
    eager = expected.bfloat16()
    bad_bf16 = eager.clone()
    bad_bf16[123] += 12 * max_abs_err(eager, expected)
    bad_fp32 = expected.float()
    bad_fp32[123] += 1e-4 * expected.abs().max().item()
    assert_within_rule("bf16", eager, expected, eager)
    assert_within_rule("fp32", expected.float(), expected, None)
    for bad, ref in ((bad_bf16, eager), (bad_fp32, None)):
        with pytest.raises(AssertionError, match="element-wise bound"):
            assert_within_rule("bad", bad, expected, ref)
