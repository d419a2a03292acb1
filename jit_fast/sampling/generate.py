"""Generation and FID/IS evaluation of a JiT checkpoint: the library behind `sample.py`.

    torchrun --nproc_per_node 8 sample.py --ckpt checkpoint-last.pth --num-images 50000 \\
        --cfg 2.9 --interval 0.1 1.0 --steps 50 --solver heun --fid-ref jit_in256_stats.npz --out eval/

Index space. Image i (0 <= i < N) has label i % num_classes and noise seeded by (seed, i). The
indices are cut into chunks [k B, (k+1) B) of the batch size B; rank r runs chunks r, r+W, ...
(the last chunk is padded to B inside the sampler). A chunk is always computed as the same
batch whatever the world size, so a fixed seed and batch size give bitwise the same
samples.npz on 1 or 64 ranks; another batch size gives the same images up to the float
rounding of batched matmuls (rare +-1 flips of a uint8 value).

Every finished chunk is written to `OUT/parts/` (atomic files); a restarted run with the same
settings reuses them, so a long run resumes where it stopped. At the end rank 0 streams the
parts into `OUT/samples.npz`, writes `OUT/grid.png` and `OUT/metrics.json`, and drops the parts.
Inception features of every chunk are computed on the device as it is produced and all-gathered
at the end (`jit_fast.sampling.fid`), so no PNG has to be written to get FID and IS.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from jit_fast.checkpoint import CheckpointError, ModelMeta, build_model_from_meta, load_weights
from jit_fast.checkpoint.weights import check_state_dict
from jit_fast.configs import DEMO_NUM_IMAGES, ModelConfig, SampleConfig
from jit_fast.model.network import JiT
from jit_fast.options import add_options
from jit_fast.sampling import fid
from jit_fast.sampling.demo_eval import evaluate_demo
from jit_fast.sampling.demo_eval import summary as demo_summary
from jit_fast.sampling.outputs import GRID_COLUMNS, GRID_IMAGES, BackgroundWriter, PartStore, write_pngs, write_samples
from jit_fast.sampling.sampler import (
    StaticSampler,
    forward_rows_per_image,
    image_noise,
    nfe_per_image,
    to_uint8,
)
from jit_fast.shared import distributed as D
from jit_fast.shared import integrity
from jit_fast.shared.conditioning import Condition, TextCondition
from jit_fast.shared.errors import UsageError, UserError
from jit_fast.shared.files import atomic_write
from jit_fast.shared.run_lock import hold_for_run
from jit_fast.text.encoder import TextEncoder
from jit_fast.text.prompts import PROMPT_RULE, prompt_conditions, prompt_indices
from jit_fast.text.sampling import (
    demo_condition,
    encode_prompts,
    sampling_prompts,
    text_encoder_for,
    with_empty_text,
    write_grid_captions,
)

LABEL_RULE = "i % num_classes"


# --------------------------------------------------------------------------------------------
# Index space: labels, chunks, ranks
# --------------------------------------------------------------------------------------------
def class_labels(start: int, end: int, num_classes: int) -> torch.Tensor:
    """Labels of images [start, end): class-balanced, image i gets i % num_classes."""
    return torch.arange(start, end, dtype=torch.long) % num_classes


def chunk_ranges(num_images: int, batch_size: int) -> list[tuple[int, int, int]]:
    """(k, start, end) of every chunk [k B, min((k+1) B, N))."""
    return [(k, s, min(s + batch_size, num_images)) for k, s in enumerate(range(0, num_images, batch_size))]


def rank_chunks(num_images: int, batch_size: int, rank: int, world: int) -> list[tuple[int, int, int]]:
    """The chunks rank `rank` of `world` generates: k = rank, rank + world, ..."""
    return chunk_ranges(num_images, batch_size)[rank::world]


# --------------------------------------------------------------------------------------------
# Checkpoints (formats are read by jit_fast.checkpoint.weights.load_weights)
# --------------------------------------------------------------------------------------------
def checkpoint_sha256(path: Path) -> str:
    """sha256 of a checkpoint file, or of a directory's files (relative names and digests, sorted).

    Files the checksum verification just hashed are not read again."""
    if path.is_file():
        return integrity.known_digest(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0" + integrity.known_digest(f).encode() + b"\n")
    return h.hexdigest()


def load_weight_set(ckpt: str | Path, which: str, net: JiT | None = None,
                    verify: bool = True) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """(state dict, metadata) of weight set `which`; checked against `net` when given."""
    sd, meta = load_weights(ckpt, which, verify)
    if net is not None:
        sd = with_empty_text(net, sd)
        check_state_dict(net, sd, f"{meta.source or ckpt} [{which}]")
    return sd, meta


def build_net(meta: ModelMeta, a: SampleConfig, device: torch.device) -> JiT:
    """The checkpoint's network (command-line --model/--img-size/--num-classes override its metadata)."""
    given = {"model": a.model, "img_size": a.img_size, "num_classes": a.num_classes}
    meta = meta.replace(**{k: v for k, v in given.items() if v is not None})
    try:
        precision, _ = D.resolve_precision(a.precision, device)
        net = build_model_from_meta(meta, kernels=a.kernels, device=device, precision=precision)
    except ValueError as e:  # unknown preset, impossible shapes
        raise CheckpointError(str(e)) from None
    return net.to(device).eval().requires_grad_(False)


def swap_weights(net: JiT, sd: dict[str, torch.Tensor]) -> None:
    """Copy a weight set into the net's existing tensors (captured CUDA graphs keep pointing at them)."""
    net.load_state_dict(sd, strict=True)


def _prefetch(fn, items: list):
    """Generator of fn(item) for items in order, computing the next one in a thread meanwhile."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(fn, items[0]) if items else None
        for i in range(len(items)):
            cur, fut = fut, (pool.submit(fn, items[i + 1]) if i + 1 < len(items) else None)
            try:
                yield cur.result()
            except GeneratorExit:
                if fut is not None:
                    fut.cancel()
                raise


def _all_ok(env: D.DistEnv, err: str | None, elsewhere: str) -> None:
    """Raise UsageError on every rank if any rank failed (keeps the others from hanging)."""
    if D.any_rank(env, err is not None):
        raise UsageError(err or elsewhere)


def load_metric_models(env: D.DistEnv, weights: Path | None, fid_ref: Path | None, fid_cache: Path | None,
                       fid_ref_crop: int | None, fid_workers: int, fid_batch_size: int,
                       log) -> tuple[torch.nn.Module, dict | None, str]:
    """(Inception extractor, reference statistics or None, weights tag) on every rank, or UsageError on all."""

    def load() -> tuple[torch.nn.Module | None, str | None]:
        try:
            return fid.build_inception(weights, env.device), None
        except fid.InceptionWeightsError as e:
            return None, str(e)

    # rank 0 first: a download lands in the hub cache once
    extractor, err = D.leader_first(load, env.rank == 0, env)
    _all_ok(env, err, "Inception weights failed to load on another rank")
    weights_id = D.broadcast_object(env, fid.weights_tag(weights) if env.rank == 0 else None)
    ref_stats = None
    if fid_ref:
        err = None
        try:
            ref_stats = fid.reference_stats(
                fid_ref, lambda: fid.FeatureAccumulator(extractor, fid_batch_size, env.device), weights_id,
                fid_cache, fid_ref_crop, num_workers=fid_workers, log=log,
            )
        except fid.StatsError as e:
            err = str(e)
        except (OSError, ValueError) as e:  # e.g. an .npz holding object arrays (allow_pickle=False)
            err = f"--fid-ref {fid_ref}: cannot be read ({type(e).__name__}: {e})"
        _all_ok(env, err, "the FID reference failed on another rank")
    return extractor, ref_stats, weights_id


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Setting:
    """One point of a sweep: a weight set and a guidance scale."""

    ema: str
    cfg: float

    @property
    def tag(self) -> str:
        return f"{self.ema}_cfg{self.cfg:g}"


class Evaluator:
    """Sampler, Inception and reference statistics shared by every setting of a launch."""

    def __init__(self, conf: SampleConfig, net: JiT, env: D.DistEnv, meta: ModelMeta, ckpt_info: dict,
                 texts: tuple[list[str], TextCondition] | None = None) -> None:
        self.conf, self.env = conf, env
        self.prompts, self.encoded = texts if texts is not None else (None, None)
        self.text_encoder = meta.text_encoder
        self.rank, self.world, device = env.rank, env.world_size, env.device
        self.device = device
        self.ckpt_info = ckpt_info
        self.mcfg = net.cfg
        self.noise_scale, self.t_eps = recipe(conf, meta, self.mcfg)
        _, self.amp_dtype = D.resolve_precision(conf.precision, device)
        runner = torch.compile(net, dynamic=False) if conf.compile else net
        self.sampler = StaticSampler(
            runner, conf.batch_size, steps=conf.steps, solver=conf.solver, interval=conf.interval,
            noise_scale=self.noise_scale, num_classes=self.mcfg.num_classes, t_eps=self.t_eps,
            img_size=self.mcfg.input_size, in_channels=self.mcfg.in_channels, device=device,
            autocast_dtype=self.amp_dtype, cuda_graph=(device.type == "cuda" and not conf.no_cuda_graph),
        )
        self.extractor = self.ref_stats = None
        self.weights_id = None
        if conf.metrics:
            self._setup_inception()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, file=sys.stderr, flush=True)

    def _setup_inception(self) -> None:
        a = self.conf
        self.extractor, self.ref_stats, self.weights_id = load_metric_models(
            self.env, a.inception_weights, a.fid_ref, a.fid_cache, a.fid_ref_crop, a.fid_workers, a.fid_batch_size,
            self.log)

    def accumulator(self) -> fid.FeatureAccumulator:
        return fid.FeatureAccumulator(self.extractor, self.conf.fid_batch_size, self.device)

    # ---------------------------------------------------------------------------------------
    def sampling_config(self, s: Setting) -> dict:
        a = self.conf
        return {
            "ema": s.ema, "cfg": s.cfg, "interval": list(a.interval), "steps": a.steps, "solver": a.solver,
            "seed": a.seed, "num_images": a.num_images, "batch_size": a.batch_size,
            "noise_scale": self.noise_scale, "t_eps": self.t_eps,
            "labels": LABEL_RULE if self.prompts is None else PROMPT_RULE,
            **({} if self.prompts is None else {"prompts": self.prompts, "text_encoder": self.text_encoder}),
            "precision": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype else "float32",
            "compile": bool(a.compile), "device_type": self.device.type,
            "model": dataclasses.asdict(self.mcfg),
            "checkpoint_sha256": self.ckpt_info["sha256"],
        }

    def run_setting(self, s: Setting, out: Path) -> dict:
        a, rank, world = self.conf, self.rank, self.world
        out.mkdir(parents=True, exist_ok=True)
        config = self.sampling_config(s)
        store = PartStore(self.env, out / "parts", config, overwrite=a.overwrite)
        mine = rank_chunks(a.num_images, a.batch_size, rank, world)
        shape = (self.mcfg.in_channels, self.mcfg.input_size, self.mcfg.input_size)
        acc = self.accumulator() if self.extractor is not None else None
        png_dir = out / "images"
        if a.png:
            png_dir.mkdir(exist_ok=True)
        resumed = generated = 0
        todo = [(k, st, en, store.has(k)) for k, st, en in mine]
        noises = _prefetch(lambda c: image_noise(a.seed, range(c[1], c[2]), shape), [c for c in todo if not c[3]])
        bar = _progress(a.num_images, rank, s.tag)
        writer = BackgroundWriter()
        t0 = time.perf_counter()
        try:
            for k, st, en, done in todo:
                part = store.load(k, en - st) if done else None
                if part is None:
                    noise = next(noises) if not done else image_noise(a.seed, range(st, en), shape)
                    y, labels = self.conditions(st, en)
                    u8 = to_uint8(self.sampler.run(noise, y.to(self.device), s.cfg))
                    images = u8.cpu().numpy()
                    writer.put(lambda k=k, im=images, lab=labels: store.save(k, im, lab))
                    generated += en - st
                else:
                    images = part[0]
                    u8 = torch.from_numpy(images).to(self.device)
                    resumed += en - st
                if acc is not None:
                    acc.add(u8, st)
                if a.png:
                    writer.put(lambda im=images, st=st: write_pngs(png_dir, im, st))
                bar.update(min((en - st) * world, bar.total - bar.n))
        finally:
            noises.close()
            bar.close()
            writer.close(raise_error=sys.exc_info()[0] is None)  # finished chunks reach disk even if interrupted
        seconds = time.perf_counter() - t0
        counts, t_max = torch.tensor([generated, resumed]), torch.tensor([seconds], dtype=torch.float64)
        if world > 1:  # host-side gloo collectives
            dist.all_reduce(counts, group=self.env.control_group)
            dist.all_reduce(t_max, op=dist.ReduceOp.MAX, group=self.env.control_group)
        generated, resumed, seconds = int(counts[0]), int(counts[1]), float(t_max[0])
        D.barrier(self.env)
        feats = acc.gather() if acc is not None else None
        row = None
        if rank == 0:
            row = self._finish(s, out, store, config, feats, generated, resumed, seconds)
        row = D.broadcast_object(self.env, row)
        if rank == 0 and not a.keep_parts:
            shutil.rmtree(store.root, ignore_errors=True)
        return row

    def conditions(self, start: int, end: int) -> tuple[Condition, np.ndarray]:
        """The condition of images [start, end) and what samples.npz records as their labels (prompt numbers)."""
        if self.prompts is None:
            y = class_labels(start, end, self.mcfg.num_classes)
            return y, y.numpy()
        return (prompt_conditions(self.encoded, start, end),
                prompt_indices(start, end, len(self.prompts)).numpy())

    def _finish(self, s: Setting, out: Path, store: PartStore, config: dict, feats, generated: int,
                resumed: int, seconds: float) -> dict:
        a = self.conf
        ks = [k for k, _, _ in chunk_ranges(a.num_images, a.batch_size)]
        image_shape = (self.mcfg.input_size, self.mcfg.input_size, self.mcfg.in_channels)
        write_samples(out, store, ks, image_shape, a.num_images, None if a.no_npz else a.npz_keys, a.batch_size)
        if self.prompts is not None:
            write_grid_captions(out / "grid_captions.txt", self.prompts, min(GRID_IMAGES, a.num_images),
                                GRID_COLUMNS)
        metrics: dict = {"num_images": a.num_images}
        if feats is not None:
            if feats[fid.POOL].shape[0] != a.num_images:
                raise RuntimeError(f"gathered {feats[fid.POOL].shape[0]} feature rows for {a.num_images} images")
            is_mean, is_std = fid.inception_score(feats[fid.LOGITS])
            metrics |= {"inception_score_mean": is_mean, "inception_score_std": is_std}
            if self.ref_stats is not None:
                metrics["fid"] = fid.frechet_distance(fid.fid_stats(feats[fid.POOL]), self.ref_stats)
        row = {
            "setting": {"ema": s.ema, "cfg": s.cfg},
            "metrics": metrics,
            "config": config,
            "checkpoint": self.ckpt_info,
            "nfe_per_image": nfe_per_image(a.steps, a.solver),
            "forward_images_per_image": forward_rows_per_image(a.steps, a.solver, a.interval, s.cfg),
            "inception": {"weights": self.weights_id, "fid_ref": str(a.fid_ref) if a.fid_ref else None,
                          "batch_size": a.fid_batch_size} if self.extractor is not None else None,
            "timing": {"seconds": round(seconds, 3), "generated": generated, "resumed": resumed,
                       "img_per_s": round(generated / seconds, 3) if seconds > 0 and generated else None,
                       "world_size": self.world, "device": str(self.device),
                       "cuda_graph": self.sampler.use_graphs},
            "outputs": {"dir": str(out), "npz": None if a.no_npz else str(out / "samples.npz"),
                        "grid": str(out / "grid.png"),
                        "grid_captions": None if self.prompts is None else str(out / "grid_captions.txt"),
                        "png_dir": str(out / "images") if a.png else None},
            "versions": _versions(),
        }
        atomic_write(out / "metrics.json", json.dumps(row, indent=2) + "\n")
        return row


def _versions() -> dict:
    out = {"torch": torch.__version__}
    with contextlib.suppress(Exception):
        import torch_fidelity

        out["torch_fidelity"] = torch_fidelity.__version__
    return out


def _progress(total: int, rank: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=rank != 0, dynamic_ncols=True, smoothing=0.1,
                file=sys.stderr)


def recipe(a: SampleConfig, meta: ModelMeta, mcfg: ModelConfig) -> tuple[float, float]:
    """(noise_scale, t_eps): the flag, else the checkpoint's recipe, else 1.0 (2.0 at >= 512 px) and 0.05."""
    noise_scale = a.noise_scale if a.noise_scale is not None else meta.noise_scale
    t_eps = a.t_eps if a.t_eps is not None else meta.t_eps
    return (float(noise_scale if noise_scale is not None else (2.0 if mcfg.input_size >= 512 else 1.0)),
            float(t_eps if t_eps is not None else 0.05))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """sample.py's parser: one flag per SampleConfig field, from its declaration."""
    p = argparse.ArgumentParser(
        prog="sample.py", usage="%(prog)s --ckpt CKPT [OPTIONS]  (sample.py --help lists them)",
        description="Generate images from a JiT checkpoint and evaluate FID/IS (torchrun-ready).",
        argument_default=argparse.SUPPRESS,
    )
    add_options(p, SampleConfig)
    return p


def print_nfe(a: SampleConfig, rank: int) -> None:
    """Print, on rank 0, the network evaluations per image of every guidance scale of the launch."""
    if rank != 0:
        return
    nfe = nfe_per_image(a.steps, a.solver)
    formula = f"2*({a.steps}-1)+1" if a.solver == "heun" else f"{a.steps}"
    for cfg in a.cfg:
        rows = forward_rows_per_image(a.steps, a.solver, a.interval, cfg)
        print(f"NFE per image: {nfe} = {formula} ({a.solver}, {a.steps} steps; cfg {cfg:g} in "
              f"({a.interval[0]:g}, {a.interval[1]:g}): guided evaluations batched as one 2B forward, "
              f"{rows} images through the net per image)", flush=True)


def run(args: argparse.Namespace | SampleConfig) -> list[dict]:
    """Sample (and evaluate) every setting of a launch; parsed flags are turned into a SampleConfig once."""
    a = args if isinstance(args, SampleConfig) else SampleConfig.from_args(args)
    a.validate()
    try:
        env = D.init_distributed(a.device)
    except ValueError as e:  # unknown device, CUDA asked for but absent
        raise UsageError(str(e)) from None
    lock = None
    try:
        lock = hold_for_run(a.out, "sample.py", env, D.rank0_print(env))
        return _run(a, env)
    finally:
        if lock is not None:
            lock.release()
        D.shutdown(env)


def _run(a: SampleConfig, env: D.DistEnv) -> list[dict]:
    rank, device = env.rank, env.device
    sd, meta = load_weight_set(a.ckpt, a.ema[0], verify=not a.skip_checksum)
    net = build_net(meta, a, device)
    prompted = bool(a.prompt or a.prompts or a.images_per_prompt)
    encoder = text_encoder_for(net, meta, device, a.text_encoder, prompted)
    sd = with_empty_text(net, sd)
    check_state_dict(net, sd, f"{meta.source or a.ckpt} [{a.ema[0]}]")
    swap_weights(net, sd)
    del sd
    if a.preset == "demo" and a.metrics:
        return [run_demo(a, net, env, meta, encoder)]
    if a.preset == "demo" and not a.num_images_given:  # --no-metrics: the judge's images, without the judge
        a = dataclasses.replace(a, num_images=DEMO_NUM_IMAGES)
    texts = None
    if encoder is not None:
        prompts = sampling_prompts(a.prompt, a.prompts)
        texts = (prompts, encode_prompts(encoder, prompts, net.cfg))
        if not a.num_images_given:
            a = dataclasses.replace(a, num_images=len(prompts) * (a.images_per_prompt or 1), num_images_given=True)
    err = None
    if rank == 0:  # every further weight set of a sweep must load before hours of sampling start
        for e in a.ema[1:]:
            try:
                load_weight_set(a.ckpt, e, net, verify=not a.skip_checksum)
            except CheckpointError as x:
                err = str(x)
                break
    err = D.broadcast_object(env, err)
    if err:
        raise CheckpointError(err)
    source = Path(meta.source or a.ckpt)
    sha = D.broadcast_object(env, checkpoint_sha256(source) if rank == 0 else None)
    ckpt_info = {"path": str(source), "kind": meta.kind, "sha256": sha,
                 "step": meta.step, "epoch": meta.epoch}
    ev = Evaluator(a, net, env, meta, ckpt_info, texts)
    print_nfe(a, rank)
    settings = [Setting(e, c) for e in a.ema for c in a.cfg]
    sweep = len(settings) > 1
    rows = []
    for i, e in enumerate(a.ema):
        if i > 0:  # the first set is already in the net
            swap_weights(net, load_weight_set(a.ckpt, e, net, verify=not a.skip_checksum)[0])
        for c in a.cfg:
            s = Setting(e, c)
            row = ev.run_setting(s, a.out / s.tag if sweep else a.out)
            rows.append(row)
            if rank == 0:
                print(json.dumps({"setting": row["setting"], "metrics": row["metrics"],
                                  "seconds": row["timing"]["seconds"]}), flush=True)
    if rank == 0 and sweep:
        write_sweep(a.out, rows)
    return rows


def best_row(rows: list[dict]) -> dict | None:
    """Lowest FID; without FID, highest Inception Score; None without metrics."""
    with_fid = [r for r in rows if "fid" in r["metrics"]]
    if with_fid:
        return min(with_fid, key=lambda r: r["metrics"]["fid"])
    with_is = [r for r in rows if "inception_score_mean" in r["metrics"]]
    return max(with_is, key=lambda r: r["metrics"]["inception_score_mean"]) if with_is else None


def write_sweep(out: Path, rows: list[dict]) -> None:
    """Write OUT/sweep.jsonl (one row per setting) and OUT/metrics.json (all rows and the best); print the best."""
    best = best_row(rows)
    lines = [json.dumps({"setting": r["setting"], "metrics": r["metrics"], "dir": r["outputs"]["dir"]}) for r in rows]
    atomic_write(out / "sweep.jsonl", "\n".join(lines) + "\n")
    summary = {"rows": rows, "best": None if best is None else {"setting": best["setting"], "metrics": best["metrics"],
                                                                "dir": best["outputs"]["dir"]}}
    atomic_write(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    if best is not None:
        key = "fid" if "fid" in best["metrics"] else "inception_score_mean"
        print(f"best: ema {best['setting']['ema']} cfg {best['setting']['cfg']:g} "
              f"({key} {best['metrics'][key]:.4f})", flush=True)


def run_demo(a: SampleConfig, net: JiT, env: D.DistEnv, meta: ModelMeta,
             encoder: TextEncoder | None = None) -> dict | None:
    """`--preset demo`: the demo evaluation of `train.py --preset demo` or `demo-text` (grid, digit accuracy)."""
    noise_scale, t_eps = recipe(a, meta, net.cfg)
    condition = None if encoder is None else demo_condition(encoder, net.cfg)
    kwargs = dict(cfg=a.cfg[0], interval=a.interval, steps=a.steps, solver=a.solver, seed=a.seed,
                  num_classes=net.cfg.num_classes if encoder is None else 10, img_size=net.cfg.input_size,
                  device=env.device, noise_scale=noise_scale, t_eps=t_eps, condition=condition)
    if a.num_images_given:
        kwargs["num_images"] = a.num_images
    result = None
    if env.is_main:
        result = evaluate_demo(net, a.out, **kwargs)
        print(f"demo evaluation: {demo_summary(result)}", flush=True)
    return D.broadcast_object(env, result)


def main(argv: list[str] | None = None) -> int:
    a = SampleConfig.from_args(build_parser().parse_args(argv))
    try:
        rows = run(a)
    except (UserError, OSError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 1 if a.preset == "demo" and a.metrics and not rows[0]["passed"] else 0
