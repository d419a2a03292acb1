"""Fused dropout: the Philox mask contract, the CPU twin against the interpreted kernels (bit for bit), the masks'
statistics and seeding (sites, blocks, steps, ranks, resume), and the fused ops' forward and backward vs float64
with the identical mask (jit_kernels.numerics rule)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton_interp import use_gpu_bf16_rounding

import jit_fast
from jit_fast.shared.seeds import dropout_seed
from jit_kernels import op_specs, reference
from jit_kernels import rmsnorm_modulate as rm
from jit_kernels import swiglu as sw
from jit_kernels._common import dropout_keep
from jit_kernels.dropout import MAX_SITE, Dropout, keep_mask, philox4x32
from jit_kernels.numerics import assert_within_rule, rel_err

use_gpu_bf16_rounding()
op_specs()  # builds every kernel interpreted now: some tests below unset TRITON_INTERPRET

EPS = 1e-6
# Backward configs of 4 rows per program (the launched ones take 32 / 64): the same kernel code, many programs and
# multi-step row sums at a fraction of the interpreted rows (as in test_kernels_rmsnorm_modulate / _swiglu).
RM_FEW_ROWS = triton.Config({"BLOCK_M": 2, "ROWS_PER_PROG": 4}, num_warps=4, num_stages=1)
SW_FEW_ROWS = triton.Config({"BLOCK_M": 2, "BLOCK_H": 256, "ROWS_PER_PROG": 4}, num_warps=4, num_stages=1)


def seed_tensor(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)


def sigma6(p: float, n: int) -> float:
    """6 standard deviations of a binomial rate with success probability p over n trials."""
    return 6 * (p * (1 - p) / n) ** 0.5


@triton.jit
def mask_kernel(SEED, OUT, M, C, SITE, p, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[m, c] = the keep bit `dropout_keep` draws for one (BLOCK_M, BLOCK_C) tile: the production mask code."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = tl.program_id(1) * BLOCK_C
    keep = dropout_keep(tl.load(SEED), SITE, rows, col0, C, p, BLOCK_C)
    cols = col0 + tl.arange(0, BLOCK_C)
    mask = (rows < M)[:, None] & (cols < C)[None, :]
    tl.store(OUT + rows[:, None] * C + cols[None, :], keep.to(tl.int8), mask=mask)


def kernel_mask(dropout: Dropout, rows: int, cols: int, block_m: int, block_c: int) -> torch.Tensor:
    out = torch.full((rows, cols), -1, dtype=torch.int8)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_c))
    mask_kernel[grid](dropout.seed, out, rows, cols, dropout.site, dropout.p, BLOCK_M=block_m, BLOCK_C=block_c)
    assert (out >= 0).all()
    return out.bool()


def test_philox_known_answers():
    """The twin is standard Philox4x32-10: Random123's known-answer vectors (kat_vectors, philox4x32 10 rounds)."""
    cases = [
        ((0, 0), (0, 0, 0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF,) * 4, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0xA4093822, 0x299F31D0), (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for key, ctr, want in cases:
        got = philox4x32(key, *(torch.tensor([c]) for c in ctr))
        assert tuple(int(w) for w in got) == want


def test_twin_equals_interpreted_kernel():
    """The kernels' mask code (interpreted) and the twin agree bit for bit: extreme and negative seeds, sites using
    the counter's high word, both probabilities, tiles of 1 to all rows and 8 to 64 columns (7 x 37: neither a
    multiple of a tile nor of 4)."""
    seeds = [0, 1, -1, 2**63 - 1, -(2**63), 0x0123456789ABCDEF]
    sites = [0, 1, 77, MAX_SITE, 2 * 31 + 1, 2]
    tiles = [(8, 64), (1, 16), (2, 8)]
    for i, seed in enumerate(seeds):
        d = Dropout((0.2, 0.5)[i % 2], seed_tensor(seed), sites[i])
        assert torch.equal(kernel_mask(d, 7, 37, *tiles[i % 3]), keep_mask(d, 7, 37)), (seed, d.site, tiles[i % 3])


def swiglu_masks(d: Dropout, m: int, h: int, fwd_config=None, bwd_config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep masks the SwiGLU kernels apply, read off their outputs: with x1 = 4, x2 = 1 (h = silu(4) != 0) and
    dout = 1, forward h and backward dx2 are nonzero exactly where the mask keeps."""
    x12 = torch.cat((torch.full((m, h), 4.0), torch.ones(m, h)), dim=-1)
    out = sw.swiglu_fwd(x12, None, fwd_config, dropout=d)
    dx12, _ = sw.swiglu_bwd(x12, None, torch.ones(m, h), bwd_config, dropout=d)
    return out != 0, dx12[:, h:] != 0


def residual_masks(d: Dropout, b: int, n: int, dim: int, fwd_config=None, bwd_config=None):
    """Keep masks of the residual op's kernels: x = 0, gate = 1, branch = 1 give x_out = keep * scale; with
    dx_out = 1 and dy = 0 the backward's dbranch = keep * scale."""
    x, branch, gate = torch.zeros(b, n, dim), torch.ones(b, n, dim), torch.ones(b, dim)
    w, shift, scale = torch.ones(dim), torch.zeros(b, dim), torch.zeros(b, dim)
    x_out, _ = rm.residual_rmsnorm_modulate_fwd(x, branch, gate, w, shift, scale, config=fwd_config, dropout=d)
    grads = rm.rmsnorm_modulate_bwd(torch.zeros(b, n, dim), x_out, torch.ones(b, n, dim), branch, gate, w, scale, EPS,
                                    torch.float32, torch.float32, config=bwd_config, dropout=d)
    return (x_out != 0).flatten(0, 1), (grads[1] != 0).flatten(0, 1)


def test_kernels_draw_the_twin_mask_forward_and_backward():
    """The production kernels (every candidate config) apply the twin's mask, in forward and in backward."""
    d = Dropout(0.5, seed_tensor(dropout_seed(3, 5, 1)), 9)
    want = keep_mask(d, 11, 277)
    for fcfg, bcfg in zip([*sw.FWD_CONFIGS, sw.FWD_CONFIGS[0]], [*sw.BWD_CONFIGS, SW_FEW_ROWS], strict=True):
        fwd, bwd = swiglu_masks(d, 11, 277, fcfg, bcfg)
        assert torch.equal(fwd, want) and torch.equal(bwd, want)
    want = keep_mask(d, 2 * 9, 97)
    fwd_cfgs, bwd_cfgs = rm.FWD_CONFIGS[1024], rm.BWD_CONFIGS[1024]
    for fcfg, bcfg in zip([*fwd_cfgs, fwd_cfgs[0]], [*bwd_cfgs, RM_FEW_ROWS], strict=True):
        fwd, bwd = residual_masks(d, 2, 9, 97, fcfg, bcfg)
        assert torch.equal(fwd, want) and torch.equal(bwd, want)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_keep_rate_and_scale(p):
    """Keep rate within 6 binomial sigmas of 1 - p over 2^20 draws, also per Philox word (column mod 4) and for the
    kernel's own mask; kept values are scaled by exactly 1 / (1 - p) (x_out = 0 + 1 * branch * scale in fp32)."""
    d = Dropout(p, seed_tensor(dropout_seed(0, 1, 0)), 3)
    mask = keep_mask(d, 1024, 1024)
    assert abs(mask.double().mean().item() - (1 - p)) <= sigma6(p, mask.numel())
    for word in range(4):
        col = mask[:, word::4]
        assert abs(col.double().mean().item() - (1 - p)) <= sigma6(p, col.numel()), word
    branch = torch.randn(2, 8, 97)
    gate, w, zero = torch.ones(2, 97), torch.ones(97), torch.zeros(2, 97)
    x_out, _ = rm.residual_rmsnorm_modulate_fwd(torch.zeros(2, 8, 97), branch, gate, w, zero, zero, dropout=d)
    keep = keep_mask(d, 2 * 8, 97).view(2, 8, 97)
    assert torch.equal(x_out, torch.where(keep, branch * torch.tensor(1 / (1 - p)), torch.zeros(())))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).double().mean().item()


def test_masks_independent_across_sites_blocks_steps_ranks_and_equal_on_resume():
    """Two masks of different sites, blocks, steps, ranks or micro-steps agree on p^2 + (1-p)^2 of the elements (as
    independent masks do, within 6 sigma); the same (seed, step, rank, micro) gives the same mask (resume)."""
    p, rows, cols = 0.2, 256, 512
    base = dict(seed=11, step=100, rank=0, micro=0)

    def mask(site: int = 4, **kw) -> torch.Tensor:
        key = dropout_seed(**{**base, **kw})
        return keep_mask(Dropout(p, seed_tensor(key), site), rows, cols)

    ref = mask()
    others = [mask(site=5), mask(site=6), mask(step=101), mask(rank=1), mask(micro=1), mask(seed=12)]
    want, tol = p * p + (1 - p) ** 2, sigma6(p * p + (1 - p) ** 2, rows * cols)
    for i, other in enumerate(others):
        assert abs(agreement(ref, other) - want) <= tol, i
    assert torch.equal(mask(), ref)
    assert len({dropout_seed(1, s, r, m) for s in range(4) for r in range(4) for m in range(2)}) == 32


# ---------------------------------------------------------------------------------------------------------------
# Numerics: fused forward + backward vs float64 with the identical mask (the reference draws it with the twin).


def residual_inputs(b: int, n: int, d: int, mode: str, bias: bool) -> tuple[dict, torch.dtype | None]:
    """Residual-op inputs as the model hands them: fp32 stream; fp32 or bf16 (autocast) branch and vectors."""
    act = torch.float32 if mode == "fp32" else torch.bfloat16
    t = {
        "x": torch.randn(b, n, d),
        "branch": torch.randn(b, n, d).to(act),
        "gate": (0.5 * torch.randn(b, d)).to(act),
        "weight": 1 + 0.2 * torch.randn(d),
        "shift": (0.3 * torch.randn(b, d)).to(act),
        "scale": (0.3 * torch.randn(b, d)).to(act),
    }
    if bias:
        t["branch_bias"] = 0.5 * torch.randn(d)
    return t, (None if mode == "fp32" else torch.bfloat16)


NAMES = ("x", "branch", "gate", "weight", "shift", "scale")


def residual_run(fn, inputs: dict, out_dtype, up: list[torch.Tensor], d: Dropout, cast=None):
    """Forward + backward of a residual op with dropout `d`: ({x_out, y}, {input: grad})."""
    leaves = {k: (v if cast is None else v.to(cast)).detach().clone().requires_grad_() for k, v in inputs.items()}
    outs = fn(*(leaves[k] for k in NAMES), EPS, out_dtype, leaves.get("branch_bias"), d)
    torch.autograd.backward(list(outs), [g.to(o.dtype) for g, o in zip(up, outs, strict=True)])
    return dict(zip(("x_out", "y"), (o.detach() for o in outs), strict=True)), {k: v.grad for k, v in leaves.items()}


def check_residual(b: int, n: int, dim: int, mode: str, bias: bool, bwd_config=None, p: float = 0.2) -> None:
    """Kernels (forward launched config, backward `bwd_config`) vs float64 and the eager path, identical mask."""
    inputs, out_dtype = residual_inputs(b, n, dim, mode, bias)
    up = [torch.randn(b, n, dim), torch.randn(b, n, dim)]
    d = Dropout(p, seed_tensor(dropout_seed(1, 2, 3)), 2 * 7)
    r_out, r_grad = residual_run(reference.residual_rmsnorm_modulate, inputs, None, up, d, cast=torch.float64)
    e_out, e_grad = residual_run(reference.residual_rmsnorm_modulate, inputs, out_dtype, up, d)
    x_out, y = rm.residual_rmsnorm_modulate_fwd(*(inputs[k] for k in NAMES), EPS, out_dtype, inputs.get("branch_bias"),
                                                dropout=d)
    grads = rm.rmsnorm_modulate_bwd(up[1].to(y.dtype), x_out, up[0], inputs["branch"], inputs["gate"],
                                    inputs["weight"], inputs["scale"], EPS, torch.float32, inputs["shift"].dtype,
                                    inputs.get("branch_bias"), config=bwd_config, dropout=d)
    eager = mode != "fp32"
    for name, t in (("x_out", x_out), ("y", y)):
        assert_within_rule(name, t, r_out[name], e_out[name] if eager else None)
    for name, g in zip((*NAMES, "branch_bias"), grads, strict=True):
        if name in inputs:
            assert g.dtype == inputs[name].dtype, name
            assert_within_rule("d" + name, g, r_grad[name], e_grad[name] if eager else None)


@pytest.mark.parametrize(("mode", "bias"), [
    ("bf16", True),
    *(pytest.param(m, b, marks=pytest.mark.slow) for m, b in (("fp32", False), ("bf16", False), ("fp32", True))),
])
def test_residual_many_programs(mode, bias):
    """37 tokens = 10 backward programs of 4 rows per sample (the last 1 row), D = 555 (odd: the last Philox quad
    is partial; 2 column programs in the row sums), 2 samples."""
    check_residual(2, 37, 555, mode, bias, RM_FEW_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_residual_launched_config(p):
    """The launched configs: 9 samples x 33 tokens = 2 backward programs of 32 rows per sample."""
    check_residual(9, 33, 97, "bf16", True, p=p)


def swiglu_run(fn, x12, bias, dout, d: Dropout, cast=None):
    leaf = (x12 if cast is None else x12.to(cast)).detach().clone().requires_grad_()
    b = None if bias is None else (bias if cast is None else bias.to(cast)).detach().clone().requires_grad_()
    out = fn(leaf, b, d)
    out.backward(dout.to(out.dtype))
    return out.detach(), leaf.grad, None if b is None else b.grad


def check_swiglu(shape: tuple[int, ...], h: int, dtype: torch.dtype, bias: bool, bwd_config=None, p=0.2) -> None:
    x12 = (2 * torch.randn(*shape, 2 * h)).to(dtype)
    b = torch.randn(2 * h) if bias else None
    dout = torch.randn(*shape, h)
    d = Dropout(p, seed_tensor(dropout_seed(4, 5, 6)), 2 * 7 + 1)
    want = swiglu_run(reference.swiglu, x12, b, dout, d, cast=torch.float64)
    eager = swiglu_run(reference.swiglu, x12, b, dout, d) if dtype != torch.float32 else (None,) * 3
    out = sw.swiglu_fwd(x12, b, dropout=d)
    dx12, dbias = sw.swiglu_bwd(x12, b, dout.to(dtype), bwd_config, dropout=d)
    for name, g, w, e in zip(("h", "dx12", "dbias"), (out, dx12, dbias), want, eager, strict=True):
        if w is not None:
            assert_within_rule(name, g, w, e)


@pytest.mark.parametrize(("dtype", "bias"), [
    (torch.bfloat16, True),
    *(pytest.param(d, b, marks=pytest.mark.slow)
      for d, b in ((torch.float32, False), (torch.bfloat16, False), (torch.float32, True))),
])
def test_swiglu_many_programs(dtype, bias):
    """117 rows = 30 backward programs of 4 rows (the last 1 row) x 2 column programs (h = 277: the last tile 21
    wide, the last Philox quad partial)."""
    check_swiglu((9, 13), 277, dtype, bias, SW_FEW_ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_swiglu_launched_config(p):
    """The launched configs: 9 x 15 = 135 rows, 3 backward programs of 64 rows, 2 column programs."""
    check_swiglu((9, 15), 277, torch.bfloat16, True, p=p)


def test_custom_ops_autograd_pass_the_mask_to_backward():
    """Through the custom ops and autograd (the model's entry points): every gradient, incl. the folded biases,
    meets the rule against float64 with the same mask; a backward with another site's mask would not."""
    inputs, out_dtype = residual_inputs(2, 9, 97, "bf16", True)
    up = [torch.randn(2, 9, 97), torch.randn(2, 9, 97)]
    d = Dropout(0.2, seed_tensor(5), 3)
    k_out, k_grad = residual_run(rm.residual_rmsnorm_modulate, inputs, out_dtype, up, d)
    r_out, r_grad = residual_run(reference.residual_rmsnorm_modulate, inputs, None, up, d, cast=torch.float64)
    e_out, e_grad = residual_run(reference.residual_rmsnorm_modulate, inputs, out_dtype, up, d)
    for name in k_grad:
        assert_within_rule("d" + name, k_grad[name], r_grad[name], e_grad[name])
    _, other = residual_run(reference.residual_rmsnorm_modulate, inputs, None, up, d._replace(site=4), torch.float64)
    assert rel_err(k_grad["branch"], other["branch"]) > 0.5
    x12, bias, dout = torch.randn(3, 5, 80).bfloat16(), torch.randn(80), torch.randn(3, 5, 40)
    got = swiglu_run(sw.swiglu, x12, bias, dout, d)
    want = swiglu_run(reference.swiglu, x12, bias, dout, d, cast=torch.float64)
    eager = swiglu_run(reference.swiglu, x12, bias, dout, d)
    for name, g, w, e in zip(("h", "dx12", "dbias"), got, want, eager, strict=True):
        assert_within_rule(name, g, w, e)


def test_cpu_twin_path_matches_interpreter(monkeypatch):
    """Outside the interpreter the custom ops' CPU kernels are the reference with the twin's masks: same outputs
    as the interpreted kernels (to fp32 rounding) and the same zeros."""
    inputs, _ = residual_inputs(2, 9, 97, "fp32", True)
    d = Dropout(0.5, seed_tensor(-77), 21)
    args = [inputs[k] for k in NAMES]
    interp = rm.residual_rmsnorm_modulate(*args, EPS, None, inputs["branch_bias"], d)
    x12 = torch.randn(4, 7, 60)
    interp_h = sw.swiglu(x12, None, d)
    monkeypatch.delenv("TRITON_INTERPRET")
    twin = rm.residual_rmsnorm_modulate(*args, EPS, None, inputs["branch_bias"], d)
    twin_h = sw.swiglu(x12, None, d)
    for a, b in zip((*interp, interp_h), (*twin, twin_h), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(interp_h == 0, twin_h == 0)


def test_cpu_twin_path_backward_applies_the_forward_mask(monkeypatch):
    """The CPU training path's backward ops (outside the interpreter) mask and scale the incoming gradient with the
    forward's mask: every gradient equals autograd through the reference forward with the same dropout (the
    interpreted backward kernels are checked above; this is the other implementation of the ops)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    d = Dropout(0.5, seed_tensor(-77), 21)
    inputs, _ = residual_inputs(2, 9, 97, "fp32", True)
    up = [torch.randn(2, 9, 97), torch.randn(2, 9, 97)]
    _, got = residual_run(rm.residual_rmsnorm_modulate, inputs, None, up, d)
    _, want = residual_run(reference.residual_rmsnorm_modulate, inputs, None, up, d)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    x12, bias, dout = torch.randn(4, 7, 60), torch.randn(60), torch.randn(4, 7, 30)
    got = swiglu_run(sw.swiglu, x12, bias, dout, d)
    want = swiglu_run(reference.swiglu, x12, bias, dout, d)
    for name, g, w in zip(("h", "dx12", "dbias"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)


def test_bad_dropout_arguments():
    x, v, w = torch.randn(2, 4, 8), torch.zeros(2, 8), torch.ones(8)
    good = seed_tensor(1)
    cases = [
        (Dropout(1.0, good, 0), r"dropout p must be in \[0, 1\)"),
        (Dropout(0.2, good, -1), "dropout site must be in"),
        (Dropout(0.2, torch.tensor([1.0]), 0), "int64 tensor of one element"),
        (Dropout(0.2, torch.tensor([1, 2]), 0), "int64 tensor of one element"),
        (Dropout(0.2, torch.empty(1, dtype=torch.int64, device="meta"), 0), "dropout seed is on meta"),
    ]
    for d, msg in cases:
        with pytest.raises(ValueError, match=msg):
            rm.residual_rmsnorm_modulate(x, x, v, w, v, v, dropout=d)
        with pytest.raises(ValueError, match=msg):
            sw.swiglu(torch.randn(2, 8), None, d)
    with pytest.raises(ValueError, match="dropout needs the gated residual"):
        rm.rmsnorm_modulate_bwd(x, x, None, None, None, w, v, EPS, torch.float32, torch.float32,
                                dropout=Dropout(0.2, good, 0))


def test_seed_tensor_changes_do_not_recompile():
    """Under torch.compile(fullgraph=True) the seed is a tensor input: new values in place, one graph."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    x12 = torch.randn(2, 3, 16)
    seed = seed_tensor(0)

    @torch.compile(backend=counter, fullgraph=True)
    def f(x12, seed):
        return sw.swiglu(x12, None, Dropout(0.5, seed, 1))

    outs = []
    for value in (1, 2, 3):
        seed.fill_(value)
        outs.append(f(x12, seed))
    assert counter.frame_count == 1
    assert not torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------------------------
# The model: one key per forward, sites per block, the torch path untouched.

TINY = dict(img_size=16, num_classes=4, depth=4, hidden_size=32, num_heads=2, bottleneck_dim=8, in_context_len=2,
            in_context_start=1, patch_size=4, attn_drop=0.0, proj_drop=0.5)


def tiny(kernels: str = "triton") -> jit_fast.JiT:
    torch.manual_seed(0)
    net = jit_fast.build_model("JiT-B/16", kernels=kernels, **TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.train()


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, generator=g), torch.randint(0, 4, (2,), generator=g)


def test_model_keys_masks_per_forward_and_resumes(monkeypatch):
    """Same key -> same output (a resumed run's fresh model included); another step's key -> another output; unset,
    the key comes from torch's generator. CPU twin path (fast)."""
    monkeypatch.delenv("TRITON_INTERPRET")
    net, x = tiny(), batch()
    net.set_dropout_seed(dropout_seed(0, 10, 0))
    a = net(*x)
    resumed = tiny()
    resumed.load_state_dict(net.state_dict())
    resumed.set_dropout_seed(dropout_seed(0, 10, 0))
    assert torch.equal(resumed(*x), a)
    net.set_dropout_seed(torch.tensor(dropout_seed(0, 10, 0)))  # a tensor key: copied in place
    assert torch.equal(net(*x), a)
    net.set_dropout_seed(dropout_seed(0, 11, 0))
    assert not torch.equal(net(*x), a)
    net.set_dropout_seed(None)
    torch.manual_seed(5)
    b = net(*x)
    torch.manual_seed(5)
    assert torch.equal(net(*x), b) and not torch.equal(net(*x), b)
    assert torch.equal(net.eval()(*x), tiny().eval()(*x))  # eval: no dropout


def test_model_in_place_key_change_before_backward_fails(monkeypatch):
    """The ops save the key tensor: rekeying before the backward of a forward is an autograd error, not silently
    another mask in backward."""
    monkeypatch.delenv("TRITON_INTERPRET")
    net = tiny()
    net.set_dropout_seed(1)
    out = net(*batch())
    net.set_dropout_seed(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.slow
def test_model_interpreter_matches_twin_path(monkeypatch):
    """The fused model through the interpreted kernels and through the CPU twin: same forward and gradients."""
    x = batch()
    nets = {}
    for name in ("interpreter", "twin"):
        if name == "twin":
            monkeypatch.delenv("TRITON_INTERPRET")
        net = tiny()
        net.set_dropout_seed(dropout_seed(2, 3, 0))
        out = net(*x)
        out.square().sum().backward()
        nets[name] = (out.detach(), {k: p.grad for k, p in net.named_parameters() if p.grad is not None})
    (o1, g1), (o2, g2) = nets["interpreter"], nets["twin"]
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-4, atol=1e-6, msg=k)


def test_torch_path_keeps_nn_dropout():
    """The official path draws torch's dropout (seeded by torch's generator) and ignores the fused key."""
    net, x = tiny("torch"), batch()
    net.set_dropout_seed(1)
    torch.manual_seed(3)
    a = net(*x)
    net.set_dropout_seed(2)
    torch.manual_seed(3)
    assert torch.equal(net(*x), a)
    assert not net.fused_dropout and tiny().fused_dropout


# ---------------------------------------------------------------------------------------------------------------
# Training: a tiny JiT-H-shaped model on the demo digits, fused dropout vs torch's dropout.

# JiT-H's layout at toy size: 8 blocks, dropout (attention 0.2 through SDPA, proj 0.2) in blocks 2-5, in-context
# tokens from block 3 (inside the dropout range, as H's block 10 of 32), bottleneck narrower than the width.
H_TINY = dict(img_size=32, num_classes=10, depth=8, hidden_size=64, num_heads=4, bottleneck_dim=16, patch_size=8,
              in_context_len=4, in_context_start=3)
STEPS, BATCH = 30, 32


def train_losses(kernels: str, seed: int, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-step losses of STEPS AdamW steps from one init on one data/time/noise sequence; only the dropout masks
    depend on `seed` (torch's generator for nn.Dropout and SDPA, `dropout_seed` for the fused masks)."""
    from jit_fast.model.denoiser import flow_matching_loss, sample_t
    from jit_fast.shared.seeds import mix_seed

    torch.manual_seed(0)
    net = jit_fast.build_model("JiT-H/16", kernels=kernels, **H_TINY).train()
    assert [b.attn.proj_drop.p for b in net.blocks] == [0.0, 0.0, 0.2, 0.2, 0.2, 0.2, 0.0, 0.0]
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        g = torch.Generator().manual_seed(mix_seed(7, step))
        idx = torch.randint(0, len(images), (BATCH,), generator=g)
        t = sample_t(BATCH, generator=g)
        noise = torch.randn(BATCH, 3, 32, 32, generator=g)
        drop = torch.rand(BATCH, generator=g) < 0.1
        torch.manual_seed(mix_seed(seed, step))
        net.set_dropout_seed(dropout_seed(seed, step, 0))
        loss = flow_matching_loss(net, images[idx], labels[idx], t=t, noise=noise, drop=drop, num_classes=10)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.slow
def test_tiny_jit_h_trains_like_torch_dropout(monkeypatch, one_thread):
    """The fused path (CPU twin masks, the kernels' masks bit for bit) trains within the run-to-run spread of torch's
    dropout: over windows of 10 steps after the first 10, and over all of them, each fused run's mean loss lies in
    the range of 3 torch runs widened by that range's width (at least 0.5% of the loss: 3 runs can agree closely).
    Measured: keeping p instead of 1 - p (a swapped comparison) leaves the band by 2-4%, dropping nothing by 2%; a
    missing 1/(1-p) scale sits at its edge (the kernel tests catch that one exactly)."""
    from jit_fast.data.demo import demo_arrays

    monkeypatch.delenv("TRITON_INTERPRET")
    images, labels = demo_arrays(32)
    runs = {(k, s): train_losses(k, s, images, labels) for k, n in (("torch", 3), ("triton", 2)) for s in range(n)}
    for lo_step, hi_step in ((10, 20), (20, 30), (10, 30)):
        means = {key: v[lo_step:hi_step].mean().item() for key, v in runs.items()}
        ref = [m for (k, _), m in means.items() if k == "torch"]
        width = max(max(ref) - min(ref), 0.005 * max(ref))
        for (k, s), m in means.items():
            assert min(ref) - width <= m <= max(ref) + width, (k, s, lo_step, hi_step, m, ref)
