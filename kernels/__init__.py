"""Fused JiT block ops: eager references and Triton kernels behind one op table.

`kernels` imports nothing from `jit_fast`; the model asks `get_ops(name)` for the table
of functions that implement the op boundaries of a JiT block.
"""

from __future__ import annotations

from types import SimpleNamespace

from kernels import reference

KERNEL_BACKENDS = ("torch", "triton")


def get_ops(name: str) -> SimpleNamespace:
    """Return the op table for backend `name` ("torch" = eager reference, "triton" = fused)."""
    if name == "torch":
        return SimpleNamespace(
            rmsnorm_modulate=reference.rmsnorm_modulate,
            residual_rmsnorm_modulate=reference.residual_rmsnorm_modulate,
            qk_norm_rope=reference.qk_norm_rope,
            linear_qk_norm_rope=reference.linear_qk_norm_rope,
            swiglu=reference.swiglu,
            linear_swiglu=reference.linear_swiglu,
            branch_linear=reference.branch_linear,
        )
    if name == "triton":
        from kernels.ops import triton_ops

        return triton_ops()
    raise ValueError(f"unknown kernels backend {name!r}; choose one of {KERNEL_BACKENDS}")
