"""Fused RMSNorm + adaLN modulate (+ gated residual): Triton kernels under the interpreter vs float64.

Error metric: norm-wise relative error ||a - ref||_2 / ||ref||_2 against reference.py run on float64
copies of the inputs. fp32 runs must be <= 1e-5; bf16 and fp16 runs <= 1.25x the eager path's own error in the
same dtypes (floored at 1e-5, see jit_kernels.numerics.error_bound).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import triton
from triton_interp import run_compiled, use_gpu_bf16_rounding

from jit_kernels import _common, reference
from jit_kernels import rmsnorm_modulate as rm
from jit_kernels.numerics import assert_within_rule

use_gpu_bf16_rounding()

EPS = 1e-6
NAMES_RES = ("x", "branch", "gate", "weight", "shift", "scale")
NAMES_PLAIN = ("x", "weight", "shift", "scale")
GRAD_NAMES = ("x", "branch", "gate", "weight", "shift", "scale", "branch_bias")  # order of BWD's results
VARIANTS = ("plain", "residual", "residual+bias")
MODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# The entry points the numerics tests run: the custom ops (Triton fwd + bwd here, default configs), the launch helpers.
PLAIN = rm.rmsnorm_modulate
RESIDUAL = rm.residual_rmsnorm_modulate
FWD = rm.rmsnorm_modulate_fwd
RESIDUAL_FWD = rm.residual_rmsnorm_modulate_fwd
BWD = rm.rmsnorm_modulate_bwd

# A backward config of 4 rows per program (the launched ones take 32): the same kernel code (ROWS_PER_PROG is a
# constexpr), so many programs per sample and multi-step row sums cost 8x fewer interpreted rows.
FEW_ROWS = triton.Config({"BLOCK_M": 2, "ROWS_PER_PROG": 4}, num_warps=4, num_stages=1)
SUM_BLOCK_R = _common.SUM_ROWS_CONFIG.kwargs["BLOCK_R"]


def make_inputs(
    b: int, n: int, d: int, mode: str, residual: bool, bias: bool = False
) -> tuple[dict, torch.dtype | None]:
    """Random inputs; mode "fp32", "bf16" (autocast dtypes: fp32 stream, bf16 vectors, bf16 y), "bf16-all", or the
    same two in fp16 ("fp16", "fp16-all").

    `bias` adds a branch bias in the parameter dtype (fp32, bf16 / fp16 for "*-all" as FSDP2 gathers it)."""
    act = MODE_DTYPES[mode.removesuffix("-all")]
    stream = act if mode.endswith("-all") else torch.float32
    t = {
        "x": torch.randn(b, n, d).to(stream),
        "weight": 1 + 0.2 * torch.randn(d),
        "shift": (0.3 * torch.randn(b, d)).to(act),
        "scale": (0.3 * torch.randn(b, d)).to(act),
    }
    if residual:
        t["branch"] = torch.randn(b, n, d).to(act)
        t["gate"] = (0.5 * torch.randn(b, d)).to(act)
    if bias:
        t["branch_bias"] = (0.5 * torch.randn(d)).to(stream)
    return t, (None if mode == "fp32" else act)


def run(fn, inputs: dict, out_dtype, upstream: list[torch.Tensor], residual: bool, cast=None):
    """Forward + backward of `fn`; returns ({output name: tensor}, {input name: grad})."""
    leaves = {k: (v if cast is None else v.to(cast)).detach().clone().requires_grad_() for k, v in inputs.items()}
    if residual:
        bias = {"branch_bias": leaves["branch_bias"]} if "branch_bias" in leaves else {}
        outs = fn(*(leaves[k] for k in NAMES_RES), EPS, out_dtype, **bias)
        named = {"x_out": outs[0], "y": outs[1]}
    else:
        named = {"y": fn(*(leaves[k] for k in NAMES_PLAIN), EPS, out_dtype)}
    grads = [g.to(o.dtype) for g, o in zip(upstream, named.values(), strict=True)]
    torch.autograd.backward(list(named.values()), grads)
    return {k: v.detach() for k, v in named.items()}, {k: v.grad for k, v in leaves.items()}


def upstream_grads(b: int, n: int, d: int, residual: bool) -> list[torch.Tensor]:
    """Random gradients for (x_out, y) or (y,)."""
    return [torch.randn(b, n, d) for _ in range(2 if residual else 1)]


def check_case(b: int, n: int, d: int, mode: str, residual: bool, fn=None, bias: bool = False) -> dict[str, float]:
    """Run the kernel path, float64 reference and eager path; assert the rule on every output and gradient."""
    inputs, out_dtype = make_inputs(b, n, d, mode, residual, bias)
    up = upstream_grads(b, n, d, residual)
    ref_fn = reference.residual_rmsnorm_modulate if residual else reference.rmsnorm_modulate
    kern_fn = fn or (RESIDUAL if residual else PLAIN)
    k_out, k_grad = run(kern_fn, inputs, out_dtype, up, residual)
    r_out, r_grad = run(ref_fn, inputs, None, up, residual, cast=torch.float64)
    e_out, e_grad = run(ref_fn, inputs, out_dtype, up, residual)
    errs = {}
    for name in r_out:
        errs[name] = assert_within_rule(name, k_out[name], r_out[name], None if mode == "fp32" else e_out[name])
    for name in r_grad:
        errs["d" + name] = assert_within_rule(
            "d" + name, k_grad[name], r_grad[name], None if mode == "fp32" else e_grad[name]
        )
        assert k_grad[name].dtype == inputs[name].dtype
    return errs


FAST = [
    (3, 9, 97, "fp32", False, False),
    (3, 9, 97, "fp32", True, False),
    (3, 9, 97, "fp32", True, True),
    (3, 9, 97, "bf16", False, False),
    (3, 40, 97, "bf16", True, False),
    (3, 40, 97, "bf16", True, True),
    (1, 8, 97, "bf16-all", True, True),
    (1, 8, 768, "bf16", True, False),
    (1, 8, 1664, "fp32", True, True),
    (3, 9, 97, "fp16", False, False),
    (3, 9, 97, "fp16", True, True),
    (1, 8, 97, "fp16-all", True, True),
]


@pytest.mark.parametrize("b,n,d,mode,residual,bias", FAST)
def test_numerics_fast(b, n, d, mode, residual, bias):
    check_case(b, n, d, mode, residual, bias=bias)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "residual", "residual+bias"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "bf16-all"])
@pytest.mark.parametrize(("b", "d"), [(3, 97), (1, 768), (3, 1280), (1, 1664)])
def test_numerics_full(b, d, mode, variant):
    """Every width, mode and variant; batch 1 (40 tokens) and 3 (17 tokens) alternate over the widths (budget)."""
    check_case(b, 40 if b == 1 else 17, d, mode, variant != "plain", bias=variant.endswith("bias"))


@pytest.mark.parametrize("d", [97, 1280])
def test_every_candidate_config(d):
    """Non-default configs of the size class are numerically valid too (compile_check builds them all)."""
    inputs, out_dtype = make_inputs(2, 9, d, "bf16", True, bias=True)
    up = upstream_grads(2, 9, d, True)
    size = min(s for s in rm.FWD_CONFIGS if s >= triton.next_power_of_2(d))
    base_out, base_grad = run(RESIDUAL, inputs, out_dtype, up, True)
    r_out, r_grad = run(reference.residual_rmsnorm_modulate, inputs, None, up, True, cast=torch.float64)
    e_out, e_grad = run(reference.residual_rmsnorm_modulate, inputs, out_dtype, up, True)
    for fcfg in rm.FWD_CONFIGS[size]:
        x_out, y = rm.residual_rmsnorm_modulate_fwd(
            *(inputs[k] for k in NAMES_RES), EPS, out_dtype, inputs["branch_bias"], config=fcfg
        )
        assert_within_rule("y", y, r_out["y"], e_out["y"])
        assert_within_rule("x_out", x_out, r_out["x_out"], e_out["x_out"])
    for bcfg in rm.BWD_CONFIGS[size]:
        grads = rm.rmsnorm_modulate_bwd(
            up[1].to(torch.bfloat16), base_out["x_out"], up[0], inputs["branch"], inputs["gate"],
            inputs["weight"], inputs["scale"], EPS, inputs["x"].dtype, inputs["shift"].dtype, inputs["branch_bias"],
            config=bcfg,
        )
        for name, g in zip(NAMES_RES + ("branch_bias",), grads, strict=True):
            assert_within_rule("d" + name, g, r_grad[name], e_grad[name])


def stage_rows(b: int, n: int, config: triton.Config) -> tuple[int, int]:
    """(stage-2 rows per sample, stage-3 rows) the backward's `sum_rows` launches reduce: programs per sample, b."""
    return triton.cdiv(n, config.kwargs["ROWS_PER_PROG"]), b


def check_bwd_config(b: int, n: int, d: int, mode: str, variant: str, config: triton.Config) -> None:
    """Forward through the launch helpers, backward through `BWD` with `config`; every output and gradient
    against float64 under the rule of `check_case` (x_norm and dx_out as the autograd backward passes them)."""
    residual, bias = variant != "plain", variant == "residual+bias"
    inputs, out_dtype = make_inputs(b, n, d, mode, residual, bias)
    up = upstream_grads(b, n, d, residual)
    ref_fn = reference.residual_rmsnorm_modulate if residual else reference.rmsnorm_modulate
    r_out, r_grad = run(ref_fn, inputs, None, up, residual, cast=torch.float64)
    e_out, e_grad = run(ref_fn, inputs, out_dtype, up, residual)
    if residual:
        x_norm, y = RESIDUAL_FWD(*(inputs[k] for k in NAMES_RES), EPS, out_dtype, inputs.get("branch_bias"))
        outs, dx_out = {"x_out": x_norm, "y": y}, up[0].to(x_norm.dtype)
    else:
        y = FWD(*(inputs[k] for k in NAMES_PLAIN), EPS, out_dtype)
        outs, x_norm, dx_out = {"y": y}, inputs["x"], None
    grads = BWD(up[-1].to(y.dtype), x_norm, dx_out, inputs.get("branch"), inputs.get("gate"), inputs["weight"],
                inputs["scale"], EPS, inputs["x"].dtype, inputs["shift"].dtype, inputs.get("branch_bias"),
                config=config)
    for name, t in outs.items():
        assert_within_rule(name, t, r_out[name], None if mode == "fp32" else e_out[name])
    for name, g in zip(GRAD_NAMES, grads, strict=True):
        assert (g is None) == (name not in inputs), f"d{name}"
        if g is not None:
            assert g.dtype == inputs[name].dtype, f"d{name}"
            assert_within_rule("d" + name, g, r_grad[name], None if mode == "fp32" else e_grad[name])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_many_programs_per_sample(mode, variant):
    """105 tokens = 27 programs of 4 rows per sample, the last 1 row: stage 2 sums 27 partial rows per sample
    (4 loop steps, the last 3 rows) over 2 column programs (D = 555, odd, the last partial)."""
    b, n, d = 2, 105, 555
    rows2, _ = stage_rows(b, n, FEW_ROWS)
    assert rows2 > 3 * SUM_BLOCK_R and n % FEW_ROWS.kwargs["ROWS_PER_PROG"] != 0
    check_bwd_config(b, n, d, mode, variant, FEW_ROWS)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_many_samples(mode):
    """27 samples x 5 tokens (2 programs of 4 rows each, the last 1 row): stage 3 sums 27 per-sample rows of
    dweight and dbias (4 loop steps, the last 3 rows)."""
    b, n, d = 27, 5, 555
    _, rows3 = stage_rows(b, n, FEW_ROWS)
    assert rows3 > 3 * SUM_BLOCK_R
    check_bwd_config(b, n, d, mode, "residual+bias", FEW_ROWS)


def test_launched_config_batch():
    """The launched config: 9 samples x 33 tokens = 2 programs of 32 rows per sample (the last 1 row); stage 3
    sums 9 rows (2 loop steps, the last 1 row)."""
    b, n, d = 9, 33, 97
    rows2, _ = stage_rows(b, n, rm.select_config(rm.BWD_CONFIGS, triton.next_power_of_2(d), "test"))
    assert rows2 == 2
    check_case(b, n, d, "bf16", True, bias=True)


# fp16 runs the bf16 code paths with other loads and stores: one width of the larger size class, with the bias.
WIDE = [(d, m, v) for d in (768, 1280, 1664) for m in ("fp32", "bf16") for v in ("plain", "residual+bias")]


@pytest.mark.slow
@pytest.mark.parametrize("d,mode,variant", [*WIDE, (1664, "fp16", "residual+bias")])
def test_many_programs_wide(d, mode, variant):
    """JiT widths (2 to 4 column programs in the row sums): 27 programs per sample, 4-step stage-2 sums."""
    check_bwd_config(2, 105, d, mode, variant, FEW_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("d,mode", [(d, m) for d in (768, 1280, 1664) for m in ("fp32", "bf16")]
                         + [(768, "fp16"), (1664, "fp16")])
def test_launched_config_wide(d, mode):
    """The launched config of each JiT width: 9 samples, 2 programs per sample (the last 1 row)."""
    check_case(9, 33, d, mode, True, bias=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_launched_config_long(mode):
    """The launched config at production token counts: 801 tokens = 26 programs of 32 rows per sample (the last
    1 row), stage-2 sums of 26 rows in 4 loop steps."""
    rows2, _ = stage_rows(2, 801, rm.select_config(rm.BWD_CONFIGS, 128, "test"))
    assert rows2 > 3 * SUM_BLOCK_R
    check_case(2, 801, 97, mode, True, bias=True)


def backward_twice(device: str) -> None:
    """Two backward runs on `device` at production row counts (26 programs per sample, stage-2 sums in 4 steps,
    9 samples) give bitwise equal gradients."""
    for d in (97, 1280):
        torch.manual_seed(0)
        inputs, out_dtype = make_inputs(9, 801, d, "bf16", True, bias=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        up = [u.to(device) for u in upstream_grads(9, 801, d, True)]
        _, g1 = run(RESIDUAL, inputs, out_dtype, up, True)
        _, g2 = run(RESIDUAL, inputs, out_dtype, up, True)
        for name in g1:
            assert torch.equal(g1[name], g2[name]), f"d{name} at D={d}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_backward_bitwise_deterministic():
    """Compiled kernels, twice on the GPU (see `triton_interp.run_compiled` for why not interpreted)."""
    run_compiled("test_kernels_rmsnorm_modulate", "backward_twice('cuda')")


def test_no_atomics_in_kernels():
    """Reductions are two-stage by construction: no kernel source uses atomics."""
    for mod in (rm, _common):
        assert "tl.atomic" not in inspect.getsource(mod)


def test_strided_adaln_chunks_match_contiguous():
    """shift/scale/gate as chunks of the (B, 6D) adaLN output are read in place, same bits as copies."""
    b, n, d = 2, 5, 97
    ada = torch.randn(b, 6 * d)
    shift, scale, gate = ada.chunk(6, dim=1)[:3]
    x, branch, w = torch.randn(b, n, d), torch.randn(b, n, d), torch.randn(d)
    strided = rm.residual_rmsnorm_modulate_fwd(x, branch, gate, w, shift, scale, EPS, None)
    dense = rm.residual_rmsnorm_modulate_fwd(
        x, branch, gate.contiguous(), w, shift.contiguous(), scale.contiguous(), EPS, None
    )
    for a, c in zip(strided, dense, strict=True):
        assert torch.equal(a, c)


@pytest.mark.parametrize(("residual", "bias"), [(False, False), (True, False), (True, True)])
def test_custom_op_cpu_is_reference(residual, bias, monkeypatch):
    """Outside Triton's interpreter the custom op's CPU forward is the eager reference (bitwise); its backward
    meets the rule."""
    monkeypatch.delenv("TRITON_INTERPRET")
    inputs, out_dtype = make_inputs(2, 7, 40, "bf16", residual, bias)
    fn = rm.residual_rmsnorm_modulate if residual else rm.rmsnorm_modulate
    ref_fn = reference.residual_rmsnorm_modulate if residual else reference.rmsnorm_modulate
    up = upstream_grads(2, 7, 40, residual)
    o_out, _ = run(fn, inputs, out_dtype, up, residual)
    e_out, _ = run(ref_fn, inputs, out_dtype, up, residual)
    for name in o_out:
        assert torch.equal(o_out[name], e_out[name])
    check_case(2, 7, 40, "bf16", residual, fn=fn, bias=bias)
    check_case(2, 7, 40, "fp32", residual, fn=fn, bias=bias)


def test_cuda_dispatch_runs_triton(monkeypatch):
    """The CUDA kernel of each op is the Triton launch; CPU tensors reach it only under the interpreter."""
    calls = []
    for name in ("rmsnorm_modulate_fwd", "residual_rmsnorm_modulate_fwd", "rmsnorm_modulate_bwd"):
        orig = getattr(rm, name)
        monkeypatch.setattr(rm, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    cuda = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    for op in ("rmsnorm_modulate", "residual_rmsnorm_modulate", "rmsnorm_modulate_bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_fast::{op}", "CUDA")
    inputs, out_dtype = make_inputs(2, 5, 40, "bf16", True, bias=True)
    args, bias = [inputs[k] for k in NAMES_RES], inputs["branch_bias"]
    ref = reference.residual_rmsnorm_modulate(*args, EPS, out_dtype, bias)
    with monkeypatch.context() as m:
        m.delenv("TRITON_INTERPRET")
        rm.residual_rmsnorm_modulate(*args, EPS, out_dtype, bias)  # CPU tensors outside the interpreter: reference
    assert calls == []
    # Redispatching to the CUDA key with CPU tensors runs the registered CUDA kernel in the interpreter.
    x_out, y = torch.ops.jit_fast.residual_rmsnorm_modulate.default.redispatch(cuda, *args, EPS, out_dtype, bias)
    assert calls == ["residual_rmsnorm_modulate_fwd"]
    assert_within_rule("y", y, reference.residual_rmsnorm_modulate(
        *(a.double() for a in args), EPS, None, bias.double())[1], ref[1])
    torch.ops.jit_fast.rmsnorm_modulate.default.redispatch(cuda, *(inputs[k] for k in NAMES_PLAIN), EPS, None)
    assert calls[-1] == "rmsnorm_modulate_fwd"
    dy = torch.randn_like(y)
    grads = torch.ops.jit_fast.rmsnorm_modulate_bwd.default.redispatch(
        cuda, dy, x_out, None, inputs["branch"], inputs["gate"], inputs["weight"], inputs["scale"], EPS,
        torch.float32, torch.bfloat16, bias,
    )
    assert calls[-1] == "rmsnorm_modulate_bwd"
    assert len(grads) == 7 and grads[-1].shape == bias.shape and grads[-1].dtype == bias.dtype
    # fp32 gradients must not alias one another (custom ops forbid aliased outputs).
    f32 = [t.float() for t in (dy, x_out, inputs["branch"], inputs["gate"], inputs["weight"], inputs["scale"])]
    grads = torch.ops.jit_fast.rmsnorm_modulate_bwd.default.redispatch(
        cuda, f32[0], f32[1], None, f32[2], f32[3], f32[4], f32[5], EPS, torch.float32, torch.float32
    )
    assert len({g.data_ptr() for g in grads}) == len(grads)


class TestBadInput:
    def setup_method(self):
        self.x = torch.randn(2, 4, 8)
        self.w = torch.ones(8)
        self.v = torch.zeros(2, 8)

    def test_wrong_vector_shape(self):
        with pytest.raises(ValueError, match=r"shift must have shape \(2, 8\), got \(8,\)"):
            rm.rmsnorm_modulate(self.x, self.w, torch.zeros(8), self.v)
        with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
            rm.rmsnorm_modulate_fwd(self.x, torch.ones(9), self.v, self.v)

    def test_wrong_rank_and_branch(self):
        with pytest.raises(ValueError, match=r"x must be a non-empty \(B, N, D\) tensor, got shape \(8, 8\)"):
            rm.rmsnorm_modulate(torch.randn(8, 8), self.w, self.v, self.v)
        with pytest.raises(ValueError, match=r"got shape \(2, 0, 8\)"):
            rm.rmsnorm_modulate(torch.randn(2, 0, 8), self.w, self.v, self.v)
        with pytest.raises(ValueError, match="branch and gate must be given together"):
            rm.residual_rmsnorm_modulate_fwd(self.x, torch.randn(2, 4, 8), None, self.w, self.v, self.v)
        with pytest.raises(ValueError, match=r"branch must have shape \(2, 4, 8\)"):
            rm.residual_rmsnorm_modulate(self.x, torch.randn(2, 5, 8), self.v, self.w, self.v, self.v)

    def test_branch_bias(self):
        with pytest.raises(ValueError, match="branch_bias needs the gated residual"):
            rm.rmsnorm_modulate_bwd(self.x, self.x, None, None, None, self.w, self.v, EPS, torch.float32,
                                    torch.float32, self.w)
        with pytest.raises(ValueError, match=r"branch_bias must have shape \(8,\), got \(2, 8\)"):
            rm.residual_rmsnorm_modulate(self.x, self.x, self.v, self.w, self.v, self.v, branch_bias=self.v)

    def test_unsupported_dtype_and_width(self):
        with pytest.raises(ValueError, match="x has unsupported dtype torch.float64"):
            rm.rmsnorm_modulate(self.x.double(), self.w, self.v, self.v)
        with pytest.raises(ValueError, match="D=4096"):
            rm.rmsnorm_modulate(torch.randn(1, 2, 4096), torch.ones(4096), torch.zeros(1, 4096), torch.zeros(1, 4096))

    def test_non_contiguous(self):
        """Launch helpers reject non-contiguous activations; the op entry points copy them (documented)."""
        xt = torch.randn(2, 8, 4).transpose(1, 2)
        with pytest.raises(ValueError, match="x must be contiguous"):
            rm.rmsnorm_modulate_fwd(xt, self.w, self.v, self.v)
        got = PLAIN(xt, self.w, self.v, self.v)
        assert torch.equal(got, rm.rmsnorm_modulate_fwd(xt.contiguous(), self.w, self.v, self.v))
        col = torch.zeros(8, 2).t()
        with pytest.raises(ValueError, match="scale must have unit stride"):
            rm.rmsnorm_modulate_fwd(self.x, self.w, self.v, col)


def test_unused_x_out():
    """Final layer: x_out is discarded, so no gradient arrives for it (the HAS_DXO=False kernel variant);
    it adds the last block's MLP bias."""
    inputs, out_dtype = make_inputs(2, 9, 97, "bf16", True, bias=True)
    gy = torch.randn(2, 9, 97)

    def grads(f, cast=None):
        leaves = {k: (v if cast is None else v.to(cast)).detach().clone().requires_grad_() for k, v in inputs.items()}
        _, y = f(*(leaves[k] for k in NAMES_RES), EPS, None if cast else out_dtype, leaves["branch_bias"])
        y.backward(gy.to(y.dtype))
        return {k: v.grad for k, v in leaves.items()}

    got = grads(RESIDUAL)
    ref = grads(reference.residual_rmsnorm_modulate, cast=torch.float64)
    eager = grads(reference.residual_rmsnorm_modulate)
    for name in got:
        assert_within_rule("d" + name, got[name], ref[name], eager[name])
