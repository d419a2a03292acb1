"""What one fused op declares: `OpSpec`, the single export of each op module, and the pieces it is made of.

An op module (`rmsnorm_modulate.py`, `qk_norm_rope.py`, `swiglu.py`) ends with one `SPEC = OpSpec(...)`: the
op-table entries it fills, its `torch.library` ops (launch, eager reference, fake, autograd: `define` registers
them), the signatures `compile_check` builds ahead of time, the cases `selfcheck` verifies and `benchmarks.ops`
times, and the scratch each launch allocates. The registry (`jit_kernels.table.FUSED_OPS`) names the modules;
the op table, `compile_check`, `selfcheck`, the traffic counter and the per-op benchmark loop over it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from jit_kernels._common import Workspace, triton_on_cpu

# ------------------------------------------------------------------------------------------------
# Ahead-of-time compile jobs (`jit_kernels.compile_check` builds them for every target).


@dataclass(frozen=True)
class KernelSpec:
    """One ahead-of-time compile job: a kernel, its argument types and constexprs, and one launch config."""

    name: str
    fn: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    config: Any  # triton.Config
    int_args: dict[str, int] = field(default_factory=dict)
    label: str = ""
    dtype_class: str = ""
    bias: bool | None = None
    dropout: bool = False


@dataclass(frozen=True)
class DtypeClass:
    """Tensor dtypes (Triton names) the model hands the fused ops in one way of running it.

    stream: the residual stream x; act: GEMM outputs and adaLN chunks (the autocast dtype); param: block
    parameters (norm weights, folded biases); root_param: the final layer's norm weight (FSDP2 gathers the
    root's parameters in fp32); backward: whether backward kernels run (training) or only forward (sampling).
    """

    name: str
    stream: str
    act: str
    param: str
    root_param: str
    backward: bool = True

    @property
    def precision(self) -> str:
        """The run's precision (`compile_check.TARGETS` lists which ones a GPU runs): its autocast dtype."""
        return self.act


# Every way the model runs the kernels: fp32; bf16 or fp16 autocast over fp32 parameters (training and sampling);
# FSDP2's bf16- or fp16-gathered block parameters under autocast of the same dtype (stream and root stay fp32,
# `distributed.prepare_model`).
DTYPE_CLASSES = (
    DtypeClass("fp32", "fp32", "fp32", "fp32", "fp32"),
    DtypeClass("bf16-act+fp32-param", "fp32", "bf16", "fp32", "fp32"),
    DtypeClass("bf16-param", "fp32", "bf16", "bf16", "fp32"),
    DtypeClass("fp16-act+fp32-param", "fp32", "fp16", "fp32", "fp32"),
    DtypeClass("fp16-param", "fp32", "fp16", "fp16", "fp32"),
)


def dropout_signature(dropout: bool, standin: str) -> dict[str, str]:
    """Signature of the dropout arguments: the int64 seed pointer (or the stand-in tensor the helpers pass without
    dropout), the site id and the fp32 probability and scale."""
    return {"SEED": "*i64" if dropout else f"*{standin}", "SITE": "i32", "drop_p": "fp32", "drop_scale": "fp32"}


# ------------------------------------------------------------------------------------------------
# torch.library ops: the only entry to the kernels.


@dataclass(frozen=True)
class LibraryOp:
    """One `jit_fast::<name>` custom op.

    `launch` is its CUDA kernel (the Triton launch) and its annotations are the op's schema; `reference` takes the
    same arguments and is the CPU kernel outside Triton's interpreter (under `TRITON_INTERPRET=1` the CPU kernel is
    the launch too: how tests and the traffic check run the real kernels on CPU tensors); `fake` gives the outputs'
    shapes and dtypes (torch.compile, fake tensors); `backward` with `setup_context` is its autograd (None for a
    backward op); `workspace(args)` the scratch its launch allocates beyond inputs and outputs (args by name).
    """

    name: str
    launch: Callable
    reference: Callable
    fake: Callable
    backward: Callable | None = None
    setup_context: Callable | None = None
    workspace: Callable[[dict], Workspace] | None = None

    @property
    def qualname(self) -> str:
        """The op's name in the dispatcher (`torch.ops.jit_fast.<name>`)."""
        return f"jit_fast::{self.name}"


def _cpu_kernel(op: LibraryOp, *args, **kwargs):
    """CPU tensors: the Triton launch under the interpreter, the eager reference otherwise (checked per call)."""
    return (op.launch if triton_on_cpu() else op.reference)(*args, **kwargs)


def define(ops: Iterable[LibraryOp]) -> tuple[LibraryOp, ...]:
    """Register each op with torch.library (CUDA and CPU kernels, fake, autograd); returns them for the spec."""
    ops = tuple(ops)
    for op in ops:
        lib_op = torch.library.custom_op(op.qualname, op.launch, mutates_args=(), device_types="cuda")
        lib_op.register_kernel("cpu", functools.partial(_cpu_kernel, op))
        lib_op.register_fake(op.fake)
        if op.backward is not None:
            lib_op.register_autograd(op.backward, setup_context=op.setup_context)
    return ops


# ------------------------------------------------------------------------------------------------
# Cases: one op-table call on generated inputs, shared by `selfcheck` (vs float64) and `benchmarks.ops` (timed).


@dataclass(frozen=True)
class CaseData:
    """Inputs of one case and how to call an op table on them.

    `call(table, leaves, out_dtype)` returns the outputs as a tuple; `out_dtype` is the run's autocast dtype where
    the op takes one (None: fp32 or float64, the op's default). `grads` names the inputs that get gradients,
    `outs` the outputs, `upstream` the gradients fed to them."""

    inputs: dict[str, torch.Tensor]
    grads: tuple[str, ...]
    outs: tuple[str, ...]
    upstream: list[torch.Tensor]
    call: Callable[[Any, dict[str, torch.Tensor], torch.dtype | None], tuple]


CASE_KINDS = ("numerics", "determinism", "dropout")


@dataclass(frozen=True)
class OpCase:
    """A named case of an op-table entry: `make(device, mode, seed)` builds its `CaseData` (mode: fp32/bf16/fp16).

    kind: "numerics" (checked against float64 in every mode the device runs), "determinism" (two backward runs
    bitwise equal, in the device's low precision), "dropout" (numerics with the fused dropout, low precision)."""

    entry: str
    label: str
    make: Callable[[torch.device | str, str, int], CaseData]
    kind: str = "numerics"


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    """shift + scale * N(0, 1) drawn on the CPU generator (same draws on every device)."""
    return shift + scale * torch.randn(*shape, generator=gen)


EPS = 1e-6
MODE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------------------
# The declaration.


@dataclass(frozen=True)
class OpSpec:
    """Everything one fused op declares; every consumer loops over the registry of these.

    entries: op-table field -> fused function (the same contract as `jit_kernels.reference.<field>`);
    library_ops: its `jit_fast::` ops (`define`d at import); compile_jobs(classes): every signature its launches
    select for those dtype classes; cases(sizes): its numerics, determinism and dropout cases at `selfcheck.Sizes`
    (production on a GPU, tiny in tests).
    """

    name: str
    entries: Mapping[str, Callable]
    library_ops: tuple[LibraryOp, ...]
    compile_jobs: Callable[[Sequence[DtypeClass]], Iterable[KernelSpec]]
    cases: Callable[[Any], list[OpCase]]

    def workspace(self, qualname: str, args: dict) -> Workspace | None:
        """Scratch of one launch of library op `qualname` (args by schema name), None if it has none or is not ours."""
        for op in self.library_ops:
            if op.qualname == qualname and op.workspace is not None:
                return op.workspace(args)
        return None


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
