"""Fused JiT block ops: eager references and Triton kernels behind one op table.

`jit_kernels` imports nothing from `jit_fast`; the model asks `get_ops(name)` for the table
of functions that implement the op boundaries of a JiT block, and `device_support` whether
the fused table runs on its GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

from jit_kernels import reference

KERNEL_BACKENDS = ("torch", "triton")


def device_support(capability: tuple[int, int], precision: str = "fp32") -> tuple[bool, str]:
    """(ok, reason): whether the fused kernels run on a GPU of compute `capability` in `precision` (fp32, bf16,
    fp16), judged by the targets `jit_kernels.compile_check` builds and checks; the reason says why not, or how."""
    from jit_kernels.compile_check import TARGETS, UNSUPPORTED

    major, minor = capability
    arch = 10 * major + minor
    name = f"sm_{arch}"
    if arch < min(TARGETS):
        return False, f"{name}: {UNSUPPORTED}"
    runs = TARGETS[max(a for a in TARGETS if a <= arch)]
    if precision not in runs:
        return False, f"{name} has no {precision} (the fused kernels run {' and '.join(runs)} there); use fp16"
    if arch in TARGETS:
        return True, f"{name}: a compile-checked target (jit_kernels.compile_check: 0 spills)"
    checked = ", ".join(f"sm_{a}{'a' if a >= 90 else ''}" for a in sorted(TARGETS))
    return True, f"{name} is not a compile-checked target ({checked}); Triton builds the kernels for it at first launch"


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
        from jit_kernels.ops import triton_ops

        return triton_ops()
    raise ValueError(f"unknown kernels backend {name!r}; choose one of {KERNEL_BACKENDS}")
