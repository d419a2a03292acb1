"""Op table backed by the fused Triton kernels.

`triton_ops()` is what `get_ops("triton")` returns: torch.library custom ops (`jit_fast::*`) with fake impls and
autograd, so `torch.compile(fullgraph=True)` sees no graph break. They are the only entry to the kernels: the CUDA
kernel of each op (forward and backward) is the Triton launch; the CPU kernel is the Triton launch too under
Triton's interpreter (`TRITON_INTERPRET=1`, checked at call time by `jit_kernels._common.triton_on_cpu`), which is how
the tests and the traffic counter's launch check run the kernels on CPU tensors, and the eager reference otherwise.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from jit_kernels import qk_norm_rope, reference, rmsnorm_modulate, swiglu


def triton_ops() -> SimpleNamespace:
    """Custom-op table with the names and semantics of `jit_kernels.reference`."""
    return SimpleNamespace(
        rmsnorm_modulate=rmsnorm_modulate.rmsnorm_modulate,
        residual_rmsnorm_modulate=rmsnorm_modulate.residual_rmsnorm_modulate,
        qk_norm_rope=qk_norm_rope.qk_norm_rope,
        linear_qk_norm_rope=qk_norm_rope.linear_qk_norm_rope,
        swiglu=swiglu.swiglu,
        linear_swiglu=swiglu.linear_swiglu,
        branch_linear=reference.branch_linear_deferred_bias,
    )


class LaunchHelpers(TorchDispatchMode):
    """Run every `jit_fast` custom op through its CUDA kernel (the Triton launch helpers) whatever the device.

    On fake tensors, with `kernel[grid]` patched to record instead of launch, this shows every launch a GPU run
    makes without a GPU: the compile-coverage test records their signatures, the traffic counter checks its
    per-op workspace model against them. Not a way to run the kernels: real CPU tensors need the interpreter.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "jit_fast":
            return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
