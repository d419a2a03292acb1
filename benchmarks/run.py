"""One command for the whole performance picture: counted traffic, modeled GPU times, CPU and GPU measurements.

    python -m benchmarks.run --model JiT-B/16 --batch 128

writes benchmarks/results/<tag>.json and .md. On a CPU-only machine it produces the counted and
modeled tables plus CPU-measured ones and states that GPU timings were not taken; with CUDA it also
runs `benchmarks.gpu`. `python -m benchmarks.report` turns every JSON there into docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.ops import count_case, model_cases
from benchmarks.report import git_commit, source_fingerprint
from jit_fast.configs import model_config
from jit_fast.perf.roofline import (
    DEFAULT_ASSUMPTIONS,
    GPUS,
    H100,
    PURE_ROOFLINE,
    format_speedup,
    speedup_table,
)
from jit_fast.perf.traffic import NON_GEMM, compare, count_block, count_train_step
from jit_fast.plan import SAMPLING, default_img_size, sampling_counts, sampling_times
from jit_kernels import get_ops

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BLOCK_MODELS = ("JiT-B/16", "JiT-L/16", "JiT-H/16")


def block_section(models: list[tuple[str, int]], batch: int) -> dict:
    """Counted eager/fused block traffic per model, their ratios and the modeled block times.

    Keys: "model" (standard block, fp32 parameters under bf16 autocast: one process without FSDP),
    "model (bf16 params)" (block parameters gathered in bf16 by FSDP2, fp32 root) and, for presets
    that train with dropout, "model (dropout block)".
    """
    out = {}
    for model, size in models:
        variants = [("standard", None, model), ("standard", torch.bfloat16, f"{model} (bf16 params)")]
        if model_config(model, img_size=size).attn_drop > 0:
            variants.append(("dropout", None, f"{model} (dropout block)"))
        for which, param_dtype, key in variants:
            eager = count_block(model, "eager", batch, size, which=which, param_dtype=param_dtype)
            fused = count_block(model, "fused", batch, size, which=which, param_dtype=param_dtype)
            out[key] = dict(img_size=size, which=which, params=str(param_dtype or torch.float32),
                            eager=eager.summary(), fused=fused.summary(), compare=compare(eager, fused),
                            projection=speedup_table({"eager": eager, "fused": fused}))
    return out


def op_boundary_section(model: str, batch: int, img_size: int) -> list[dict]:
    """Per case of every registered op (`benchmarks.ops.model_cases`, bf16 autocast dtypes): eager reference vs fused
    custom op launches, bytes and saved activations."""
    rows = []
    for case in model_cases(model, batch, img_size):
        data = case.make("cpu", "bf16", 0)
        for path, backend in (("eager", "torch"), ("fused", "triton")):
            s = count_case(data, get_ops(backend), torch.bfloat16).summary()
            rows.append(dict(
                op=f"{case.entry} {case.label}", path=path,
                fwd_launches=s["phases"]["fwd"]["all"]["launches"], fwd_bytes=s["phases"]["fwd"]["all"]["bytes"],
                bwd_launches=s["phases"]["bwd"]["all"]["launches"], bwd_bytes=s["phases"]["bwd"]["all"]["bytes"],
                saved_activation_bytes=s["saved_activation_bytes"],
            ))
    return rows


def step_section(model: str, batch: int, img_size: int) -> dict:
    """Counted and modeled full train step (loss, backward, fused AdamW, two EMAs), eager vs fused; plus the
    forward+backward ratios with bf16 block parameters as FSDP2 trains (`bf16_params`, no optimizer counted)."""
    counts = {p: count_train_step(model, p, batch, img_size) for p in ("eager", "fused")}
    bf16 = {p: count_train_step(model, p, batch, img_size, param_dtype=torch.bfloat16) for p in ("eager", "fused")}
    return dict(
        bf16_params=compare(bf16["eager"], bf16["fused"]),
        eager=counts["eager"].summary(),
        fused=counts["fused"].summary(),
        compare=compare(counts["eager"], counts["fused"]),
        projection=speedup_table(counts),
        projection_pure_roofline=speedup_table(counts, PURE_ROOFLINE),
        h100_text=format_speedup(counts, H100),
    )


def sampling_section(model: str, batch: int, img_size: int) -> dict:
    """Modeled sampling images/s per GPU (`jit_fast.plan.sampling_counts`, `sampling_times`): forward rows per image
    of Heun-50 with interval CFG times the modeled row cost; counted once, projected on each GPU."""
    table = []
    counts = sampling_counts(model, img_size, batch)
    for gname, gpu in GPUS.items():
        rows_per_image, times = sampling_times(counts, gpu, 1, 50_000)
        row = dict(gpu=gname, modeled=True)
        for t in times:
            key = t.path.replace(", ", "_").replace(" ", "_")
            row[f"{key}_ms_per_forward_row"] = 1e3 / (rows_per_image * t.img_per_s_per_gpu)
            row[f"{key}_img_per_s"] = t.img_per_s_per_gpu
        row["speedup_fused_vs_eager"] = row["fused_img_per_s"] / row["eager_img_per_s"]
        table.append(row)
    return dict(settings=dict(SAMPLING, interval=list(SAMPLING["interval"])), forward_batch=2 * batch,
                rows_per_image=rows_per_image, projection=table)


def run(args: argparse.Namespace) -> dict:
    """Build the full result dict (sections that cannot run here say so)."""
    from benchmarks.data import device_label

    t0 = time.perf_counter()
    size = args.img_size or default_img_size(args.model)
    models = [(m, 256) for m in args.block_models.split(",") if m]
    if (args.model, size) not in models:
        models.insert(0, (args.model, size))
    result: dict = dict(
        schema=1,
        command="python -m benchmarks.run " + " ".join(sys.argv[1:]),
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        host=device_label(),
        versions=dict(python=platform.python_version(), torch=torch.__version__, triton=_triton_version()),
        git=git_commit(),
        source=source_fingerprint(),
        model=args.model,
        batch=args.batch,
        img_size=size,
    )
    block_eager = count_block(args.model, "eager", args.batch, size)
    block_fused = count_block(args.model, "fused", args.batch, size)
    result["modeled"] = dict(
        assumptions=asdict(DEFAULT_ASSUMPTIONS),
        gpus={k: asdict(v) for k, v in GPUS.items()},
        blocks=block_section(models, args.batch),
        block_per_op=dict(eager=block_eager.per_op(), fused=block_fused.per_op()),
        op_boundaries=op_boundary_section(args.model, args.batch, size),
        train_step=step_section(args.model, args.batch, size),
        sampling=sampling_section(args.model, args.batch, size),
    )
    print(result["modeled"]["train_step"]["h100_text"], flush=True)
    result["compiled"] = _compiled(args, size, block_eager, block_fused)
    if args.no_cpu:
        result["cpu_measured"] = dict(skipped="not requested (--no-cpu)")
    else:
        from benchmarks.cpu import measure_all

        result["cpu_measured"] = dict(device=device_label(), **measure_all(args.model, size, quick=args.quick))
    from benchmarks.gpu import run_gpu_suite

    result["gpu"] = run_gpu_suite(args.model, args.batch, size, sample_steps=args.sample_steps)
    if "skipped" in result["gpu"]:
        print(result["gpu"]["skipped"], flush=True)
    result["seconds"] = time.perf_counter() - t0
    return result


def _compiled(args: argparse.Namespace, size: int, eager, fused) -> dict:
    """The official release as shipped: what the CPU can tell (statement) and the inductor CPU proxy, modeled."""
    from jit_fast.perf.compiled import __doc__ as compiled_doc

    out: dict = dict(statement=" ".join(compiled_doc.split()))
    if args.no_inductor:
        out["inductor_cpu_proxy"] = dict(skipped="not requested (--no-inductor)")
        return out
    from jit_fast.perf.compiled import compiled_block_count, inductor_cpu_proxy

    proxy = inductor_cpu_proxy(args.model, img_size=size, batch=args.batch)
    compiled = compiled_block_count(proxy, eager)
    out["inductor_cpu_proxy"] = proxy
    out["block_counts"] = {
        name: dict(launches_fwd=c.totals(("fwd",))["launches"], launches_bwd=c.totals(("bwd",))["launches"],
                   non_gemm_bytes=c.totals(("fwd", "bwd"), NON_GEMM)["bytes"])
        for name, c in (("eager", eager), ("compiled", compiled), ("fused", fused))
    }
    out["projection"] = speedup_table({"eager": eager, "compiled": compiled, "fused": fused})
    return out


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def tag_for(model: str, batch: int, size: int, host: str) -> str:
    """File stem of a result: model, batch, size and where it ran ("cpu" or the GPU name)."""
    where = host.split(",")[0].removeprefix("GPU ").replace(" ", "-") if host.startswith("GPU") else "cpu"
    return f"{model.replace('/', '-')}_b{batch}_{size}_{where}"


def main(argv: list[str] | None = None) -> int:
    """CLI entry: run, write JSON + Markdown, print where they went."""
    from benchmarks.report import render_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="JiT-B/16")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=0, help="default: 256 for /16, 512 for /32")
    ap.add_argument("--block-models", default=",".join(BLOCK_MODELS),
                    help="comma list of presets whose blocks are counted at 256px besides --model")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--quick", action="store_true", help="fewer CPU timing repeats")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU measurements")
    ap.add_argument("--no-inductor", action="store_true", help="skip the CPU inductor kernel-count proxy")
    ap.add_argument("--sample-steps", type=int, default=10, help="Heun steps timed by the GPU sampling benchmark")
    args = ap.parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = tag_for(result["model"], result["batch"], result["img_size"], result["host"])
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(render_result(result))
    print(f"wrote {args.out / stem}.json and .md in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
