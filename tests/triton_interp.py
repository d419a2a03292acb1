"""Triton interpreter helpers for the CPU tests: GPU-faithful bf16 rounding, counting kernel launches.

Triton's interpreter converts fp32 -> bf16 by truncation (and its optional RTNE path mishandles a
mantissa carry), whereas the compiled kernels use `cvt.rn.bf16.f32` (round to nearest even; checked
in the PTX by `jit_kernels.compile_check`). `use_gpu_bf16_rounding()` makes the interpreter round like the GPU.
fp32 -> fp16 needs no patch: the interpreter converts it with numpy, which rounds to nearest even like
`cvt.rn.f16.f32`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from triton.runtime.jit import KernelInterface

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


@contextlib.contextmanager
def count_launches() -> Iterator[Counter]:
    """Count `kernel[grid](...)` launches by kernel name while the context is open (the kernels still run)."""
    counts: Counter = Counter()
    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        counts[kernel.fn.__name__] += 1
        return original(kernel, grid)

    KernelInterface.__getitem__ = getitem
    try:
        yield counts
    finally:
        KernelInterface.__getitem__ = original


def run_compiled(module: str, call: str) -> None:
    """Run `module.call` in a subprocess without TRITON_INTERPRET (compiled kernels on the GPU); fail on error.

    The bitwise-determinism tests need this: the interpreter runs programs one after another in a fixed
    order, so there run-to-run reproducibility holds whatever the kernels do."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join((str(root), str(root / "tests"), env.get("PYTHONPATH", "")))
    res = subprocess.run([sys.executable, "-c", f"import {module} as t; t.{call}"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
