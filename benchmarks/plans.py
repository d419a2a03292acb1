"""The planner's answers for the official presets, written for docs/PERFORMANCE.md (every figure modeled).

    python -m benchmarks.plans [--gpu H100] [--gpus 8] [--global-batch 1024] [--epochs 600]
        [--models JiT-B/16,JiT-L/16,JiT-H/16,JiT-G/16] [--out benchmarks/results/plans]

One JSON per GPU setting: per preset the `jit_fast.plan` training plan (eager, compiled, fused, fused FP8 with
tensorwise and rowwise scaling) and the sampling estimate, plus the JiT-G/32 calibration. `benchmarks.report`
renders them; nothing here is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path

from tqdm import tqdm

from benchmarks.report import RESULTS_DIR, source_fingerprint
from jit_fast import plan
from jit_fast.perf.roofline import DEFAULT_ASSUMPTIONS, GPUS

PLANS_DIR = RESULTS_DIR / "plans"
PRESETS = ("JiT-B/16", "JiT-L/16", "JiT-H/16", "JiT-G/16")


def preset_entry(model: str, gpu: str, gpus: int, global_batch: int, epochs: int, sample_batch: int,
                 img_size: int | None = None) -> dict:
    """One preset: the training plan with FP8 tensorwise, the rowwise FP8 step, and the sampling estimate."""
    p = plan.plan_run(model, gpus, gpu, global_batch, epochs, img_size, fp8="tensorwise")
    (rowwise,) = plan.path_times(model, p.img_size, p.micro_batch, p.grad_accum, gpus, p.steps, GPUS[gpu],
                                 ("fused+fp8",), "rowwise")
    out = plan.to_json(p, None, plan.sampling_dict(model, p.img_size, gpu, gpus, sample_batch, 50_000, "rowwise"))
    out["plan"]["paths"]["fused+fp8 rowwise"] = {k: v for k, v in dataclasses.asdict(rowwise).items() if k != "path"}
    out["plan"]["paths"]["fused+fp8 tensorwise"] = out["plan"]["paths"].pop("fused+fp8")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: plan every preset, write one JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS))
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=600)
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--models", default=",".join(PRESETS))
    ap.add_argument("--img-size", type=int, default=0, help="default: each preset's (256 for /16, 512 for /32)")
    ap.add_argument("--out", type=Path, default=PLANS_DIR)
    args = ap.parse_args(argv)
    presets = {}
    for model in tqdm(args.models.split(","), desc="planning", unit="preset"):
        presets[model] = preset_entry(model, args.gpu, args.gpus, args.global_batch, args.epochs, args.sample_batch,
                                      args.img_size or None)
    result = dict(
        schema=1, modeled=True,
        command=" ".join(["python -m benchmarks.plans", *(sys.argv[1:] if argv is None else argv)]),
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        source=source_fingerprint(), gpu=args.gpu, gpus=args.gpus, global_batch=args.global_batch,
        epochs=args.epochs, assumptions=dataclasses.asdict(DEFAULT_ASSUMPTIONS), calibration=plan.calibration(),
        presets=presets,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.gpus}x{args.gpu}_b{args.global_batch}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
