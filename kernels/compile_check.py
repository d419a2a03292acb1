"""Ahead-of-time compile of every fused kernel x every config for sm_90a and sm_80, on a machine without a GPU.

    python -m kernels.compile_check [--arch 90 80] [--kernel NAME]

Each job goes through `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` (Triton's
own pipeline down to cubin with the bundled ptxas), then the PTX is re-assembled with `ptxas -v` to
read registers per thread and spill bytes (a loaded kernel would report the same as `n_regs` /
`n_spills`, which need a device). Shared memory comes from the compiled metadata. The table also
lists an occupancy estimate and checks that every fp32 -> bf16 conversion rounds to nearest
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
from collections.abc import Iterator
from dataclasses import dataclass

# Per-SM limits (CUDA occupancy calculator data for compute capability 8.0 and 9.0).
SM_LIMITS = {
    80: {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 167936, "smem_block": 166912},
    90: {"regs": 65536, "warps": 64, "blocks": 32, "smem_sm": 233472, "smem_block": 232448},
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED = 1024  # per-block shared memory the driver reserves

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_CVT_BF16 = re.compile(r"cvt\.(r\w+)\.bf16(?:x2)?\.f32")


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
        blocks = min(blocks, lim["smem_sm"] // (shared + SMEM_RESERVED))
    return blocks * num_warps / lim["warps"]


def all_specs() -> Iterator:
    """Every compile job of every fused op (imported lazily: kernels must not be built interpreted)."""
    from kernels import _common, qk_norm_rope, rmsnorm_modulate, swiglu

    yield from rmsnorm_modulate.compile_specs()
    yield from qk_norm_rope.compile_specs()
    yield from swiglu.compile_specs()
    yield from _common.sum_rows_specs()


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


def _compile_options(cfg) -> dict[str, int]:
    """triton.compile options of a launch config (maxnreg becomes the PTX .maxnreg directive)."""
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg is not None:
        options["maxnreg"] = cfg.maxnreg
    return options


def compile_one(spec, arch: int) -> Result:
    """Compile one spec for one arch and measure it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cfg = spec.config
    config = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f" w={cfg.num_warps} s={cfg.num_stages}"
    config += "" if cfg.maxnreg is None else f" r<={cfg.maxnreg}"
    res = Result(spec.name, spec.label, config, f"sm_{arch}{'a' if arch >= 90 else ''}")
    constexprs = {**spec.constexprs, **cfg.kwargs}
    signature = dict(spec.signature)
    for name in constexprs:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in spec.fn.arg_names}
    try:
        src = ASTSource(spec.fn, signature, constexprs=constexprs, attrs=_attrs(spec))
        compiled = triton.compile(
            src, target=GPUTarget("cuda", arch, 32), options=_compile_options(cfg)
        )
        res.regs, res.spill_stores, res.spill_loads = _ptxas_usage(compiled.asm["ptx"], arch)
        res.shared = compiled.metadata.shared
        res.occupancy = occupancy(arch, res.regs, cfg.num_warps, res.shared)
        modes = set(_CVT_BF16.findall(compiled.asm["ptx"]))
        res.cvt = "-" if not modes else ("rn" if modes == {"rn"} else ",".join(sorted(modes)))
        if res.shared > SM_LIMITS[arch]["smem_block"]:
            res.error = f"shared memory {res.shared} B exceeds the per-block limit"
    except Exception as exc:  # report every failure in the table, fail at the end
        res.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return res


def format_table(results: list[Result]) -> str:
    """Plain-text table of all results."""
    head = ("kernel", "variant", "config", "arch", "regs", "spill st/ld", "smem B", "occupancy", "cvt", "status")
    rows = [head]
    for r in results:
        status = "ok" if r.ok else r.error or ("SPILL" if r.spill_stores or r.spill_loads else "NON-RN CVT")
        rows.append((
            r.kernel, r.variant, r.config, r.arch, str(r.regs), f"{r.spill_stores}/{r.spill_loads}",
            str(r.shared), f"{r.occupancy:.0%}", r.cvt, status,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Compile everything, print the table and a summary; return the exit status."""
    args_list = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "kernels.compile_check", *args_list], env=env).returncode
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SM_LIMITS))
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this string")
    args = parser.parse_args(args_list)
    results = []
    for spec in all_specs():
        if args.kernel and args.kernel not in spec.name:
            continue
        for arch in args.arch:
            results.append(compile_one(spec, arch))
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} compiles, {len(results) - len(bad)} ok, {len(bad)} failed "
          f"(max regs {max((r.regs for r in results), default=0)}, "
          f"spilled bytes {sum(max(r.spill_stores, 0) + max(r.spill_loads, 0) for r in results)})")
    return 1 if bad or not results else 0


if __name__ == "__main__":
    sys.exit(main())
