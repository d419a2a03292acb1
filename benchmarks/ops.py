"""Per-op benchmark over the registry: every case each fused op declares, eager vs compiled vs fused.

    python -m benchmarks.ops [--model JiT-B/16] [--batch 8] [--img-size 256] [--mode bf16] [--json PATH]

On CUDA it times, per case and path (`eager`: the reference op; `compiled`: `torch.compile` of it; `fused`: the
custom op), forward and forward+backward with `triton.testing.do_bench` (median ms) and the peak memory each
allocates beyond its inputs, beside the fused op's counted I/O bytes (`jit_fast.perf.traffic.count_call`) and the
GB/s they imply. Without CUDA nothing is timed: it runs each case's numerics through the Triton interpreter at
small shapes instead (the fused kernels against float64, the rule of the tests) and says so. The cases are the
ones `jit_kernels.selfcheck` verifies (`OpSpec.cases`), built at the block shapes of `--model`: a new op is
benchmarked by declaring its spec, nothing here changes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

from jit_fast.configs import model_config
from jit_kernels import OpTable, get_ops, op_specs
from jit_kernels.selfcheck import Sizes, op_checks, run_checks
from jit_kernels.spec import MODE_DTYPES, CaseData, OpCase

PATHS = ("eager", "compiled", "fused")
Timer = Callable[[Callable[[], object]], float]
# Small shapes of the CPU numerics run: 2-3 programs per reduction, every variant of every op
CPU_SIZES = Sizes(norm_batch=3, tokens=9, widths=(40,), qk_batch=2, heads=((2, 8),), swiglu_rows=70, hidden=(24,))


def model_sizes(model: str, batch: int, img_size: int) -> Sizes:
    """The op shapes of one block of `model` at `batch` (in-context tokens included): the cases' sizes."""
    cfg = model_config(model, img_size=img_size)
    n = cfg.grid_size**2 + cfg.in_context_len
    return Sizes(norm_batch=batch, tokens=n, widths=(cfg.hidden_size,), qk_batch=batch,
                 heads=((cfg.num_heads, cfg.head_dim),), swiglu_rows=batch * n, hidden=(cfg.mlp_hidden,))


def model_cases(model: str, batch: int, img_size: int) -> list[OpCase]:
    """Every registered op's numerics cases at the block shapes of `model`."""
    sizes = model_sizes(model, batch, img_size)
    return [c for spec in op_specs() for c in spec.cases(sizes) if c.kind == "numerics"]


def case_entries() -> tuple[str, ...]:
    """The op-table entries the cases cover (the names selfcheck failures are reported by), registry order."""
    return tuple(dict.fromkeys(c.entry for c in model_cases("JiT-T/4", 1, 16)))


def leaves(data: CaseData, requires_grad: bool = True) -> dict[str, torch.Tensor]:
    """Fresh copies of a case's inputs, the differentiable ones requiring gradients."""
    return {k: v.detach().clone().requires_grad_(requires_grad and k in data.grads) for k, v in data.inputs.items()}


def path_call(path: str, data: CaseData, out: torch.dtype | None) -> Callable[[dict], tuple]:
    """The case's call through one path: the eager reference, its torch.compile, or the fused custom op."""
    eager = get_ops("torch")
    if path == "eager":
        return lambda v: data.call(eager, v, out)
    if path == "compiled":
        return torch.compile(lambda v: data.call(eager, v, out), dynamic=False)
    if path == "fused":
        fused = get_ops("triton")
        return lambda v: data.call(fused, v, out)
    raise ValueError(f"unknown path {path!r}; choose from {PATHS}")


def _fwd_bwd(call: Callable[[dict], tuple], data: CaseData, v: dict) -> Callable[[], object]:
    """Closure: forward, then the gradients of every differentiable input (the whole backward)."""
    wrt = [v[k] for k in data.grads]

    def run() -> object:
        outs = call(v)
        return torch.autograd.grad(list(outs), wrt, [u.to(o.dtype) for u, o in zip(data.upstream, outs, strict=True)])

    return run


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Bytes `fn` allocates at its peak beyond what was allocated before it (CUDA only; None elsewhere)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def count_case(data: CaseData, table: OpTable, out: torch.dtype | None):
    """`jit_fast.perf.traffic.count_call` of one case through `table` (forward and backward, on fake copies)."""
    from jit_fast.perf.traffic import count_call

    names = list(data.inputs)
    return count_call(lambda *ts: data.call(table, dict(zip(names, ts, strict=True)), out),
                      tuple(leaves(data).values()))


def fused_io(data: CaseData, out: torch.dtype | None) -> tuple[int, int]:
    """Counted I/O bytes of the fused op (forward, forward+backward), internal reduction traffic included."""
    s = count_case(data, get_ops("triton"), out).summary()["phases"]
    fwd = s["fwd"]["all"]["bytes"]
    return fwd, fwd + s["bwd"]["all"]["bytes"]


def bench_ops(
    model: str, batch: int, img_size: int, device: str, timer: Timer | None = None, paths: tuple[str, ...] = PATHS,
    peak_bw: float | None = None, refused: dict[str, tuple[str, ...]] | None = None, mode: str = "bf16",
) -> list[dict]:
    """Per case and path: fwd and fwd+bwd ms, peak bytes allocated (CUDA), effective GB/s = the fused op's counted
    I/O bytes / time. Paths in `refused[entry]` (failed selfcheck) are not timed. `timer` defaults to do_bench."""
    if timer is None:
        from benchmarks.gpu import cuda_ms as timer
    refused = refused or {}
    out_dtype = None if mode == "fp32" else MODE_DTYPES[mode]
    rows = []
    for case in model_cases(model, batch, img_size):
        data = case.make(device, mode, 0)
        io_fwd, io_fwd_bwd = fused_io(data, out_dtype)
        for path in (p for p in paths if p not in refused.get(case.entry, ())):
            call, v = path_call(path, data, out_dtype), leaves(data)
            fwd_bwd = _fwd_bwd(call, data, v)
            with torch.no_grad():
                fwd = timer(lambda call=call, v=v: call(v))
            t_fwd_bwd = timer(fwd_bwd)
            row = dict(op=case.entry, case=case.label, path=path, mode=mode, fwd_ms=fwd, fwd_bwd_ms=t_fwd_bwd,
                       peak_bytes_fwd_bwd=peak_bytes(fwd_bwd, device), io_bytes_fwd=io_fwd,
                       io_bytes_fwd_bwd=io_fwd_bwd, gbps_fwd=io_fwd / fwd / 1e6,
                       gbps_fwd_bwd=io_fwd_bwd / t_fwd_bwd / 1e6)
            if peak_bw:
                row["pct_peak_bw_fwd"] = 100 * row["gbps_fwd"] * 1e9 / peak_bw
                row["pct_peak_bw_fwd_bwd"] = 100 * row["gbps_fwd_bwd"] * 1e9 / peak_bw
            rows.append(row)
    return rows


def cpu_numerics(sizes: Sizes = CPU_SIZES) -> list[dict]:
    """Each case's fused kernels (run by Triton's interpreter) against float64 in fp32 and bf16: the numerics half
    of the benchmark where there is no GPU to time. Needs TRITON_INTERPRET=1 before triton is imported."""
    results = run_checks(op_checks("cpu", sizes))
    return [dict(check=r.name, passed=r.passed, detail=r.detail) for r in results]


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def main(argv: list[str] | None = None) -> int:
    """CLI: times on CUDA; without it, interpreter numerics (exit 1 if any case fails them)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="JiT-B/16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--mode", choices=tuple(MODE_DTYPES), default="bf16", help="autocast dtype of the cases")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        rows = bench_ops(args.model, args.batch, args.img_size, "cuda", mode=args.mode)
        for r in rows:
            mib = r["peak_bytes_fwd_bwd"] / 2**20
            print(f"{r['op']:<26} {r['case']:<28} {r['path']:<9} fwd {r['fwd_ms']:.3f} ms  fwd+bwd "
                  f"{r['fwd_bwd_ms']:.3f} ms  {r['gbps_fwd_bwd']:.0f} GB/s  peak {mib:.1f} MiB")
        failed = 0
    else:
        if not _interpreted():  # the kernels must be built interpreted: run again with the interpreter on
            again = sys.argv[1:] if argv is None else argv
            env = dict(os.environ, TRITON_INTERPRET="1")
            return subprocess.run([sys.executable, "-m", "benchmarks.ops", *again], env=env).returncode
        print("benchmarks.ops: CUDA is not available, nothing was timed; the fused kernels' numerics through the "
              "Triton interpreter at small shapes instead:")
        rows = cpu_numerics()
        for r in rows:
            print(f"{'PASS' if r['passed'] else 'FAIL'}  {r['check']:<60} {r['detail']}")
        failed = sum(not r["passed"] for r in rows)
        print(f"{len(rows)} cases, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
