"""The acceptance rule of the fused kernels' numerics, shared by the CPU tests and the on-device self check.

A kernel result is compared with a float64 reference: in fp32 runs within 1e-5 (norm-wise and element-wise), in
bf16 and fp16 runs within a small multiple of the eager path's own error in the same dtypes against the same
reference (a fused bf16 or fp16 kernel must be no less accurate than eager bf16 or fp16). Shipped (not under tests/)
because `jit_kernels.selfcheck` uses it.
"""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||actual - expected||_2 / ||expected||_2, computed in float64."""
    expected = expected.double()
    diff = (actual.double() - expected).norm().item()
    scale = expected.norm().item()
    return diff / scale if scale > 0 else diff


FP32_RTOL = 1e-5
AUTOCAST_RATIO = 1.25  # bf16 and fp16 runs
FP32_ELEMENT_RTOL = 1e-5
AUTOCAST_ELEMENT_RATIO = 2.0


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Element-wise max |actual - expected|, computed in float64 (0 for empty tensors)."""
    diff = (actual.double() - expected.double()).abs()
    return diff.max().item() if diff.numel() else 0.0


def error_bound(eager: torch.Tensor | None, expected: torch.Tensor) -> float:
    """Acceptance bound for one tensor: 1e-5 in fp32 runs; in bf16 and fp16 runs 1.25x the eager path's own
    error against float64, floored at the fp32 bound (fp32-stored results of a bf16 run, e.g. weight
    gradients or the fp32 residual stream, sit near fp32 rounding where a 1.25x ratio is noise)."""
    if eager is None:
        return FP32_RTOL
    return max(AUTOCAST_RATIO * rel_err(eager, expected), FP32_RTOL)


def element_bound(eager: torch.Tensor | None, expected: torch.Tensor) -> float:
    """Element-wise acceptance bound on max |error|: 1e-5 x max |expected| in fp32 runs; in bf16 and fp16 runs 2x
    the eager path's own max |error| against float64, floored at the fp32 bound (as in `error_bound`).

    fp32: 1e-5 x max |expected| is ~170 fp32 ulps of the largest element, far above the rounding of any
    summation order a CPU BLAS or GPU may pick at these lengths (measured worst: 0.12 of the bound), yet a
    wrong element is caught even where the norm-wise rule would average it away. bf16: the factor is 2, not
    the norm-wise 1.25, because a maximum over many elements is a noisier statistic than a norm; single
    kernels measure at most 1.32x the eager max |error|, whole-model gradients (tests/test_kernels_model.py,
    errors propagated through several layers) up to 1.51x. fp16 keeps both factors: every single-kernel fp16
    case of the tests (production-scale shapes included) measures at most 1.00x norm-wise and 1.17x element-wise,
    so the 1.25x the fp16 issue asks holds element-wise for single kernels too; a shared factor keeps one rule for
    both dtypes (whole-model fp16 gradients: see test_kernels_model.test_model_fp16_through_triton_kernels)."""
    floor = FP32_ELEMENT_RTOL * expected.double().abs().max().item() if expected.numel() else 0.0
    if eager is None:
        return floor
    return max(AUTOCAST_ELEMENT_RATIO * max_abs_err(eager, expected), floor)


def assert_within_rule(name: str, actual: torch.Tensor, expected: torch.Tensor, eager: torch.Tensor | None) -> float:
    """Assert the kernel result `actual` meets `error_bound` (norm-wise) and `element_bound` (max |error|, so a
    few wrong elements cannot hide under the norm-wise ratio) against the float64 `expected`; return its error."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if eager is not None and actual.dtype != eager.dtype:
        raise AssertionError(f"{name}: dtype {actual.dtype} differs from the eager path's {eager.dtype}")
    err = rel_err(actual, expected)
    bound = error_bound(eager, expected)
    if not err <= bound:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds bound {bound:.3e}")
    worst = max_abs_err(actual, expected)
    limit = element_bound(eager, expected)
    if not worst <= limit:
        raise AssertionError(f"{name}: max |error| {worst:.3e} exceeds element-wise bound {limit:.3e}")
    return err
