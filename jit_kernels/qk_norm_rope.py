"""Fused q/k RMSNorm + 2D RoPE reading the qkv GEMM output once and writing q, k, v as (B, N, H, Dh).

Forward, for q and k of every (token, head) row: x = qkv (+ bias), n = x * rstd * weight,
rstd = 1 / sqrt(mean(x^2) + eps), out[d] = n[d] * cos[d] + s(d) * n[d ^ 1] * sin[d] with s(d) = -1 for
even d, +1 for odd d (interleaved pair rotation; in-context rows carry cos = 1, sin = 0 in the table).
v (+ bias) is copied into its own contiguous buffer. The bias is the qkv GEMM's, left out of that GEMM:
adding it here (in fp32) saves its cast under autocast and, in backward, the separate sum over dqkv.
Backward applies the transposed rotation and the RMSNorm backward in one pass and writes dqkv; each
program owns one head, so dq_weight, dk_weight and the per-head bias gradient are two-stage sums over
rows (see `_common`), finished together by one `qk_sum_kernel` launch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from jit_kernels import reference
from jit_kernels._common import (
    Workspace,
    _sum_store,
    arch_override,
    check_contiguous,
    check_dtype,
    check_same_device,
    check_shape,
    device_guard,
    launch_options,
    select_config,
)
from jit_kernels.spec import (
    EPS,
    MODE_DTYPES,
    CaseData,
    DtypeClass,
    KernelSpec,
    LibraryOp,
    OpCase,
    OpSpec,
    define,
    randn,
)

MAX_HEAD_DIM = 128

# Size classes keyed by BLOCK_DH = next_pow2(head_dim): Dh 64 -> 64, Dh 80/104/128 -> 128.
# A "row" is one (token, head) pair; a backward program walks ROWS_PER_PROG tokens of one head. The
# first config of each class is launched (fixed, so reductions are reproducible), the rest are
# candidates compile_check also builds. Defaults: no spills, then the
# best occupancy estimate in compile_check's report (no GPU here to time them).
FWD_CONFIGS: dict[int, list[triton.Config]] = {
    64: [
        triton.Config({"BLOCK_R": 16}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_R": 32}, num_warps=8, num_stages=1),
    ],
    128: [
        triton.Config({"BLOCK_R": 8}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_R": 16}, num_warps=8, num_stages=1),
    ],
}
BWD_CONFIGS: dict[int, list[triton.Config]] = {
    64: [
        triton.Config({"BLOCK_R": 8, "ROWS_PER_PROG": 256}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_R": 16, "ROWS_PER_PROG": 256}, num_warps=4, num_stages=1),
    ],
    128: [
        triton.Config({"BLOCK_R": 4, "ROWS_PER_PROG": 256}, num_warps=4, num_stages=1),
        triton.Config({"BLOCK_R": 8, "ROWS_PER_PROG": 256}, num_warps=4, num_stages=1),
    ],
}

# sm_75 (T4): uncapped, ptxas spills 4 bytes in the fp16-parameter Dh 104 bias variant there; 96 registers do not
# (compile_check).
arch_override(BWD_CONFIGS[128][0], 75, maxnreg=96)


@triton.jit
def _norm_rope(x, x_pair, w, w_pair, cos, sin, sign, DH, eps):
    """RMSNorm with weight, then the interleaved-pair rotation; also returns rstd (fp32 in, fp32 out)."""
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / DH + eps)
    n = x * rstd[:, None] * w[None, :]
    n_pair = x_pair * rstd[:, None] * w_pair[None, :]
    return n * cos + sign[None, :] * n_pair * sin


@triton.jit
def qk_norm_rope_fwd_kernel(
    QKV,
    BIAS,
    QW,
    KW,
    COS,
    SIN,
    Q,
    K,
    V,
    R,
    N,
    H,
    DH,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    """Program i handles rows [i*BLOCK_R, (i+1)*BLOCK_R) of the B*N*H (token, head) rows."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_DH)
    pair = cols ^ 1
    cmask = cols < DH
    mask = (rows < R)[:, None] & cmask[None, :]
    token = rows // H
    head = rows % H
    pos = token % N
    in_base = (token.to(tl.int64) * 3 * H + head) * DH
    rows = rows.to(tl.int64)
    src = in_base[:, None] + cols[None, :]
    src_pair = in_base[:, None] + pair[None, :]
    dst = rows[:, None] * DH + cols[None, :]
    tab = pos[:, None] * DH + cols[None, :]
    cos = tl.load(COS + tab, mask=mask, other=0.0)
    sin = tl.load(SIN + tab, mask=mask, other=0.0)
    sign = tl.where(cols % 2 == 0, -1.0, 1.0)
    c = H * DH
    bias_at = head[:, None] * DH + cols[None, :]
    bias_pair = head[:, None] * DH + pair[None, :]

    qw = tl.load(QW + cols, mask=cmask, other=0.0).to(tl.float32)
    qw_pair = tl.load(QW + pair, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(QKV + src, mask=mask, other=0.0).to(tl.float32)
    x_pair = tl.load(QKV + src_pair, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + bias_at, mask=mask, other=0.0).to(tl.float32)
        x_pair += tl.load(BIAS + bias_pair, mask=mask, other=0.0).to(tl.float32)
    q = _norm_rope(x, x_pair, qw, qw_pair, cos, sin, sign, DH, eps)
    tl.store(Q + dst, q.to(Q.dtype.element_ty), mask=mask)

    kw = tl.load(KW + cols, mask=cmask, other=0.0).to(tl.float32)
    kw_pair = tl.load(KW + pair, mask=cmask, other=0.0).to(tl.float32)
    x = tl.load(QKV + c + src, mask=mask, other=0.0).to(tl.float32)
    x_pair = tl.load(QKV + c + src_pair, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + c + bias_at, mask=mask, other=0.0).to(tl.float32)
        x_pair += tl.load(BIAS + c + bias_pair, mask=mask, other=0.0).to(tl.float32)
    k = _norm_rope(x, x_pair, kw, kw_pair, cos, sin, sign, DH, eps)
    tl.store(K + dst, k.to(K.dtype.element_ty), mask=mask)

    v = tl.load(QKV + 2 * c + src, mask=mask, other=0.0)
    if HAS_BIAS:
        v = (v.to(tl.float32) + tl.load(BIAS + 2 * c + bias_at, mask=mask, other=0.0).to(tl.float32))
    tl.store(V + dst, v.to(V.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rope_bwd(x, dy, dy_pair, w, cos, sin_pair, sign, DH, eps):
    """Transposed rotation then RMSNorm backward; returns (dx, per-column dweight contribution)."""
    dn = dy * cos - sign[None, :] * dy_pair * sin_pair
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / DH + eps)
    xhat = x * rstd[:, None]
    g = dn * w[None, :]
    proj = tl.sum(g * xhat, axis=1) / DH
    dx = (g - xhat * proj[:, None]) * rstd[:, None]
    return dx, tl.sum(dn * xhat, axis=0)


@triton.jit
def qk_norm_rope_bwd_kernel(
    QKV,
    BIAS,
    QW,
    KW,
    COS,
    SIN,
    DQ,
    DK,
    DV,
    DQKV,
    PART,
    T,
    N,
    H,
    DH,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
):
    """Program (p, h) walks tokens [p*ROWS_PER_PROG, (p+1)*ROWS_PER_PROG) of head h (T = B*N tokens),
    writes dqkv for them and fp32 partial rows for dq_weight, dk_weight (and the q, k, v bias of head h)
    into PART[p, h, 0:NUM_PART, :]."""
    NUM_PART: tl.constexpr = 5 if HAS_BIAS else 2
    pid = tl.program_id(0)
    head = tl.program_id(1)
    cols = tl.arange(0, BLOCK_DH)
    pair = cols ^ 1
    cmask = cols < DH
    sign = tl.where(cols % 2 == 0, -1.0, 1.0)
    c = H * DH
    qw = tl.load(QW + cols, mask=cmask, other=0.0).to(tl.float32)
    kw = tl.load(KW + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_q = tl.zeros((BLOCK_DH,), dtype=tl.float32)
    acc_k = tl.zeros((BLOCK_DH,), dtype=tl.float32)
    acc_bq = tl.zeros((BLOCK_DH,), dtype=tl.float32)
    acc_bk = tl.zeros((BLOCK_DH,), dtype=tl.float32)
    acc_bv = tl.zeros((BLOCK_DH,), dtype=tl.float32)
    if HAS_BIAS:
        bq = tl.load(BIAS + head * DH + cols, mask=cmask, other=0.0).to(tl.float32)
        bk = tl.load(BIAS + c + head * DH + cols, mask=cmask, other=0.0).to(tl.float32)
    t0 = pid * ROWS_PER_PROG
    n_tok = tl.minimum(T - t0, ROWS_PER_PROG)
    for start in range(0, n_tok, BLOCK_R):
        token = t0 + start + tl.arange(0, BLOCK_R)
        mask = (token < T)[:, None] & cmask[None, :]
        pos = token % N
        src = ((token * 3 * H + head).to(tl.int64) * DH)[:, None] + cols[None, :]
        row = (token * H + head).to(tl.int64) * DH
        dst = row[:, None] + cols[None, :]
        dst_pair = row[:, None] + pair[None, :]
        cos = tl.load(COS + pos[:, None] * DH + cols[None, :], mask=mask, other=0.0)
        sin_pair = tl.load(SIN + pos[:, None] * DH + pair[None, :], mask=mask, other=0.0)

        x = tl.load(QKV + src, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = tl.where(mask, x + bq[None, :], 0.0)
        dy = tl.load(DQ + dst, mask=mask, other=0.0).to(tl.float32)
        dy_pair = tl.load(DQ + dst_pair, mask=mask, other=0.0).to(tl.float32)
        dx, dw = _norm_rope_bwd(x, dy, dy_pair, qw, cos, sin_pair, sign, DH, eps)
        acc_q += dw
        if HAS_BIAS:
            acc_bq += tl.sum(dx, axis=0)
        tl.store(DQKV + src, dx.to(DQKV.dtype.element_ty), mask=mask)

        x = tl.load(QKV + c + src, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x = tl.where(mask, x + bk[None, :], 0.0)
        dy = tl.load(DK + dst, mask=mask, other=0.0).to(tl.float32)
        dy_pair = tl.load(DK + dst_pair, mask=mask, other=0.0).to(tl.float32)
        dx, dw = _norm_rope_bwd(x, dy, dy_pair, kw, cos, sin_pair, sign, DH, eps)
        acc_k += dw
        if HAS_BIAS:
            acc_bk += tl.sum(dx, axis=0)
        tl.store(DQKV + c + src, dx.to(DQKV.dtype.element_ty), mask=mask)

        dv = tl.load(DV + dst, mask=mask, other=0.0)
        if HAS_BIAS:
            acc_bv += tl.sum(dv.to(tl.float32), axis=0)
        tl.store(DQKV + 2 * c + src, dv.to(DQKV.dtype.element_ty), mask=mask)

    part = PART + ((pid.to(tl.int64) * H + head) * NUM_PART) * DH + cols
    tl.store(part, acc_q, mask=cmask)
    tl.store(part + DH, acc_k, mask=cmask)
    if HAS_BIAS:
        tl.store(part + 2 * DH, acc_bq, mask=cmask)
        tl.store(part + 3 * DH, acc_bk, mask=cmask)
        tl.store(part + 4 * DH, acc_bv, mask=cmask)


@triton.jit
def qk_sum_kernel(
    PART,
    DQW,
    DKW,
    DBIAS,
    P,
    H,
    DH,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_DH: tl.constexpr,
):
    """Second stage of the backward, one launch: the last program sums all P*H partial rows into dq_weight
    and dk_weight; with a bias (grid H + 1), program h < H sums head h's P rows into its q, k, v bias grads."""
    NUM_PART: tl.constexpr = 5 if HAS_BIAS else 2
    g = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_DH)
    cmask = cols < DH
    if g == tl.num_programs(0) - 1:
        _sum_store(PART, DQW, 0, P * H, DH, 0, NUM_PART * DH, cols, cmask, BLOCK_R, BLOCK_DH)
        _sum_store(PART + DH, DKW, 0, P * H, DH, 0, NUM_PART * DH, cols, cmask, BLOCK_R, BLOCK_DH)
    elif HAS_BIAS:
        for j in tl.static_range(3):
            _sum_store(PART + (2 + j) * DH, DBIAS + j * H * DH, g, P, DH, NUM_PART * DH, H * NUM_PART * DH,
                       cols, cmask, BLOCK_R, BLOCK_DH)


# maxnreg: without it ptxas caps the bf16-parameter Dh 80/128 bias variant at 48 registers on sm_90a and spills
# 4 bytes; at 64 the Dh 104 bias variants spill on sm_80 (compile_check). 80 is spill-free for every signature and
# changes no arithmetic (H + 1 programs: occupancy is moot).
SUM_CONFIG = triton.Config({"BLOCK_R": 32}, num_warps=4, num_stages=1, maxnreg=80)


def _check_inputs(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    bias: torch.Tensor | None = None,
) -> int:
    """Validate shapes, dtypes and head dim; return the head dim."""
    if qkv.dim() != 3 or qkv.numel() == 0:
        raise ValueError(f"qkv must be a non-empty (B, N, 3*H*Dh) tensor, got shape {tuple(qkv.shape)}")
    if num_heads <= 0 or qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(f"qkv last dim {qkv.shape[-1]} is not divisible by 3*num_heads (num_heads={num_heads})")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim % 2 != 0 or head_dim > MAX_HEAD_DIM:
        raise ValueError(
            f"head_dim={head_dim} (qkv shape {tuple(qkv.shape)}, num_heads={num_heads}) is unsupported: "
            f"RoPE pairs need an even head dim <= {MAX_HEAD_DIM}"
        )
    n = qkv.shape[1]
    check_shape("q_weight", q_weight, (head_dim,))
    check_shape("k_weight", k_weight, (head_dim,))
    check_shape("cos", cos, (n, head_dim))
    check_shape("sin", sin, (n, head_dim))
    named = {"qkv": qkv, "q_weight": q_weight, "k_weight": k_weight, "cos": cos, "sin": sin}
    if bias is not None:
        check_shape("bias", bias, (qkv.shape[-1],))
        named["bias"] = bias
    for name, t in named.items():
        check_dtype(name, t)
    check_same_device(**named)
    return head_dim


def _check_launch_tables(cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Kernels read fp32 tables; the op entry points convert other float tables (a bf16 model) first."""
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be a float32 table for the launch helper, got {t.dtype}")
        check_contiguous(name, t)


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 contiguous copies of the tables when needed (they are small: N x Dh)."""
    return cos.float().contiguous(), sin.float().contiguous()


def qk_norm_rope_fwd(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launch: q, k (normed + rotated) and v of qkv (+ bias), each (B, N, H, Dh) contiguous in qkv's dtype."""
    head_dim = _check_inputs(qkv, q_weight, k_weight, cos, sin, num_heads, bias)
    for name, t in (("qkv", qkv), ("q_weight", q_weight), ("k_weight", k_weight), ("bias", bias)):
        if t is not None:
            check_contiguous(name, t)
    _check_launch_tables(cos, sin)
    b, n, _ = qkv.shape
    shape = (b, n, num_heads, head_dim)
    q, k, v = (torch.empty(shape, device=qkv.device, dtype=qkv.dtype) for _ in range(3))
    rows = b * n * num_heads
    block_dh = triton.next_power_of_2(head_dim)
    cfg = config or select_config(FWD_CONFIGS, block_dh, "qk_norm_rope")
    with device_guard(qkv):
        qk_norm_rope_fwd_kernel[(triton.cdiv(rows, cfg.kwargs["BLOCK_R"]),)](
            qkv, q_weight if bias is None else bias, q_weight, k_weight, cos, sin, q, k, v, rows, n, num_heads,
            head_dim, eps, HAS_BIAS=bias is not None, BLOCK_DH=block_dh, **launch_options(cfg),
        )
    return q, k, v


def qk_norm_rope_bwd(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Triton backward launch: (dqkv, dq_weight, dk_weight, dbias or None) from the gradients of q, k, v.

    `qkv` is the GEMM output the forward read (without the bias, which is passed as `bias`).
    """
    head_dim = _check_inputs(qkv, q_weight, k_weight, cos, sin, num_heads, bias)
    b, n, _ = qkv.shape
    for name, t in (("dq", dq), ("dk", dk), ("dv", dv)):
        check_shape(name, t, (b, n, num_heads, head_dim))
        check_contiguous(name, t)
    for name, t in (("qkv", qkv), ("bias", bias)):
        if t is not None:
            check_contiguous(name, t)
    _check_launch_tables(cos, sin)
    tokens = b * n
    if tokens * 3 * num_heads >= 2**31:  # the kernel's (token, head) row index is int32 (offsets are int64)
        raise ValueError(f"qkv of shape {tuple(qkv.shape)} has too many rows for one launch; split the batch")
    block_dh = triton.next_power_of_2(head_dim)
    cfg = config or _bwd_config(head_dim)
    has_bias = bias is not None
    part_shape = _bwd_scratch(tokens, num_heads, head_dim, has_bias, cfg)
    num_p = part_shape[0]
    dqkv = torch.empty_like(qkv)
    partials = torch.empty(part_shape, device=qkv.device, dtype=torch.float32)
    dq_weight, dk_weight = torch.empty_like(q_weight), torch.empty_like(k_weight)
    dbias = torch.empty_like(bias) if has_bias else None
    with device_guard(qkv):
        qk_norm_rope_bwd_kernel[(num_p, num_heads)](
            qkv, q_weight if bias is None else bias, q_weight, k_weight, cos, sin, dq, dk, dv, dqkv, partials,
            tokens, n, num_heads, head_dim, eps, HAS_BIAS=has_bias, BLOCK_DH=block_dh, **launch_options(cfg),
        )
        qk_sum_kernel[(num_heads + 1 if has_bias else 1,)](
            partials, dq_weight, dk_weight, dq_weight if dbias is None else dbias, num_p, num_heads, head_dim,
            HAS_BIAS=has_bias, BLOCK_DH=block_dh, **launch_options(SUM_CONFIG),
        )
    return dqkv, dq_weight, dk_weight, dbias


def _bwd_config(head_dim: int) -> triton.Config:
    """The backward config launched for `head_dim`."""
    return select_config(BWD_CONFIGS, triton.next_power_of_2(head_dim), "qk_norm_rope backward")


def _bwd_scratch(tokens: int, num_heads: int, head_dim: int, has_bias: bool, cfg: triton.Config) -> tuple[int, ...]:
    """Shape of the backward's fp32 partial rows: (P, H, 2 or 5, Dh), P = programs per head."""
    return triton.cdiv(tokens, cfg.kwargs["ROWS_PER_PROG"]), num_heads, 5 if has_bias else 2, head_dim


def bwd_workspace(
    qkv_shape: Sequence[int], num_heads: int, has_bias: bool, config: triton.Config | None = None
) -> Workspace:
    """Scratch of one `qk_norm_rope_bwd` for qkv of shape `qkv_shape`: its fp32 partials (as the launch sizes them)
    and the one `qk_sum_kernel` launch that reads them."""
    b, n, c3 = qkv_shape
    head_dim = c3 // (3 * num_heads)
    shape = _bwd_scratch(b * n, num_heads, head_dim, has_bias, config or _bwd_config(head_dim))
    return Workspace(4 * math.prod(shape), 1)


# ---------------------------------------------------------------------------------------------
# torch.library ops (`spec.define`): the CUDA kernel is the launch; the CPU kernel the launch under the
# interpreter, else the eager reference.


def _launch(
    qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_heads: int, eps: float, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qk_norm_rope_fwd(qkv.contiguous(), q_weight.contiguous(), k_weight.contiguous(), *_tables(cos, sin),
                            num_heads, eps, None if bias is None else bias.contiguous())


def _reference(qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias=None):
    q, k, v = reference.qk_norm_rope(qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias)
    return q.contiguous(), k.contiguous(), v.clone(memory_format=torch.contiguous_format)


def _fake(qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias=None):
    b, n, c3 = qkv.shape
    shape = (b, n, num_heads, c3 // (3 * num_heads))
    return tuple(qkv.new_empty(shape) for _ in range(3))


def _launch_bwd(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float,
    bias: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    grads = qk_norm_rope_bwd(dq.contiguous(), dk.contiguous(), dv.contiguous(), qkv.contiguous(), q_weight, k_weight,
                             *_tables(cos, sin), num_heads, eps, None if bias is None else bias.contiguous())
    return [g for g in grads if g is not None]  # an absent bias gradient is left out


def _reference_bwd(*args):
    return [g for g in reference.qk_norm_rope_bwd(*args) if g is not None]


def _fake_bwd(dq, dk, dv, qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias=None):
    grads = [torch.empty_like(qkv), torch.empty_like(q_weight), torch.empty_like(k_weight)]
    return grads + ([] if bias is None else [torch.empty_like(bias)])


def _setup(ctx, inputs, output) -> None:
    qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias = inputs
    ctx.save_for_backward(qkv, q_weight, k_weight, cos, sin, bias)
    ctx.num_heads, ctx.eps = num_heads, eps


def _backward(ctx, dq, dk, dv):
    """Autograd backward through the backward op; the RoPE tables get no gradient."""
    qkv, q_weight, k_weight, cos, sin, bias = ctx.saved_tensors
    grads = [torch.zeros(qkv.shape[:2] + (ctx.num_heads, q_weight.shape[0]), device=qkv.device,
                         dtype=qkv.dtype) if g is None else g.contiguous() for g in (dq, dk, dv)]
    dqkv, dqw, dkw, *dbias = torch.ops.jit_fast.qk_norm_rope_bwd(
        *grads, qkv, q_weight, k_weight, cos, sin, ctx.num_heads, ctx.eps, bias
    )
    return dqkv, dqw, dkw, None, None, None, None, dbias[0] if dbias else None


LIBRARY_OPS = define([
    LibraryOp("qk_norm_rope", _launch, _reference, _fake, _backward, _setup),
    LibraryOp("qk_norm_rope_bwd", _launch_bwd, _reference_bwd, _fake_bwd,
              workspace=lambda a: bwd_workspace(a["qkv"].shape, a["num_heads"], a["bias"] is not None)),
])


def qk_norm_rope(
    qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    num_heads: int, eps: float = 1e-6, bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused op (contract of reference.qk_norm_rope, outputs contiguous): validates, dispatches the custom op."""
    _check_inputs(qkv, q_weight, k_weight, cos, sin, num_heads, bias)
    return torch.ops.jit_fast.qk_norm_rope(qkv, q_weight, k_weight, cos, sin, num_heads, eps, bias)


def linear_qk_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, q_weight: torch.Tensor, k_weight: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, num_heads: int, eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The qkv GEMM without its bias, then the fused op adding it (contract of reference.linear_qk_norm_rope)."""
    return qk_norm_rope(F.linear(x, weight), q_weight, k_weight, cos, sin, num_heads, eps, bias)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile jobs.


def compile_jobs(classes: Sequence[DtypeClass]) -> Iterator[KernelSpec]:
    """Every (kernel, dtype class, head dim, heads, bias, config) the launch helpers select for the JiT presets.

    qkv, q, k, v and their gradients are the act dtype (the qkv GEMM's output), the q/k norm weights and the
    folded bias the parameter dtype (the q weight stands in for an absent bias), the RoPE tables fp32.
    Head counts matter: H = 12 (JiT-B) and 16 compile differently (divisibility by 16), as do Dh 104 and 80.
    """
    for cls in classes:
        a, p = cls.act, cls.param
        for head_dim, heads in ((64, 12), (64, 16), (80, 16), (104, 16), (128, 16)):
            block_dh = triton.next_power_of_2(head_dim)
            ints = {"R": 256 * 288 * heads, "N": 288, "H": heads, "DH": head_dim}
            fwd_sig = {
                "QKV": f"*{a}", "BIAS": f"*{p}", "QW": f"*{p}", "KW": f"*{p}", "COS": "*fp32", "SIN": "*fp32",
                "Q": f"*{a}", "K": f"*{a}", "V": f"*{a}", "R": "i32", "N": "i32", "H": "i32", "DH": "i32",
                "eps": "fp32",
            }
            bwd_sig = {
                "QKV": f"*{a}", "BIAS": f"*{p}", "QW": f"*{p}", "KW": f"*{p}", "COS": "*fp32", "SIN": "*fp32",
                "DQ": f"*{a}", "DK": f"*{a}", "DV": f"*{a}", "DQKV": f"*{a}", "PART": "*fp32", "T": "i32",
                "N": "i32", "H": "i32", "DH": "i32", "eps": "fp32",
            }
            sum_sig = {"PART": "*fp32", "DQW": f"*{p}", "DKW": f"*{p}", "DBIAS": f"*{p}", "P": "i32", "H": "i32",
                       "DH": "i32"}
            for bias in (False, True):
                variant = f"Dh={head_dim} H={heads} bias={bias}"
                constexprs = {"HAS_BIAS": bias, "BLOCK_DH": block_dh}
                for cfg in FWD_CONFIGS[block_dh]:
                    yield KernelSpec("qk_norm_rope_fwd", qk_norm_rope_fwd_kernel, fwd_sig, constexprs, cfg, ints,
                                     variant, cls.name, bias)
                if not cls.backward:
                    continue
                for cfg in BWD_CONFIGS[block_dh]:
                    yield KernelSpec("qk_norm_rope_bwd", qk_norm_rope_bwd_kernel, bwd_sig, constexprs, cfg,
                                     dict(ints, T=256 * 288), variant, cls.name, bias)
                yield KernelSpec("qk_sum", qk_sum_kernel, sum_sig, constexprs, SUM_CONFIG,
                                 {"P": 288, "H": heads, "DH": head_dim}, variant, cls.name, bias)


# ---------------------------------------------------------------------------------------------
# Cases (selfcheck, benchmarks.ops): qkv in the mode's autocast dtype, fp32 norm weights, bias and RoPE tables.


def _rope(gen: torch.Generator, n: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of random angles, each repeated for an interleaved pair (as the model's tables)."""
    ang = (3 * torch.rand(n, head_dim // 2, generator=gen)).repeat_interleave(2, dim=-1)
    return ang.cos(), ang.sin()


def _case(b: int, n: int, heads: int, head_dim: int, bias: bool, kind: str = "numerics") -> OpCase:
    def make(device: torch.device | str, mode: str, seed: int) -> CaseData:
        gen = torch.Generator().manual_seed(seed)
        c = heads * head_dim
        cos, sin = _rope(gen, n, head_dim)
        t = {"qkv": randn(gen, b, n, 3 * c).to(MODE_DTYPES[mode]),
             "q_weight": randn(gen, head_dim, scale=0.2, shift=1.0),
             "k_weight": randn(gen, head_dim, scale=0.2, shift=1.0), "cos": cos, "sin": sin}
        if bias:
            t["bias"] = randn(gen, 3 * c, scale=0.5)
        up = [randn(gen, b, n, heads, head_dim).to(device) for _ in range(3)]

        # the reference keeps qkv's dtype: its bf16 / fp16 run is the eager path, its float64 run the ground truth
        def call(table, v, _out):
            return table.qk_norm_rope(v["qkv"], v["q_weight"], v["k_weight"], v["cos"], v["sin"], heads, EPS,
                                      v.get("bias"))

        grads = tuple(k for k in t if k not in ("cos", "sin"))
        return CaseData({k: v.to(device) for k, v in t.items()}, grads, ("q", "k", "v"), up, call)

    return OpCase("qk_norm_rope", f"B={b} N={n} H={heads} Dh={head_dim}{' bias' if bias else ''}", make, kind)


def _cases(sizes) -> list[OpCase]:
    b, n = sizes.qk_batch, sizes.tokens
    heads, head_dim = sizes.heads[-1]
    return [_case(b, n, h, dh, bias) for h, dh in sizes.heads for bias in (False, True)] + [
        _case(b, n, heads, head_dim, True, kind="determinism")]


SPEC = OpSpec(
    name="qk_norm_rope",
    entries={"qk_norm_rope": qk_norm_rope, "linear_qk_norm_rope": linear_qk_norm_rope},
    library_ops=LIBRARY_OPS,
    compile_jobs=compile_jobs,
    cases=_cases,
)
