"""`python -m jit_kernels.selfcheck` and `python -m jit_fast.selfcheck`: what can be proven on CPU.

The check functions run here on CPU tensors at tiny shapes: the op checks through the Triton launch helpers
under TRITON_INTERPRET=1 (the same kernels the GPU runs, interpreted), the block check with the custom ops
(whose CPU implementation is the eager reference, so it proves the fullgraph trace, not the kernels) on the
aot_eager backend, the sampler check with CUDA graphs off on both sides (plumbing only). Injected wrong or
nondeterministic ops must FAIL, and the table / exit code / JSON logic is tested with injected checks.
What is NOT proven here: any result on a GPU (the interpreter runs programs one after another, so the
bitwise-twice checks cannot fail on CPU for a race; CUDA-graph capture cannot run at all).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from triton_interp import use_gpu_bf16_rounding

from jit_fast import selfcheck as model_sc
from jit_fast.model import attention, fp8
from jit_kernels import get_ops, reference
from jit_kernels import selfcheck as sc
from jit_kernels.dropout import keep_mask

use_gpu_bf16_rounding()

TINY_MODEL = dict(img_size=32, num_classes=10, depth=3, hidden_size=64, num_heads=4, bottleneck_dim=16,
                  in_context_len=4, in_context_start=1)
# rmsnorm: 3 samples x 9 tokens; qk: 2 x 9 tokens; swiglu: 70 rows = 2 backward programs (the last partial)
TINY = sc.Sizes(norm_batch=3, tokens=9, widths=(40,), qk_batch=2, heads=((2, 8),), swiglu_rows=70, hidden=(24,),
                block_batch=2, model=TINY_MODEL, sampler_batch=2, sampler_steps=3)


def by_name(checks: list[sc.Check], prefix: str) -> list[sc.Check]:
    return [c for c in checks if c.name.startswith(prefix)]


@pytest.mark.parametrize("main", [sc.main, model_sc.main])
def test_cpu_main_has_nothing_to_check(main, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([]) == 0
    assert "nothing to check" in capsys.readouterr().out


def test_model_checks_extend_the_kernel_checks(monkeypatch):
    """`jit_fast.selfcheck` runs every kernel check, in the same order, then the block's and the sampler's."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    kernel = [c.name for c in sc.kernel_checks("cuda", TINY, ops=get_ops("triton"))]
    full = [c.name for c in model_sc.all_checks("cuda", TINY, ops=get_ops("triton"))]
    installed = [b.name for b in (*attention.BACKENDS, attention.SDPA) if b.installed()]
    fp8_names = [f"fp8 {r}" for r in fp8.RECIPES] if fp8.refusal("rowwise", False, torch.device("cuda")) is None \
        else []
    assert full[:len(kernel)] == kernel and [c.split(":")[0].split(",")[0] for c in full[len(kernel):]] == [
        *(f"attention {name}" for name in installed), *fp8_names, "JiT-B/16 block", "sampler step"]
    assert installed[-1] == "sdpa"  # PyTorch SDPA is checked on every GPU


def test_attention_backends_a_gpu_generation_lacks_are_not_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert [c.name.split(":")[0] for c in model_sc.attention_checks("cuda", TINY)] == ["attention sdpa"]
    assert model_sc.attention_checks("cpu", TINY) == []


def test_fp8_checks_need_fp8_tensor_cores(monkeypatch):
    pytest.importorskip("torchao.float8")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert model_sc.fp8_checks("cuda", TINY) == [] and model_sc.fp8_checks("cpu", TINY) == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert [c.ops for c in model_sc.fp8_checks("cuda", TINY)] == [("fp8", r) for r in fp8.RECIPES]


@pytest.mark.parametrize("recipe", fp8.RECIPES)
def test_fp8_gemm_check_passes_emulated_and_fails_on_a_wrong_gemm(recipe, monkeypatch):
    """The check run on CPU through torchao's emulation (two widths); a GEMM off by one e4m3 step's worth of
    scale (x 1.25) must FAIL it."""
    pytest.importorskip("torchao.float8")
    sizes = dataclasses.replace(TINY, tokens=33, widths=(64, 96))
    assert "<= bound" in model_sc.check_fp8_gemm(recipe, "cpu", sizes, emulate=True)
    right = fp8.float8_gemm
    monkeypatch.setattr(fp8, "float8_gemm", lambda config: lambda x, w: 1.25 * right(config)(x, w))
    with pytest.raises(AssertionError, match="rel err"):
        model_sc.check_fp8_gemm(recipe, "cpu", sizes, emulate=True)


def test_production_sizes_reach_multi_step_paths():
    """The GPU run's shapes are the ones the issue asks for (several loop steps and programs per reduction)."""
    p = sc.PRODUCTION
    assert p.widths == (768, 1280, 1664) and [dh for _, dh in p.heads] == [64, 80, 104]
    assert p.norm_batch >= 4 * 8  # stage-3 sum over the batch: BLOCK_R 8 -> at least 4 loop steps
    assert p.qk_batch * p.tokens > 2 * 256  # several backward programs per head (ROWS_PER_PROG 256)
    assert p.swiglu_rows // 64 >= 4 * 8  # SwiGLU bias-gradient partial rows: at least 4 loop steps
    names = [c.name for c in sc.op_checks("cpu", p, ops=get_ops("triton"))]
    assert len(names) == len(set(names)) == 3 * 3 * 3 + 3 * 2 * 3 + 3 * 2 * 3 + 4  # x 3 modes: fp32, bf16, fp16


def test_injected_failure_table_exit_code_and_json(tmp_path, capsys):
    def boom() -> str:
        raise RuntimeError("kernel exploded\nsecond line")

    def wrong() -> str:
        raise AssertionError("dx: relative error 1e-1 exceeds bound 1e-3")

    checks = [sc.Check("good one", ("swiglu",), lambda: "fine"), sc.Check("bad numerics", ("qk_norm_rope",), wrong),
              sc.Check("crashing", ("block",), boom)]
    out = tmp_path / "r.json"
    assert sc.main(["--json", str(out)], checks=checks) == 1
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert [line.split()[0] for line in lines] == ["PASS", "FAIL", "FAIL"]
    assert "RuntimeError: kernel exploded" in text and "second line" not in text
    assert "3 checks, 1 passed, 2 failed" in text
    rec = json.loads(out.read_text())
    assert rec["passed"] is False and rec["failed_ops"] == ["block", "qk_norm_rope"]
    assert [c["passed"] for c in rec["checks"]] == [True, False, False]


def test_all_passing_exits_zero(capsys):
    assert sc.main(["--only", "keep"], checks=[sc.Check("keep", ("swiglu",), lambda: "ok"),
                                               sc.Check("dropped", ("swiglu",), lambda: 1 / 0)]) == 0
    out = capsys.readouterr().out
    assert "1 checks, 1 passed, 0 failed: all checks passed" in out and "dropped" not in out


@pytest.mark.parametrize("text", ["rmsnorm_modulate fp32", "residual_rmsnorm_modulate bf16 B=3 N=9 D=40 bias",
                                  "qk_norm_rope bf16 B=2 N=9 H=2 Dh=8 bias", "swiglu bf16 M=70 h=24 bias",
                                  "residual_rmsnorm_modulate fp16 B=3 N=9 D=40 bias"])
def test_op_checks_pass_interpreted(text):
    """The Triton kernels (interpreted) pass the selfcheck's own checks at tiny shapes (one per op here)."""
    checks = by_name(sc.op_checks("cpu", TINY, ops=get_ops("triton")), text)
    assert checks
    results = sc.run_checks(checks)
    assert all(r.passed for r in results), [sc.format_line(r) for r in results]


def test_gpu_without_bf16_checks_fp16(monkeypatch):
    """On a T4 (sm_75, no bf16) the op checks run fp32 and fp16, the determinism and block checks fp16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    names = [c.name for c in model_sc.all_checks("cuda", TINY, ops=get_ops("triton"))]
    assert not [n for n in names if "bf16" in n]
    numerics = [n for n in names if "backward twice" not in n and "block" not in n and "sampler" not in n
                and "dropout" not in n and not n.startswith("attention")]
    assert sum(" fp16 " in n for n in numerics) == sum(" fp32 " in n for n in numerics) == len(numerics) / 2
    assert sum(" fp16 " in n and "dropout 0.2" in n for n in names) == 2  # the dropout ops in fp16 there
    assert "swiglu fp16 backward twice: bitwise" in names and any("fp16 autocast" in n for n in names)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert sc.device_modes("cuda") == ("fp32", "bf16", "fp16") and sc.low_precision("cuda") == "bf16"


@pytest.mark.slow
def test_every_op_check_passes_interpreted():
    results = sc.run_checks(sc.op_checks("cpu", TINY, ops=get_ops("triton")))
    assert len(results) == 3 * 3 + 2 * 3 + 2 * 3 + 4
    assert all(r.passed for r in results), [sc.format_line(r) for r in results if not r.passed]


def off_by(fn, factor: float):
    """An op that scales its first output by `factor`: a small wrong result the checks must catch."""
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        return (out[0] * factor, *out[1:]) if isinstance(out, tuple) else out * factor

    return wrong


def test_numerics_check_fails_on_a_wrong_op():
    ops = dataclasses.replace(get_ops("triton"), swiglu=off_by(reference.swiglu, 1.01),
                              residual_rmsnorm_modulate=off_by(reference.residual_rmsnorm_modulate, 1.0 + 2**-7))
    results = sc.run_checks([c for c in sc.op_checks("cpu", TINY, ops=ops) if " fp32 " in c.name])
    failed = {r.name.split()[0] for r in results if not r.passed}
    assert failed == {"swiglu", "residual_rmsnorm_modulate"}, [sc.format_line(r) for r in results]


def test_determinism_check_fails_on_a_nondeterministic_op():
    def noisy_swiglu(x12, bias=None):
        out = reference.swiglu(x12, bias)
        return out + 1e-3 * torch.randn_like(out)

    ops = dataclasses.replace(get_ops("triton"), swiglu=noisy_swiglu)
    [check] = by_name(sc.op_checks("cpu", TINY, ops=ops), "swiglu bf16 backward twice")
    [result] = sc.run_checks([check])
    assert not result.passed and "differ between two identical runs" in result.detail
    assert sc.failed_ops([result]) == {"swiglu"}


def test_sampler_check_runs_on_cpu_without_graphs():
    detail = model_sc.check_sampler_graph("cpu", TINY, graph=False)
    assert "bitwise equal" in detail and "graphs off" in detail


@pytest.mark.slow
def test_block_check_traces_fullgraph_on_cpu():
    """fullgraph=True through the custom ops (CPU: their reference implementation) within the rule."""
    assert "tensors; worst" in model_sc.check_block("cpu", TINY, backend="aot_eager")


def test_block_check_needs_a_pending_residual():
    with pytest.raises(ValueError, match="pending residual"):
        model_sc.check_block("cpu", dataclasses.replace(TINY, model=dict(TINY_MODEL, depth=2)), backend="eager")


def test_dropout_mask_check_passes_interpreted():
    """The interpreted kernels draw the CPU twin's masks at tiny shapes (the check the GPU run makes compiled)."""
    (good,) = sc.run_checks(sc.dropout_checks("cpu", TINY, ops=get_ops("triton"))[:1])
    assert good.passed, sc.format_line(good)


@pytest.mark.slow
def test_dropout_checks_pass_interpreted_and_can_fail(monkeypatch):
    """Every dropout check passes interpreted; a twin that disagrees with the kernels' masks makes the mask check
    FAIL."""
    results = sc.run_checks(sc.dropout_checks("cpu", TINY, ops=get_ops("triton")))
    assert len(results) == 3 and all(r.passed for r in results), [sc.format_line(r) for r in results]
    monkeypatch.setattr(sc, "keep_mask", lambda d, rows, cols: ~keep_mask(d, rows, cols))
    (bad,) = sc.run_checks(sc.dropout_checks("cpu", TINY, ops=get_ops("triton"))[:1])
    assert not bad.passed and "masks differ from the CPU twin" in bad.detail
