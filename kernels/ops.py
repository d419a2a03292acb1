"""Op tables backed by the fused Triton kernels.

`triton_ops()` is what `get_ops("triton")` returns: torch.library custom ops (`jit_fast::*`) whose CUDA
kernel is the Triton launch and whose CPU kernel is the eager reference, with fake impls and autograd,
so `torch.compile(fullgraph=True)` sees no graph break. `launcher_ops()` calls the Triton launch
helpers directly under torch.autograd.Function: it runs the kernels on whatever device Triton can use,
including CPU tensors under TRITON_INTERPRET=1, which is how the tests exercise the kernels end to end.
"""

from __future__ import annotations

from types import SimpleNamespace

from kernels import qk_norm_rope, rmsnorm_modulate, swiglu


def triton_ops() -> SimpleNamespace:
    """Custom-op table with the names and semantics of `kernels.reference`."""
    return SimpleNamespace(
        rmsnorm_modulate=rmsnorm_modulate.rmsnorm_modulate,
        residual_rmsnorm_modulate=rmsnorm_modulate.residual_rmsnorm_modulate,
        qk_norm_rope=qk_norm_rope.qk_norm_rope,
        linear_qk_norm_rope=qk_norm_rope.linear_qk_norm_rope,
        swiglu=swiglu.swiglu,
        linear_swiglu=swiglu.linear_swiglu,
        branch_linear=rmsnorm_modulate.branch_linear,
    )


def launcher_ops() -> SimpleNamespace:
    """Same table straight over the Triton launch helpers (no dispatcher), for interpreter runs and benchmarks."""
    return SimpleNamespace(
        rmsnorm_modulate=rmsnorm_modulate.rmsnorm_modulate_launcher,
        residual_rmsnorm_modulate=rmsnorm_modulate.residual_rmsnorm_modulate_launcher,
        qk_norm_rope=qk_norm_rope.qk_norm_rope_launcher,
        linear_qk_norm_rope=qk_norm_rope.linear_qk_norm_rope_launcher,
        swiglu=swiglu.swiglu_launcher,
        linear_swiglu=swiglu.linear_swiglu_launcher,
        branch_linear=rmsnorm_modulate.branch_linear,
    )
