"""The op table the model calls, the registry of fused ops it is built from, and which GPUs run them.

`OpTable` is typed: the seven op boundaries of a JiT block plus the capabilities the model reads (never the
backend's name). `get_ops("torch")` is the eager reference; `get_ops("triton")` fills the same fields from the
`SPEC` of every module in `FUSED_OPS`. `select_ops(name, device, precision)` decides the device fallback once,
before the model is built, and says so in one line.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from jit_kernels import reference

if TYPE_CHECKING:
    from jit_kernels.spec import OpSpec

KERNEL_BACKENDS = ("torch", "triton")
# The registry: one line per fused op module (each exports `SPEC`); everything that loops over the ops reads it.
FUSED_OPS = (
    "rmsnorm_modulate",
    "qk_norm_rope",
    "swiglu",
)


@dataclass(frozen=True)
class OpTable:
    """The functions at the op boundaries of a JiT block (contracts in `jit_kernels.reference`) and what they do.

    fused_dropout: the ops draw the blocks' proj dropout themselves (`Dropout` argument), so the model hands them
    its masks' key instead of running nn.Dropout; deferred_bias: `branch_linear` leaves the bias out of the GEMM
    and returns it for the next residual op to add in fp32; activated_conditioning: the blocks receive SiLU(c),
    computed once, instead of each applying it.
    """

    name: str
    rmsnorm_modulate: Callable
    residual_rmsnorm_modulate: Callable
    qk_norm_rope: Callable
    linear_qk_norm_rope: Callable
    swiglu: Callable
    linear_swiglu: Callable
    fused_dropout: bool = False
    deferred_bias: bool = False
    activated_conditioning: bool = False
    branch_linear: Callable | None = None  # the GEMM closing a residual branch; None: the one `deferred_bias` names

    def __post_init__(self) -> None:
        if self.branch_linear is None:
            fn = reference.branch_linear_deferred_bias if self.deferred_bias else reference.branch_linear
            object.__setattr__(self, "branch_linear", fn)


# the entries an op spec fills (branch_linear is a plain GEMM, chosen by `deferred_bias`)
ENTRIES = ("rmsnorm_modulate", "residual_rmsnorm_modulate", "qk_norm_rope", "linear_qk_norm_rope", "swiglu",
           "linear_swiglu")
FUNCTIONS = (*ENTRIES, "branch_linear")


def op_specs() -> tuple[OpSpec, ...]:
    """The `SPEC` of every registered fused op (imports the kernel modules, and with them Triton)."""
    return tuple(importlib.import_module(f"jit_kernels.{name}").SPEC for name in FUSED_OPS)


@functools.cache
def _fused_table() -> OpTable:
    entries = {k: fn for spec in op_specs() for k, fn in spec.entries.items()}
    missing = sorted(set(ENTRIES) - set(entries))
    if missing:
        raise RuntimeError(f"no registered fused op provides {missing} (jit_kernels.table.FUSED_OPS)")
    return OpTable("triton", **entries, fused_dropout=True, deferred_bias=True, activated_conditioning=True)


def get_ops(name: str) -> OpTable:
    """The op table of backend `name` ("torch" = eager reference, "triton" = fused), whatever the device."""
    if name == "torch":
        return OpTable("torch", **{k: getattr(reference, k) for k in ENTRIES})
    if name == "triton":
        return _fused_table()
    raise ValueError(f"unknown kernels backend {name!r}; choose one of {KERNEL_BACKENDS}")


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


def select_ops(name: str, device: torch.device | str | None = None, precision: str = "fp32") -> OpTable:
    """The table a model on `device` running `precision` uses: `get_ops(name)`, except "triton" on a GPU the fused
    kernels do not support in that precision, which gets the torch table and a one-line warning saying why."""
    if name == "triton" and device is not None and torch.device(device).type == "cuda":
        ok, reason = device_support(torch.cuda.get_device_capability(device), precision)
        if not ok:
            warnings.warn(f"kernels=triton falls back to the torch ops: {reason}", stacklevel=2)
            return get_ops("torch")
    return get_ops(name)
