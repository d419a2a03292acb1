"""Roofline projection of counted traffic onto A100 / H100 / H200: modeled times, speedups and MFU.

Every number produced here is modeled, not measured. Each counted op takes
max(GEMM-or-attention FLOPs / (peak x efficiency), bytes / (HBM bandwidth x efficiency), minimum kernel time);
ops run back to back (no overlap between kernels). The efficiencies and the minimum kernel time are
assumptions, stated as named constants and printed with every projection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from jit_fast.perf.traffic import Count, OpRecord


@dataclass(frozen=True)
class GPUSpec:
    """Peak dense bf16 and FP8 tensor-core throughput (0: no FP8 tensor cores), HBM bandwidth and memory of one
    GPU (datasheet figures)."""

    name: str
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    peak_fp8_flops: float
    memory_bytes: int


# Sources: NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: BF16 tensor core 312 TFLOPS dense,
# 624 with sparsity; HBM2e 2,039 GB/s); NVIDIA H100 datasheet (H100 SXM: BF16 1,979 TFLOPS with
# sparsity, i.e. 989.5 dense; HBM3 3.35 TB/s); NVIDIA H200 datasheet (H200 SXM: BF16 1,979 TFLOPS with
# sparsity, 989.5 dense; HBM3e 4.8 TB/s). FP8 (E4M3/E5M2) dense: H100 SXM and H200 SXM 1,979 TFLOPS (3,958 with
# sparsity); the A100 has no FP8 tensor cores. Memory: the "80 GB" parts hold about 79.6 GiB and the "141 GB" H200
# about 140 GiB as CUDA reports them; taken as 79 and 139 GiB for the driver's share.
A100 = GPUSpec("A100-SXM4-80GB", 312e12, 2.039e12, 0.0, 79 * 2**30)
H100 = GPUSpec("H100-SXM5-80GB", 989.5e12, 3.35e12, 1979e12, 79 * 2**30)
H200 = GPUSpec("H200-SXM-141GB", 989.5e12, 4.8e12, 1979e12, 139 * 2**30)
GPUS = {"A100": A100, "H100": H100, "H200": H200}


@dataclass(frozen=True)
class Assumptions:
    """Achievable fractions of peak and the floor time of a kernel (assumed, not measured)."""

    gemm_efficiency: float = 0.70
    attention_efficiency: float = 0.50
    bandwidth_efficiency: float = 0.80
    min_kernel_s: float = 2e-6


DEFAULT_ASSUMPTIONS = Assumptions()
# Bracket for the assumptions above: every unit at 100% of peak and no per-kernel floor.
PURE_ROOFLINE = Assumptions(gemm_efficiency=1.0, attention_efficiency=1.0, bandwidth_efficiency=1.0, min_kernel_s=0.0)


def op_time(r: OpRecord, gpu: GPUSpec, a: Assumptions = DEFAULT_ASSUMPTIONS) -> float:
    """Modeled seconds of one op: the slower of its compute and memory time, at least the kernel floor."""
    t_mem = r.bytes / (gpu.hbm_bytes_per_s * a.bandwidth_efficiency)
    t_compute = 0.0
    if r.category == "gemm" and r.fp8:
        if not gpu.peak_fp8_flops:
            raise ValueError(f"{gpu.name} has no FP8 tensor cores: an FP8 count cannot be projected onto it")
        t_compute = r.flops / (gpu.peak_fp8_flops * a.gemm_efficiency)
    elif r.category == "gemm":
        t_compute = r.flops / (gpu.peak_bf16_flops * a.gemm_efficiency)
    elif r.category == "attention":
        t_compute = r.flops / (gpu.peak_bf16_flops * a.attention_efficiency)
    return max(t_mem, t_compute, a.min_kernel_s * r.launches)


def project(count: Count, gpu: GPUSpec, a: Assumptions = DEFAULT_ASSUMPTIONS) -> dict:
    """Modeled time per phase and category, total, throughput and MFU of one counted run on `gpu` (MFU against
    the bf16 peak, FP8 runs included, so the paths compare on one scale)."""
    by: dict[str, dict[str, float]] = {}
    for r in count.records:
        by.setdefault(r.phase, {}).setdefault(r.category, 0.0)
        by[r.phase][r.category] += op_time(r, gpu, a)
    total = sum(sum(v.values()) for v in by.values())
    model_flops = sum(r.model_flops for r in count.records)
    out = dict(
        gpu=gpu.name,
        modeled=True,
        seconds=total,
        seconds_by_phase={p: sum(v.values()) for p, v in by.items()},
        seconds_by_phase_category=by,
        model_flops=model_flops,
        mfu=model_flops / (total * gpu.peak_bf16_flops) if total else 0.0,
    )
    if count.meta.get("kind") == "train_step":
        out["img_per_s"] = count.meta["batch"] / total
    return out


def speedup_table(counts: dict[str, Count], a: Assumptions = DEFAULT_ASSUMPTIONS) -> list[dict]:
    """Per GPU: modeled time of each path and the fused-vs-eager speedup (counts keyed by path)."""
    rows = []
    for gname, gpu in GPUS.items():
        proj = {path: project(c, gpu, a) for path, c in counts.items()}
        row = dict(gpu=gname, modeled=True, **{f"{p}_ms": v["seconds"] * 1e3 for p, v in proj.items()})
        row.update({f"{p}_mfu": v["mfu"] for p, v in proj.items()})
        for base in ("eager", "compiled"):
            if base in proj and "fused" in proj:
                row[f"speedup_fused_vs_{base}"] = proj[base]["seconds"] / proj["fused"]["seconds"]
        rows.append(row)
    return rows


def inputs_summary(counts: dict[str, Count], gpu: GPUSpec, a: Assumptions = DEFAULT_ASSUMPTIONS) -> dict:
    """The inputs a projection used: device constants, assumptions and the counted totals per path."""
    per_path = {}
    for path, c in counts.items():
        cats = {cat: c.totals(categories=(cat,)) for cat in ("gemm", "attention", "fused", "other")}
        per_path[path] = {
            cat: dict(launches=t["launches"], gbytes=t["bytes"] / 1e9, tflop=t["flops"] / 1e12)
            for cat, t in cats.items()
        }
    return dict(gpu=asdict(gpu), assumptions=asdict(a), counts=per_path)


def format_speedup(counts: dict[str, Count], gpu: GPUSpec = H100, a: Assumptions = DEFAULT_ASSUMPTIONS) -> str:
    """Human-readable modeled fused-vs-eager speedup on `gpu` with every input it depends on."""
    inp = inputs_summary(counts, gpu, a)
    proj = {p: project(c, gpu, a) for p, c in counts.items()}
    meta = next(iter(counts.values())).meta
    lines = [
        f"MODELED (not measured) {meta['kind']} {meta['model']} batch {meta['batch']} at {meta['img_size']}px "
        f"on {gpu.name}: peak bf16 {gpu.peak_bf16_flops / 1e12:.1f} TFLOP/s, HBM {gpu.hbm_bytes_per_s / 1e12:.2f} TB/s",
        f"assumptions: GEMM at {a.gemm_efficiency:.0%} of peak, attention at {a.attention_efficiency:.0%}, "
        f"memory at {a.bandwidth_efficiency:.0%} of bandwidth, >= {a.min_kernel_s * 1e6:.1f} us per kernel",
    ]
    for path, cats in inp["counts"].items():
        parts = ", ".join(
            f"{cat} {v['launches']} launches / {v['gbytes']:.1f} GB / {v['tflop']:.1f} TFLOP" for cat, v in cats.items()
        )
        p = proj[path]
        lines.append(f"  {path}: {parts}")
        lines.append(f"  {path}: modeled {p['seconds'] * 1e3:.1f} ms, MFU {p['mfu']:.1%}"
                     + (f", {p['img_per_s']:.0f} img/s" if "img_per_s" in p else ""))
    if "eager" in proj and "fused" in proj:
        lines.append(f"  modeled speedup fused vs eager: {proj['eager']['seconds'] / proj['fused']['seconds']:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: count a train step (or block) for both paths and print the modeled comparison with its inputs."""
    import argparse

    from jit_fast.perf.traffic import count_block, count_train_step

    ap = argparse.ArgumentParser(description="Modeled fused-vs-eager speedup from counted traffic (not measured).")
    ap.add_argument("--model", default="JiT-B/16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    ap.add_argument("--block", action="store_true", help="one standard block instead of the whole train step")
    args = ap.parse_args(argv)
    count = count_block if args.block else count_train_step
    counts = {p: count(args.model, p, args.batch, args.img_size) for p in ("eager", "fused")}
    print(format_speedup(counts, GPUS[args.gpu]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
