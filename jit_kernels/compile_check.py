"""Ahead-of-time compile of every fused kernel signature the launch helpers select x every config, for every target.

    python -m jit_kernels.compile_check [--arch 90 80 89 86 75] [--kernel NAME] [--dtype-class NAME] [--sample]

Targets (`TARGETS`): sm_90a (H100), sm_80 (A100), sm_89 (RTX 40, L4), sm_86 (RTX 30, A10), sm_75 (T4, RTX 20),
each with the precisions it runs (sm_75 has no bf16: fp32 and fp16 only). Older GPUs are no target
(`UNSUPPORTED`): `jit_kernels.device_support` makes the model run the torch ops there.
Signatures: every dtype class of `DTYPE_CLASSES` (fp32; bf16 or fp16 autocast over fp32 parameters;
FSDP2 bf16 or fp16 block parameters) x every bias and dropout variant (dropout: training classes only) x every
size class
of the JiT widths, head dims and head counts, as each op's `OpSpec.compile_jobs` derives them from its launch
helper. Jobs that compile to the same binary (same kernel, argument types, divisibility hints, constexprs
and options, e.g. D=768 and D=1024) are compiled once per target; the summary counts them per signature class.

Each job goes through `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` (Triton's
own pipeline down to cubin with the bundled ptxas), then the PTX is re-assembled with `ptxas -v` to
read registers per thread and spill bytes (a loaded kernel would report the same as `n_regs` /
`n_spills`, which need a device). Shared memory comes from the compiled metadata. The table also
lists an occupancy estimate and checks that every fp32 -> bf16 / fp16 conversion rounds to nearest
(`cvt.rn`). Exit status is 1 on any compile error, spill, shared-memory overflow or non-rn conversion.
Must run compiled, not interpreted: with TRITON_INTERPRET set, the process re-executes itself without it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from jit_kernels.spec import DTYPE_CLASSES, DtypeClass, KernelSpec

PRECISIONS = ("fp32", "bf16", "fp16")
# Compile targets (compute capability as Triton's GPUTarget takes it) and the precisions each GPU runs.
TARGETS: dict[int, tuple[str, ...]] = {90: PRECISIONS, 80: PRECISIONS, 89: PRECISIONS, 86: PRECISIONS,
                                       75: ("fp32", "fp16")}
# Why GPUs older than the oldest target get no fused kernels (the model falls back to the torch ops there).
UNSUPPORTED = "the fused kernels are built and checked for sm_75 and newer (PyTorch's CUDA 13 wheels start there too)"
# Per-SM limits (CUDA occupancy calculator data for compute capability 7.5, 8.0, 8.6, 8.9 and 9.0); smem_reserved
# is the shared memory the driver reserves per block (none before Ampere).
SM_LIMITS = {
    75: {"regs": 65536, "warps": 32, "blocks": 16, "smem_sm": 65536, "smem_block": 65536, "smem_reserved": 0},
    80: {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 167936, "smem_block": 166912, "smem_reserved": 1024},
    86: {"regs": 65536, "warps": 48, "blocks": 16, "smem_sm": 102400, "smem_block": 101376, "smem_reserved": 1024},
    89: {"regs": 65536, "warps": 48, "blocks": 24, "smem_sm": 102400, "smem_block": 101376, "smem_reserved": 1024},
    90: {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 233472, "smem_block": 232448, "smem_reserved": 1024},
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CVT_NARROW = re.compile(r"cvt\.(r\w+)\.(?:bf16|f16)(?:x2)?\.f32")

# Integer arguments that scale with the batch or the token count (any value at run time), and the dropout site id
# (one per block, `do_not_specialize`): their divisibility is not part of a signature class. Widths, head dims,
# head counts and strides are (they are fixed per model).
BATCH_ARGS = frozenset({"N", "M", "R", "T", "P", "SITE"})
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")
TRITON_DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.int64": "i64"}


@dataclass
class Result:
    """One row of the report."""

    kernel: str
    variant: str
    config: str
    arch: str
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    shared: int = -1
    occupancy: float = 0.0
    cvt: str = "-"
    error: str = ""
    classes: tuple[str, ...] = ()
    biases: tuple[bool | None, ...] = ()
    shared_by: int = 1

    @property
    def ok(self) -> bool:
        return (
            not self.error
            and self.spill_stores == 0
            and self.spill_loads == 0
            and self.cvt in ("rn", "-")
        )


def occupancy(arch: int, regs: int, num_warps: int, shared: int) -> float:
    """Fraction of the SM's warp slots a kernel can fill, limited by registers, shared memory and blocks."""
    lim = SM_LIMITS[arch]
    per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks = min(lim["blocks"], lim["warps"] // num_warps, (lim["regs"] // per_warp) // num_warps)
    if shared > 0:
        blocks = min(blocks, lim["smem_sm"] // (shared + lim["smem_reserved"]))
    return blocks * num_warps / lim["warps"]


# ------------------------------------------------------------------------------------------------
# The compile jobs: per dtype class, every signature the launch helpers produce, declared by each op's
# `OpSpec.compile_jobs` (tests/test_kernels_compile_check.py checks every launch of the model is among them), and
# those of the shared row sum.


CLASS_PRECISION = {c.name: c.precision for c in DTYPE_CLASSES}


def _sum_ints(c: int, stride_g: int, stride_r: int, stride_j: int) -> dict[str, int]:
    """Integer arguments of one `sum_rows` launch (their divisibility by 16 selects the compiled variant)."""
    return {"C": c, "stride_g": stride_g, "stride_r": stride_r, "stride_j": stride_j}


def sum_rows_specs(classes: Sequence[DtypeClass] = DTYPE_CLASSES) -> Iterator[KernelSpec]:
    """Compile jobs for every row-sum launch of the backward passes, per dtype class, as `sum_rows` pads them.

    rmsnorm_modulate stage 2 (dshift, dscale in the act dtype, fp32 dweight rows, dgate, fp32 dbias rows: 3, 4
    or 5 outputs), stage 3 (dweight, dbias in the parameter dtype; the final layer's root weight), SwiGLU's
    dbias (C = 2h: divisible by 16 for JiT-B and padded widths, not for unpadded L/H/G). Unused output slots
    are padded with output 0, so their pointer types are output 0's.
    """
    from jit_kernels import _common

    for cls in classes:
        if not cls.backward:
            continue
        a, p = cls.act, cls.param
        d, h2 = 768, 2 * 2730  # stage 2/3 widths are D (all JiT widths are multiples of 16), SwiGLU's 2h may not be
        jobs = [
            ("stage 2 plain", False, (a, a, "fp32"), _sum_ints(d, 9 * 3 * d, 3 * d, d)),
            ("stage 2 residual", False, (a, a, "fp32", a), _sum_ints(d, 9 * 4 * d, 4 * d, d)),
            ("stage 2 residual", True, (a, a, "fp32", a, "fp32"), _sum_ints(d, 9 * 5 * d, 5 * d, d)),
            ("stage 3", False, (p,), _sum_ints(d, 0, d, 2 * d)),
            ("stage 3", True, (p, p), _sum_ints(d, 0, d, 2 * d)),
            ("stage 3 final layer", False, (cls.root_param,), _sum_ints(d, 0, d, 2 * d)),
            ("swiglu dbias", True, (p,), _sum_ints(4096, 0, 4096, 4096)),
            ("swiglu dbias", True, (p,), _sum_ints(h2, 0, h2, h2)),
        ]
        for what, bias, outs, ints in jobs:
            ptrs = {f"OUT{j}": f"*{outs[j] if j < len(outs) else outs[0]}" for j in range(_common.MAX_SUM_OUTPUTS)}
            yield KernelSpec(
                name="sum_rows",
                fn=_common.sum_rows_kernel,
                signature={
                    "IN": "*fp32", **ptrs, "R": "i32", "C": "i32", "stride_g": "i32", "stride_r": "i32",
                    "stride_j": "i32",
                },
                constexprs={"NUM_OUT": len(outs)},
                config=_common.SUM_ROWS_CONFIG,
                int_args=ints,
                label=f"{what} C={ints['C']} outputs " + ",".join(outs),
                dtype_class=cls.name,
                bias=bias,
            )


def all_specs(dtype_classes: Iterable[str] | None = None) -> Iterator[KernelSpec]:
    """Every compile job of every registered fused op (`OpSpec.compile_jobs`) and of the shared row sum, optionally
    of some dtype classes only (kernel modules are imported here, not at import: kernels must not be built
    interpreted)."""
    from jit_kernels.table import op_specs

    wanted = None if dtype_classes is None else set(dtype_classes)
    classes = [c for c in DTYPE_CLASSES if wanted is None or c.name in wanted]
    for spec in op_specs():
        yield from spec.compile_jobs(classes)
    yield from sum_rows_specs(classes)


def _kernel_name(fn) -> str:
    """Python name of a @triton.jit function (compiled or interpreted)."""
    return getattr(fn, "fn", fn).__name__


def _int_flag(name: str, value: int) -> str:
    """Triton's specialization of an integer argument: "1", "D" (divisible by 16) or "" ("*" for batch-sized args)."""
    if name in BATCH_ARGS:
        return "*"
    return "1" if value == 1 else ("D" if value % 16 == 0 else "")


def _key(kernel: str, args: dict[str, tuple[str, str]], constexprs: dict, options: dict) -> tuple:
    """Hashable signature shared by `spec_key` and `launch_key`."""
    return (kernel, tuple(sorted(args.items())), tuple(sorted(constexprs.items())),
            tuple((k, options.get(k)) for k in LAUNCH_OPTIONS))


def spec_key(spec) -> tuple:
    """Signature of a compile job: kernel, argument types and specializations, constexprs, launch options."""
    args = {}
    for name, ty in spec.signature.items():
        if ty.startswith("*"):
            args[name] = (ty, "D")
        elif ty.startswith("i"):
            args[name] = (ty, _int_flag(name, spec.int_args.get(name, 1)))
        else:
            args[name] = (ty, "")
    return _key(_kernel_name(spec.fn), args, {**spec.constexprs, **spec.config.kwargs}, _compile_options(spec.config))


def launch_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """Signature of one `kernel[grid](*args, **kwargs)` launch, comparable with `spec_key` (tensors may be fake:
    pointers are taken to be 16-byte aligned, as every buffer the launch helpers allocate or accept is)."""
    import inspect

    import torch

    fn = getattr(kernel, "fn", kernel)
    params = inspect.signature(fn).parameters
    bound = dict(zip(kernel.arg_names[: len(args)], args, strict=True))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    constexprs, types = {}, {}
    for name, value in bound.items():
        if "constexpr" in str(params[name].annotation):
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            types[name] = ("*" + TRITON_DTYPES[str(value.dtype)], "D")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{fn.__name__}: unexpected argument {name}={value!r}")
        elif isinstance(value, int):
            types[name] = ("i32" if -(2**31) <= value < 2**31 else "i64", _int_flag(name, value))
        else:
            types[name] = ("fp32", "")
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    return _key(fn.__name__, types, constexprs, options)


def unique_jobs(specs: Iterable) -> list[list]:
    """Group specs that compile to one binary (equal `spec_key`); each group is compiled once."""
    groups: dict[tuple, list] = {}
    for spec in specs:
        groups.setdefault(spec_key(spec), []).append(spec)
    return list(groups.values())


def sample_jobs(groups: list[list]) -> list[list]:
    """A representative subset: per kernel and dtype class, the first job (a launched default config)."""
    seen, out = set(), []
    for group in groups:
        spec = group[0]
        tag = (spec.name, spec.dtype_class)
        if tag not in seen:
            seen.add(tag)
            out.append(group)
    return out


def _attrs(spec) -> dict:
    """Divisibility hints as Triton's launcher would derive them: 16-byte aligned pointers, ints % 16 == 0."""
    attrs = {}
    names = spec.fn.arg_names
    for name, ty in spec.signature.items():
        idx = (names.index(name),)
        if ty.startswith("*"):
            attrs[idx] = [["tt.divisibility", 16]]
        elif ty.startswith("i") and spec.int_args.get(name, 1) % 16 == 0:
            attrs[idx] = [["tt.divisibility", 16]]
    return attrs


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers/thread, spill store bytes, spill load bytes) from `ptxas -v` on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               src, "-o", src + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas output:\n{log}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))


def _compile_options(cfg, arch: int | None = None) -> dict[str, int]:
    """triton.compile options of a launch config on target `arch` (None: the config's own; maxnreg becomes the PTX
    .maxnreg directive), with the per-target overrides the launch helpers apply (`_common.arch_override`)."""
    from jit_kernels._common import arch_options

    return arch_options(cfg, arch)


def compile_one(spec, arch: int, group: list | None = None) -> Result:
    """Compile one spec for one arch and measure it (`group`: all specs sharing its binary, for the report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = spec.config
    options = _compile_options(cfg, arch)
    config = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w={cfg.num_warps} s={cfg.num_stages}"
    config += f" r<={options['maxnreg']}" if "maxnreg" in options else ""
    group = group or [spec]
    variant = spec.label + (f" (+{len(group) - 1} same binary)" if len(group) > 1 else "")
    res = Result(spec.name, variant, config, f"sm_{arch}{'a' if arch >= 90 else ''}",
                 classes=tuple(dict.fromkeys(s.dtype_class for s in group)),
                 biases=tuple(dict.fromkeys(s.bias for s in group)), shared_by=len(group))
    constexprs = {**spec.constexprs, **cfg.kwargs}
    signature = dict(spec.signature)
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in spec.fn.arg_names}
    try:
        src = ASTSource(spec.fn, signature, constexprs=constexprs, attrs=_attrs(spec))
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        res.regs, res.spill_stores, res.spill_loads = _ptxas_usage(compiled.asm["ptx"], arch)
        res.shared = compiled.metadata.shared
        res.occupancy = occupancy(arch, res.regs, cfg.num_warps, res.shared)
        modes = set(_CVT_NARROW.findall(compiled.asm["ptx"]))
        res.cvt = "-" if not modes else ("rn" if modes == {"rn"} else ",".join(sorted(modes)))
        if res.shared > SM_LIMITS[arch]["smem_block"]:
            res.error = f"shared memory {res.shared} B exceeds the per-block limit"
    except Exception as exc:  # report every failure in the table, fail at the end
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return res


def format_table(results: list[Result]) -> str:
    """Plain-text table of all results."""
    head = ("kernel", "class", "variant", "config", "arch", "regs", "spill st/ld", "smem B", "occupancy", "cvt",
            "status")
    rows = [head]
    for r in results:
        status = "ok" if r.ok else r.error or ("SPILL" if r.spill_stores or r.spill_loads else "NON-RN CVT")
        rows.append((
            r.kernel, ",".join(r.classes), r.variant, r.config, r.arch, str(r.regs),
            f"{r.spill_stores}/{r.spill_loads}", str(r.shared), f"{r.occupancy:.0%}", r.cvt, status,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def class_summary(results: list[Result]) -> str:
    """Compiles per kernel and signature class (dtype class; bias / no-bias), with spills and shared memory.

    A binary shared by several classes counts once in each of them; "compiles" counts it once.
    """
    names = [c.name for c in DTYPE_CLASSES]
    head = ("kernel", *names, "bias", "no-bias", "compiles", "max regs", "spilled B", "max smem B")
    rows = [head]
    kernels = list(dict.fromkeys(r.kernel for r in results))
    for kernel in [*kernels, "total"]:
        rs = [r for r in results if kernel in (r.kernel, "total")]
        rows.append((
            kernel,
            *(str(sum(name in r.classes for r in rs)) for name in names),
            str(sum(True in r.biases for r in rs)),
            str(sum(False in r.biases for r in rs)),
            str(len(rs)),
            str(max((r.regs for r in rs), default=0)),
            str(sum(max(r.spill_stores, 0) + max(r.spill_loads, 0) for r in rs)),
            str(max((r.shared for r in rs), default=0)),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    return "\n".join(lines)


def target_summary(results: list[Result]) -> str:
    """Compiles per target with their precisions, failures, spills, registers and worst occupancy estimate."""
    head = ("target", "precisions", "compiles", "ok", "failed", "max regs", "spilled B", "max smem B", "min occupancy")
    rows = [head]
    for arch in dict.fromkeys(r.arch for r in results):
        rs = [r for r in results if r.arch == arch]
        precisions = dict.fromkeys(CLASS_PRECISION[c] for r in rs for c in r.classes)
        rows.append((
            arch, ",".join(precisions), str(len(rs)), str(sum(r.ok for r in rs)), str(sum(not r.ok for r in rs)),
            str(max(r.regs for r in rs)), str(sum(max(r.spill_stores, 0) + max(r.spill_loads, 0) for r in rs)),
            str(max(r.shared for r in rs)), f"{min(r.occupancy for r in rs):.0%}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + f"\nno target: {UNSUPPORTED}"


def on_target(group: list, arch: int) -> list:
    """The specs of a binary's group whose precision target `arch` runs (none: not compiled for it)."""
    return [s for s in group if CLASS_PRECISION[s.dtype_class] in TARGETS[arch]]


def main(argv: list[str] | None = None) -> int:
    """Compile everything, print the table and a summary; return the exit status."""
    args_list = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "jit_kernels.compile_check", *args_list], env=env).returncode
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), choices=sorted(TARGETS))
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this string")
    parser.add_argument("--dtype-class", nargs="+", default=None, help="only these dtype classes")
    parser.add_argument("--sample", action="store_true",
                        help="representative subset: one default-config job per kernel and dtype class")
    args = parser.parse_args(args_list)
    specs = [s for s in all_specs(args.dtype_class) if not args.kernel or args.kernel in s.name]
    groups = unique_jobs(specs)
    if args.sample:
        groups = sample_jobs(groups)
    jobs = [(sub, arch) for arch in args.arch for group in groups if (sub := on_target(group, arch))]
    results = [compile_one(sub[0], arch, sub) for sub, arch in jobs]
    print(format_table(results))
    print("\nsignature classes\n" + class_summary(results))
    if results:
        print("\ntargets\n" + target_summary(results))
    bad = [r for r in results if not r.ok]
    what = "binaries sampled (one per kernel and class)" if args.sample else "distinct binaries"
    print(f"\n{len(specs)} launch signatures x configs, {len(groups)} {what} on {len(args.arch)} targets")
    print(f"{len(results)} compiles, {len(results) - len(bad)} ok, {len(bad)} failed "
          f"(max regs {max((r.regs for r in results), default=0)}, "
          f"spilled bytes {sum(max(r.spill_stores, 0) + max(r.spill_loads, 0) for r in results)})")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main())
