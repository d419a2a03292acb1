"""Fused SwiGLU on the w12 GEMM output: h = silu(x1) * x2 with x1, x2 = x12.chunk(2, -1).

The backward recomputes the sigmoid from x1 instead of saving it:
    dx1 = dh * x2 * s * (1 + x1 * (1 - s)),  dx2 = dh * x1 * s,  s = sigmoid(x1).
Rows are the flattened leading dims; each program handles BLOCK_M rows x BLOCK_H hidden units.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from kernels import reference
from kernels._common import KernelSpec, check_contiguous, check_dtype, device_guard, launch_options

# One size class: the kernel is elementwise, so the tile only trades registers for fewer programs.
# The first config is launched; the second is a candidate that compile_check also builds.
FWD_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_M": 4, "BLOCK_H": 512}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 8, "BLOCK_H": 512}, num_warps=8, num_stages=1),
]
BWD_CONFIGS: list[triton.Config] = [
    triton.Config({"BLOCK_M": 4, "BLOCK_H": 512}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 8, "BLOCK_H": 512}, num_warps=8, num_stages=1),
]


@triton.jit
def swiglu_fwd_kernel(X12, OUT, M, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """OUT[m, j] = silu(X12[m, j]) * X12[m, H + j] for a BLOCK_M x BLOCK_H tile."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    src = rows[:, None] * (2 * H) + cols[None, :]
    x1 = tl.load(X12 + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X12 + src + H, mask=mask, other=0.0).to(tl.float32)
    out = x1 * tl.sigmoid(x1) * x2
    tl.store(OUT + rows[:, None] * H + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_kernel(X12, DOUT, DX12, M, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """DX12 = (dx1, dx2) for a BLOCK_M x BLOCK_H tile, recomputing sigmoid(x1)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < H)[None, :]
    src = rows[:, None] * (2 * H) + cols[None, :]
    x1 = tl.load(X12 + src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X12 + src + H, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(DOUT + rows[:, None] * H + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x1)
    dx1 = dout * x2 * s * (1.0 + x1 * (1.0 - s))
    dx2 = dout * x1 * s
    tl.store(DX12 + src, dx1.to(DX12.dtype.element_ty), mask=mask)
    tl.store(DX12 + src + H, dx2.to(DX12.dtype.element_ty), mask=mask)


def _check_inputs(x12: torch.Tensor) -> None:
    """x12 must be (..., 2h) with a supported float dtype."""
    if x12.dim() < 1 or x12.shape[-1] % 2 != 0:
        raise ValueError(f"x12 must have an even last dim (x1 | x2 halves), got shape {tuple(x12.shape)}")
    check_dtype("x12", x12)


def swiglu_fwd(x12: torch.Tensor, config: triton.Config | None = None) -> torch.Tensor:
    """Triton launch: silu(x1) * x2, shape (..., h), in x12's dtype."""
    _check_inputs(x12)
    check_contiguous("x12", x12)
    h = x12.shape[-1] // 2
    m = x12.numel() // max(2 * h, 1)
    out = torch.empty(x12.shape[:-1] + (h,), device=x12.device, dtype=x12.dtype)
    cfg = config or FWD_CONFIGS[0]
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]), triton.cdiv(h, cfg.kwargs["BLOCK_H"]))
    with device_guard(x12):
        swiglu_fwd_kernel[grid](x12, out, m, h, **launch_options(cfg))
    return out


def swiglu_bwd(x12: torch.Tensor, dout: torch.Tensor, config: triton.Config | None = None) -> torch.Tensor:
    """Triton backward launch: dx12 (..., 2h) from dout (..., h)."""
    _check_inputs(x12)
    check_contiguous("x12", x12)
    check_contiguous("dout", dout)
    h = x12.shape[-1] // 2
    if tuple(dout.shape) != tuple(x12.shape[:-1]) + (h,):
        raise ValueError(f"dout must have shape {tuple(x12.shape[:-1]) + (h,)}, got {tuple(dout.shape)}")
    m = x12.numel() // max(2 * h, 1)
    dx12 = torch.empty_like(x12)
    cfg = config or BWD_CONFIGS[0]
    if dx12.numel() == 0:
        return dx12
    grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]), triton.cdiv(h, cfg.kwargs["BLOCK_H"]))
    with device_guard(x12):
        swiglu_bwd_kernel[grid](x12, dout, dx12, m, h, **launch_options(cfg))
    return dx12


def swiglu_bwd_reference(x12: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """Eager backward with the contract of `swiglu_bwd` (fp32 math): the CPU implementation."""
    acc = torch.float64 if x12.dtype == torch.float64 else torch.float32
    x1, x2 = x12.to(acc).chunk(2, dim=-1)
    g = dout.to(acc)
    s = torch.sigmoid(x1)
    return torch.cat((g * x2 * s * (1 + x1 * (1 - s)), g * x1 * s), dim=-1).to(x12.dtype)


@torch.library.custom_op("jit_fast::swiglu", mutates_args=())
def _swiglu_op(x12: torch.Tensor) -> torch.Tensor:
    return reference.swiglu(x12)


@_swiglu_op.register_kernel("cuda")
def _swiglu_cuda(x12):
    return swiglu_fwd(x12.contiguous())


@_swiglu_op.register_fake
def _swiglu_fake(x12):
    return x12.new_empty(x12.shape[:-1] + (x12.shape[-1] // 2,))


@torch.library.custom_op("jit_fast::swiglu_bwd", mutates_args=())
def _bwd_op(x12: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    return swiglu_bwd_reference(x12, dout)


@_bwd_op.register_kernel("cuda")
def _bwd_cuda(x12, dout):
    return swiglu_bwd(x12.contiguous(), dout.contiguous())


@_bwd_op.register_fake
def _bwd_fake(x12, dout):
    return torch.empty_like(x12)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward_with(bwd):
    """Autograd backward computing dx12 with `bwd` (custom op or launch helper)."""

    def backward(ctx, dout):
        (x12,) = ctx.saved_tensors
        return bwd(x12, dout.contiguous())

    return backward


_swiglu_op.register_autograd(_backward_with(torch.ops.jit_fast.swiglu_bwd), setup_context=_setup)


class _LauncherFn(torch.autograd.Function):
    """Autograd over the launch helpers directly (no custom op): runs the Triton kernels on any device."""

    @staticmethod
    def forward(x12):
        return swiglu_fwd(x12)

    setup_context = staticmethod(_setup)
    backward = staticmethod(_backward_with(swiglu_bwd))


def swiglu(x12: torch.Tensor) -> torch.Tensor:
    """Fused op (contract of reference.swiglu): validates, then dispatches the custom op."""
    _check_inputs(x12)
    return torch.ops.jit_fast.swiglu(x12)


def swiglu_launcher(x12: torch.Tensor) -> torch.Tensor:
    """Same op through the launch helpers with autograd (Triton kernels on any device, incl. interpreted CPU)."""
    _check_inputs(x12)
    return _LauncherFn.apply(x12.contiguous())


def compile_specs() -> Iterator[KernelSpec]:
    """Both kernels x every config, bf16 activations, JiT-G padded hidden width."""
    ints = {"M": 256 * 288, "H": 4480}
    for cfg in FWD_CONFIGS:
        yield KernelSpec("swiglu_fwd", swiglu_fwd_kernel, {"X12": "*bf16", "OUT": "*bf16", "M": "i32", "H": "i32"},
                         {}, cfg, ints, "h=4480")
    for cfg in BWD_CONFIGS:
        yield KernelSpec("swiglu_bwd", swiglu_bwd_kernel,
                         {"X12": "*bf16", "DOUT": "*bf16", "DX12": "*bf16", "M": "i32", "H": "i32"},
                         {}, cfg, ints, "h=4480")
