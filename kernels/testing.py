"""Helpers for testing the kernels on CPU: GPU-faithful bf16 rounding in the interpreter, error metrics.

Triton's interpreter converts fp32 -> bf16 by truncation (and its optional RTNE path mishandles a
mantissa carry), whereas the compiled kernels use `cvt.rn.bf16.f32` (round to nearest even; checked
in the PTX by `kernels.compile_check`). `use_gpu_bf16_rounding()` makes the interpreter round like the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

_patched = False


def use_gpu_bf16_rounding() -> None:
    """Patch the Triton interpreter's fp32 -> bf16 conversion to round to nearest even (idempotent)."""
    global _patched
    if _patched:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            bits = np.ascontiguousarray(data).view(np.uint32)
            rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            nan = np.isnan(np.ascontiguousarray(data).view(np.float32))
            out = np.where(nan, (bits >> 16) | 0x40, rounded).astype(np.uint16)
            return out.reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    _patched = True


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||actual - expected||_2 / ||expected||_2, computed in float64."""
    expected = expected.double()
    diff = (actual.double() - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > 0 else diff
