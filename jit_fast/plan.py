"""How long and how much memory a training run takes, modeled before it starts (no GPU needed).

    python -m jit_fast.plan --model JiT-L/16 --gpus 8 --gpu H100 --global-batch 1024 --epochs 600
        [--fp8 rowwise] [--kernels torch|triton] [--no-compiled] [--json]

Every figure is modeled: the train step is counted on fake tensors (`jit_fast.perf.traffic`, the same counts
`benchmarks.run` projects) and projected onto the GPU by `jit_fast.perf.roofline`; memory is
`jit_fast.memory_plan`'s. Paths: eager (the official model without torch.compile), compiled (the official release
as shipped: blocks under torch.compile, from inductor's CPU scheduler, `jit_fast.perf.compiled`), fused (this
project's Triton kernels) and, with --fp8, fused with the block linears in FP8 (`jit_fast.perf.float8`).
With more than one GPU the blocks compute with FSDP2's bf16 gathered weights and the optimizer steps 1/N of the
states; the all-gathers and reduce-scatters are assumed hidden behind compute (not modeled). A per-GPU batch the
memory plan does not fit is modeled as gradient accumulation over the largest micro-batch that divides it and fits.
Memory is the bf16 run's for every path (FP8's transient float8 copies are not in the memory plan).
The calibration line compares the one public measured figure known, the official code training JiT-G/32 at 512px
with 16 images per GPU on 8 H100s for 600 epochs in about 20 days, with this planner's eager estimate of that run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass

import torch

from jit_fast import memory_plan
from jit_fast.configs import MODEL_PRESETS, model_config
from jit_fast.perf.compiled import compiled_block_count, inductor_cpu_proxy
from jit_fast.perf.float8 import RECIPES, fp8_count
from jit_fast.perf.roofline import DEFAULT_ASSUMPTIONS, GPUS, Assumptions, GPUSpec, project
from jit_fast.perf.traffic import Count, count_block, count_forward, count_train_step
from jit_fast.sampling.sampler import forward_rows_per_image
from jit_fast.shared.errors import UserError
from jit_fast.shared.quiet import CPP_EXTENSION_LOGGER, quiet_loggers

IMAGENET_TRAIN_IMAGES = 1_281_167
# The official JiT-G/32 run (JiT paper and repository): 8 H100s, 16 images per GPU, 600 epochs, about 20 days
CALIBRATION = dict(model="JiT-G/32", img_size=512, gpus=8, gpu="H100", per_gpu_batch=16, epochs=600, days=20.0)
OFFICIAL_PRESETS = tuple(m for m in MODEL_PRESETS
                         if m.split("/")[0] in ("JiT-B", "JiT-L", "JiT-H", "JiT-G") and not m.endswith("-Text"))
SECONDS_PER_DAY = 86400.0
# The sampler the official FID numbers use: Heun, 50 steps, CFG 2.9 on t in [0.1, 1.0]
SAMPLING = dict(steps=50, solver="heun", interval=(0.1, 1.0), cfg=2.9)


class PlanError(UserError, ValueError):
    """Plan inputs that make no sense (one line naming the flag)."""


@dataclass(frozen=True)
class PathTime:
    """Modeled time of one optimizer step of one path, and what follows from it."""

    path: str
    step_s: float
    img_per_s_per_gpu: float
    days: float
    mfu: float


@dataclass(frozen=True)
class RunPlan:
    """The modeled answer for one run: inputs, memory per GPU, and the time of each path."""

    model: str
    img_size: int
    gpu: str
    gpus: int
    global_batch: int
    per_gpu_batch: int
    micro_batch: int
    grad_accum: int
    epochs: int
    dataset_size: int
    steps: int
    kernels: str
    fp8: str
    peak_bytes: int
    memory_bytes: float
    fits: bool
    largest_batch: int
    largest_batch_checkpointed: int
    activation_checkpointing: bool
    paths: tuple[PathTime, ...]

    def path(self, name: str) -> PathTime:
        """The time of path `name` (eager, compiled, fused, fused+fp8)."""
        return next(p for p in self.paths if p.path == name)


def default_img_size(model: str) -> int:
    """Official resolution of a preset: 256 for /16 models, 512 for /32 models."""
    return 512 if model.endswith("/32") else 256


def _sharded(count: Count, world: int) -> Count:
    """`count` with every op's bytes over `world` ranks (the optimizer on FSDP2 shards; launches unchanged)."""
    records = [dataclasses.replace(r, bytes_read=r.bytes_read // world, bytes_written=r.bytes_written // world)
               for r in count.records]
    return Count(meta=count.meta, records=records)


def compiled_saving(model: str, img_size: int, micro_batch: int, dtype: torch.dtype | None, gpu: GPUSpec,
                    a: Assumptions) -> float:
    """Seconds per micro-step the official release's torch.compile'd blocks save over eager: the standard block's
    eager time minus its compiled time (inductor's kernels, the eager GEMMs and attention), times the depth."""
    eager = count_block(model, "eager", micro_batch, img_size, param_dtype=dtype)
    with quiet_loggers(CPP_EXTENSION_LOGGER):  # "No CUDA runtime is found": inductor's CPU compile needs none
        proxy = inductor_cpu_proxy(model, img_size=img_size, batch=micro_batch)
    compiled = compiled_block_count(proxy, eager)
    return eager.meta["depth"] * (project(eager, gpu, a)["seconds"] - project(compiled, gpu, a)["seconds"])


def path_times(model: str, img_size: int, micro: int, accum: int, gpus: int, steps: int, gpu: GPUSpec,
               paths: tuple[str, ...], fp8: str = "off", a: Assumptions = DEFAULT_ASSUMPTIONS) -> tuple[PathTime, ...]:
    """Modeled step of each of `paths` (eager, compiled, fused, fused+fp8): `accum` counted forward+backward passes
    of `micro` images per GPU, then the optimizer and two EMAs (on 1/`gpus` of the states with FSDP2)."""
    dtype = torch.bfloat16 if gpus > 1 else None  # FSDP2 computes with bf16 gathered block weights
    counted = sorted({"compiled": "eager", "fused+fp8": "fused"}.get(p, p) for p in paths)  # what each derives from
    counts = {path: count_train_step(model, path, micro, img_size, optimizer=False, param_dtype=dtype)
              for path in counted}
    if "fused+fp8" in paths:
        counts["fused+fp8"] = fp8_count(counts["fused"], fp8)
    opt = count_train_step(model, "eager", 1, img_size)
    opt = Count(meta=opt.meta, records=[r for r in opt.records if r.phase == "opt"])
    opt_s = project(_sharded(opt, gpus) if gpus > 1 else opt, gpu, a)["seconds"]
    proj = {path: project(c, gpu, a) for path, c in counts.items()}
    if "compiled" in paths:
        saving = compiled_saving(model, img_size, micro, dtype, gpu, a)
        proj["compiled"] = dict(proj["eager"], seconds=proj["eager"]["seconds"] - saving)
    out = []
    for name in paths:
        step = accum * proj[name]["seconds"] + opt_s
        out.append(PathTime(name, step, accum * micro / step, steps * step / SECONDS_PER_DAY,
                            accum * proj[name]["model_flops"] / (step * gpu.peak_bf16_flops)))
    return tuple(out)


def plan_run(model: str = "JiT-B/16", gpus: int = 8, gpu: str = "H100", global_batch: int = 1024, epochs: int = 600,
             img_size: int | None = None, fp8: str = "off", kernels: str = "triton",
             dataset_size: int = IMAGENET_TRAIN_IMAGES, activation_checkpointing: bool = False,
             memory_gb: float | None = None, compiled: bool = True,
             assumptions: Assumptions = DEFAULT_ASSUMPTIONS) -> RunPlan:
    """Model a training run: memory per GPU (the memory plan), step time, img/s, days and MFU per path."""
    if model not in MODEL_PRESETS or model.endswith("-Text"):
        why = "text-conditioned presets are not modeled" if model in MODEL_PRESETS else "it is not a preset"
        raise PlanError(f"--model {model!r}: {why}; choose one of {', '.join(OFFICIAL_PRESETS)}")
    if gpu not in GPUS:
        raise PlanError(f"--gpu {gpu!r} is not modeled; choose one of {', '.join(GPUS)}")
    for flag, value in (("--gpus", gpus), ("--global-batch", global_batch), ("--epochs", epochs),
                        ("--dataset-size", dataset_size)):
        if value < 1:
            raise PlanError(f"{flag} must be an integer >= 1, got {value}")
    if global_batch % gpus:
        raise PlanError(f"--global-batch {global_batch} does not split over --gpus {gpus} (it must be a multiple)")
    if global_batch > dataset_size:
        raise PlanError(f"--global-batch {global_batch} exceeds --dataset-size {dataset_size}: no full step per epoch")
    if fp8 not in ("off", *RECIPES):
        raise PlanError(f"--fp8 {fp8!r} is not a recipe; choose off, {' or '.join(RECIPES)}")
    spec = GPUS[gpu]
    if fp8 != "off" and not spec.peak_fp8_flops:
        raise PlanError(f"--fp8 needs FP8 tensor cores; the {gpu} has none (choose --gpu H100 or H200)")
    img_size = img_size or default_img_size(model)
    try:
        model_config(model, img_size=img_size)
    except ValueError as e:
        raise PlanError(f"--img-size {img_size}: {e}") from None
    budget = round(memory_gb * 2**30) if memory_gb else int(spec.memory_bytes)
    per_gpu = global_batch // gpus
    mem = memory_plan.plan(model, per_gpu, img_size, "bf16", kernels, activation_checkpointing, gpus)
    largest = mem.largest_batch(budget)
    fits = mem.peak() <= budget
    # the fewest micro-steps whose micro-batch divides the per-GPU batch and fits (none fits: the batch as asked)
    accum = 1 if fits or largest == 0 else next(a for a in range(1, per_gpu + 1)
                                                if per_gpu % a == 0 and per_gpu // a <= largest)
    micro = per_gpu // accum
    steps = epochs * (dataset_size // global_batch)

    paths = ("eager", *(("compiled",) if compiled else ()), "fused", *(("fused+fp8",) if fp8 != "off" else ()))
    times = path_times(model, img_size, micro, accum, gpus, steps, spec, paths, fp8, assumptions)
    return RunPlan(model, img_size, spec.name, gpus, global_batch, per_gpu, micro, accum, epochs, dataset_size, steps,
                   kernels, fp8, mem.peak(), budget, fits, largest, mem.largest_batch(budget, True),
                   activation_checkpointing, times)


@dataclass(frozen=True)
class SamplingTime:
    """Modeled sampling throughput of one sampler path: images per second per GPU, minutes for all the images."""

    path: str
    img_per_s_per_gpu: float
    minutes: float


def sampling_counts(model: str, img_size: int, batch: int, fp8: str = "off") -> dict[str, Count]:
    """One sampler forward of each path at `batch` images (2 x `batch` rows while guided): eager and fused run under
    autocast, which casts the block weights in every forward; "bf16 weights" casts them once before sampling;
    "fp8 weights" also runs the block linears in FP8 with weights cast once (only with `fp8`)."""
    counts = {"eager": count_forward(model, "eager", 2 * batch, img_size),
              "fused": count_forward(model, "fused", 2 * batch, img_size),
              "fused, bf16 weights": count_forward(model, "fused", 2 * batch, img_size, param_dtype=torch.bfloat16)}
    if fp8 != "off":
        counts["fused+fp8, fp8 weights"] = fp8_count(counts["fused, bf16 weights"], fp8, weights_cast_once=True)
    return counts


def sampling_times(counts: dict[str, Count], gpu: GPUSpec, gpus: int, images: int,
                   a: Assumptions = DEFAULT_ASSUMPTIONS) -> tuple[int, tuple[SamplingTime, ...]]:
    """Heun-50 with interval CFG (`SAMPLING`) from `sampling_counts`: (forward rows per image, each path's time)."""
    rows = forward_rows_per_image(SAMPLING["steps"], SAMPLING["solver"], SAMPLING["interval"], SAMPLING["cfg"])
    out = []
    for path, c in counts.items():
        per_row = project(c, gpu, a)["seconds"] / c.meta["batch"]
        ips = 1.0 / (rows * per_row)
        out.append(SamplingTime(path, ips, images / (gpus * ips) / 60))
    return rows, tuple(out)


def calibration(assumptions: Assumptions = DEFAULT_ASSUMPTIONS) -> dict:
    """The official JiT-G/32 run's reported days against this planner's eager estimate of the same run."""
    c = CALIBRATION
    steps = c["epochs"] * (IMAGENET_TRAIN_IMAGES // (c["per_gpu_batch"] * c["gpus"]))
    (eager,) = path_times(c["model"], c["img_size"], c["per_gpu_batch"], 1, c["gpus"], steps, GPUS[c["gpu"]],
                          ("eager",), a=assumptions)
    return dict(c, modeled_eager_days=eager.days, measured_over_modeled=c["days"] / eager.days)


def sampling_dict(model: str, img_size: int, gpu: str, gpus: int, batch: int, images: int, fp8: str = "off",
                  a: Assumptions = DEFAULT_ASSUMPTIONS) -> dict:
    """`sampling_times` as a JSON-ready dict with its settings."""
    rows, times = sampling_times(sampling_counts(model, img_size, batch, fp8), GPUS[gpu], gpus, images, a)
    return dict(settings=dict(SAMPLING, interval=list(SAMPLING["interval"])), forward_rows_per_image=rows,
                batch_per_gpu=batch, images=images, gpus=gpus,
                paths={t.path: dict(img_per_s_per_gpu=t.img_per_s_per_gpu, minutes=t.minutes) for t in times})


def to_json(p: RunPlan, calib: dict | None, sampling: dict | None,
            assumptions: Assumptions = DEFAULT_ASSUMPTIONS) -> dict:
    """The plan as a JSON-ready dict, every figure labelled modeled."""
    out = dataclasses.asdict(p)
    out["paths"] = {t["path"]: {k: v for k, v in t.items() if k != "path"} for t in out["paths"]}
    return dict(modeled=True, plan=out, sampling=sampling, assumptions=dataclasses.asdict(assumptions),
                calibration=calib, statement=" ".join(__doc__.split("\n\n", 2)[2].split()))


def format_sampling(sm: dict) -> str:
    """The printed sampling estimate: one line per sampler path."""
    st = sm["settings"]
    lines = [f"sampling {sm['images']:,} images on {sm['gpus']} GPUs, {sm['batch_per_gpu']} per GPU "
             f"({st['solver']}-{st['steps']}, CFG {st['cfg']} on t in {st['interval']}: "
             f"{sm['forward_rows_per_image']} forward rows per image), modeled:"]
    for path, v in sm["paths"].items():
        lines.append(f"  {path:<24}{v['img_per_s_per_gpu']:>8.1f} img/s/GPU{v['minutes']:>8.2f} min")
    return "\n".join(lines)


def format_plan(p: RunPlan, calib: dict | None, assumptions: Assumptions = DEFAULT_ASSUMPTIONS) -> str:
    """The printed plan: inputs, memory, one line per path, the calibration ratio and the assumptions."""
    gib = 2**30
    acc = f" = {p.grad_accum} x {p.micro_batch} accumulated" if p.grad_accum > 1 else ""
    lines = [
        f"MODELED (not measured): {p.model} at {p.img_size}px on {p.gpus} x {p.gpu}, global batch {p.global_batch} "
        f"= {p.per_gpu_batch} per GPU{acc}, {p.epochs} epochs of {p.dataset_size:,} images ({p.steps:,} steps)",
        f"memory per GPU (bf16, kernels={p.kernels}, {'FSDP2 x' + str(p.gpus) if p.gpus > 1 else '1 GPU'}"
        f"{', activation checkpointing' if p.activation_checkpointing else ''}): peak {p.peak_bytes / gib:.1f} GiB "
        f"of {p.memory_bytes / gib:.0f} GiB ({'fits' if p.fits else 'does not fit'}); largest per-GPU batch that "
        f"fits: {p.largest_batch} ({p.largest_batch_checkpointed} with --activation-checkpointing)",
        f"{'path':<19}{'step ms':>10}{'img/s/GPU':>11}{'days':>8}{'MFU':>7}",
    ]
    for t in p.paths:
        label = f"fused+fp8 {p.fp8}" if t.path == "fused+fp8" else t.path
        lines.append(f"{label:<19}{t.step_s * 1e3:>10.1f}{t.img_per_s_per_gpu:>11.0f}{t.days:>8.2f}{t.mfu:>7.1%}")
    if "compiled" in {t.path for t in p.paths}:
        ratio = p.path("compiled").step_s / p.path("fused").step_s
        lines.append(f"fused vs compiled official: {ratio:.2f}x")
    if calib is not None:
        lines.append(f"calibration: the official code trained {calib['model']} ({calib['img_size']}px, "
                     f"{calib['per_gpu_batch']} per GPU, {calib['gpus']} x {calib['gpu']}, {calib['epochs']} epochs) "
                     f"in about {calib['days']:.0f} days; this planner's eager estimate of that run is "
                     f"{calib['modeled_eager_days']:.1f} days: measured / modeled = "
                     f"{calib['measured_over_modeled']:.2f}")
    a = assumptions
    lines.append(f"assumptions: GEMMs at {a.gemm_efficiency:.0%} of peak, attention at {a.attention_efficiency:.0%}, "
                 f"memory at {a.bandwidth_efficiency:.0%} of bandwidth, >= {a.min_kernel_s * 1e6:.0f} us per kernel, "
                 "no overlap between kernels, FSDP2 communication hidden, no data-loading stalls; MFU against the "
                 "bf16 peak")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: print (or --json) the modeled plan; one-line errors, exit 2."""
    ap = argparse.ArgumentParser(prog="python -m jit_fast.plan", description=__doc__.splitlines()[0],
                                 epilog="Every figure is modeled from counted traffic, not measured.")
    ap.add_argument("--model", default="JiT-B/16", help=f"preset: {', '.join(OFFICIAL_PRESETS)}")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in the run (FSDP2 over all of them)")
    ap.add_argument("--gpu", default="H100", choices=sorted(GPUS), help="GPU model (datasheet peaks)")
    ap.add_argument("--global-batch", type=int, default=1024, help="images per optimizer step over all GPUs")
    ap.add_argument("--epochs", type=int, default=600)
    ap.add_argument("--img-size", type=int, default=0, help="default: 256 for /16 models, 512 for /32")
    ap.add_argument("--dataset-size", type=int, default=IMAGENET_TRAIN_IMAGES, help="training images (ImageNet-1k)")
    ap.add_argument("--fp8", default="off", choices=("off", *RECIPES), help="also model the fused path in FP8")
    ap.add_argument("--kernels", default="triton", choices=("torch", "triton"), help="kernels of the memory plan")
    ap.add_argument("--activation-checkpointing", action="store_true", help="memory plan with checkpointed blocks")
    ap.add_argument("--memory-gb", type=float, default=0.0, help="memory per GPU in GiB (default: the GPU's)")
    ap.add_argument("--no-compiled", action="store_true",
                    help="skip the compiled path (it compiles one block twice with inductor on CPU, about a minute)")
    ap.add_argument("--no-calibration", action="store_true", help="skip the JiT-G/32 calibration line")
    ap.add_argument("--sample-batch", type=int, default=256, help="images per GPU per sampling batch")
    ap.add_argument("--sample-images", type=int, default=50_000, help="images to sample (FID-50k)")
    ap.add_argument("--no-sampling", action="store_true", help="skip the sampling estimate")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        for flag, value in (("--sample-batch", args.sample_batch), ("--sample-images", args.sample_images)):
            if value < 1:
                raise PlanError(f"{flag} must be an integer >= 1, got {value}")
        if not args.no_compiled and not args.json:
            print("counting the step on fake tensors and compiling one block with inductor on CPU "
                  "(about a minute; --no-compiled skips it) ...", file=sys.stderr, flush=True)
        p = plan_run(args.model, args.gpus, args.gpu, args.global_batch, args.epochs, args.img_size or None,
                     args.fp8, args.kernels, args.dataset_size, args.activation_checkpointing,
                     args.memory_gb or None, not args.no_compiled)
        sampling = None if args.no_sampling else sampling_dict(
            args.model, p.img_size, args.gpu, args.gpus, args.sample_batch, args.sample_images, args.fp8)
        calib = None if args.no_calibration else calibration()
    except UserError as e:
        print(f"plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(p, calib, sampling), indent=1))
    else:
        print(format_plan(p, calib) + ("\n" + format_sampling(sampling) if sampling else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
