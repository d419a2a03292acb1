"""Data-loader throughput: images/s of the DALI and torch backends on the same folder, and their ratio.

    python -m benchmarks.data --root DIR [--img-size 256 --batch-size 64 --workers 2 --batches 30]
    python -m benchmarks.data --synthetic 1024   # ImageNet-sized JPEGs made from the packaged photos
    python -m benchmarks.data --parity           # PSNR of the DALI crop vs the PIL reference, 256 and 512
    ... --dali-filter linear                     # DALI's cheaper antialiased-linear resize (default cubic)

The torch backend decodes every image (no RAM cache) with `--workers` DataLoader processes; DALI uses
`--workers` threads. Reported: wall-clock images/s over the timed batches and CPU-ms per image over
the whole run (this process plus its workers), on the device printed in the header.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jit_fast.data import build_index, build_loader, crop_geometry


def photos() -> list[np.ndarray]:
    """RGB photos shipped with scikit-learn and scikit-image (no download)."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    out = list(load_sample_images().images)
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"):
        out.append(np.asarray(getattr(sd, name)())[..., :3])
    return out


def make_synthetic(root: Path, count: int, classes: int = 8, seed: int = 0) -> Path:
    """ImageNet-like folder: random crops of the photos resized to ~500x375 (varying), JPEG q90."""
    rng = np.random.default_rng(seed)
    base = photos()
    for i in range(count):
        src = base[i % len(base)]
        h, w = src.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        long_side = int(rng.integers(400, 640))
        scale = long_side / max(ch, cw)
        img = Image.fromarray(np.ascontiguousarray(src[y : y + ch, x : x + cw]))
        img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.jpg", quality=90)
    return root


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def make_photo_folder(root: Path) -> Path:
    """The packaged photos as JPEG q95, plus copies upscaled past 2x512 so BOX halving runs."""
    for i, arr in enumerate(photos()):
        img = Image.fromarray(arr)
        (root / "photo").mkdir(parents=True, exist_ok=True)
        img.save(root / "photo" / f"p{i:02d}.jpg", quality=95)
        f = 1050 / min(img.size) + 0.1 * (i % 4)
        big = img.resize((round(img.size[0] * f), round(img.size[1] * f)), Image.BICUBIC)
        big.save(root / "photo" / f"up{i:02d}.jpg", quality=95)
    return root


def parity(root: str, workers: int, dali_filter: str = "cubic") -> None:
    """Print per-image PSNR (dB) of DALI against the PIL reference crop at 256 and 512, with mean and min."""
    scores: dict[int, list[float]] = {}
    index = build_index(root, cache=False)
    for size in (256, 512):
        kw = dict(img_size=size, batch_size=1, shuffle=False, flip=False, output="uint8", index_cache=False)
        dali = build_loader(root, backend="dali", num_workers=workers, dali_filter=dali_filter, **kw)
        ref = build_loader(root, backend="torch", num_workers=0, cache=False, **kw)
        scores[size] = []
        for (xd, _), (xt, _) in zip(dali, ref, strict=True):
            mse = ((xd.double() - xt.double()) ** 2).mean().item()
            scores[size].append(float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse))
    print(f"DALI resize filter: {dali_filter}")
    print(f"{'image':<12}{'W x H':>12}{'halvings@256':>14}{'PSNR@256':>10}{'halvings@512':>14}{'PSNR@512':>10}")
    for i, (path, (w, h)) in enumerate(zip(index.paths, index.sizes, strict=True)):
        k256, k512 = crop_geometry(w, h, 256).halvings, crop_geometry(w, h, 512).halvings
        print(
            f"{Path(path).name:<12}{f'{w}x{h}':>12}{k256:>14}{scores[256][i]:>10.2f}{k512:>14}{scores[512][i]:>10.2f}"
        )
    for size, vals in scores.items():
        finite = [v for v in vals if np.isfinite(v)]
        print(
            f"size {size}: {len(vals)} images, {len(vals) - len(finite)} bit-identical; over the others "
            f"mean {np.mean(finite):.2f} dB, min {np.min(finite):.2f} dB"
        )


def measure(root: str, backend: str, args: argparse.Namespace) -> tuple[float, float]:
    """(wall images/s over the timed batches, CPU ms per image over the whole run incl. workers)."""
    cpu0 = _cpu_seconds()
    loader = build_loader(
        root,
        img_size=args.img_size,
        batch_size=args.batch_size,
        backend=backend,
        output="float",
        num_workers=args.workers,
        cache=False,
        dali_filter=getattr(args, "dali_filter", "cubic"),
    )
    need = args.warmup + args.batches
    done, start = 0, time.perf_counter()
    while done < need:
        for _ in loader:
            done += 1
            if done == args.warmup:
                start = time.perf_counter()
            if done == need:
                break
    rate = args.batches * args.batch_size / (time.perf_counter() - start)
    del loader  # joins DataLoader workers so their CPU time is counted in RUSAGE_CHILDREN
    gc.collect()
    return rate, (_cpu_seconds() - cpu0) * 1e3 / (need * args.batch_size)


def device_label() -> str:
    """Where the numbers were measured."""
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name()}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores"


def main() -> None:
    """Run both backends on one folder and print images/s and the DALI / torch ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="ImageFolder root (class folders)")
    ap.add_argument("--synthetic", type=int, default=0, help="build N synthetic JPEGs when --root is absent")
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backends", default="dali,torch")
    ap.add_argument("--dali-filter", choices=("cubic", "linear"), default="cubic", help="DALI resize filter")
    ap.add_argument("--parity", action="store_true", help="PSNR table of DALI vs the PIL reference instead")
    args = ap.parse_args()
    if args.parity:
        with tempfile.TemporaryDirectory() as tmp:
            parity(args.root or str(make_photo_folder(Path(tmp))), args.workers, args.dali_filter)
        return
    tmp = None
    root = args.root
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = str(make_synthetic(Path(tmp.name), args.synthetic or 1024))
    print(
        f"device: {device_label()}; root {root}; size {args.img_size}; batch {args.batch_size}; "
        f"workers/threads {args.workers}; {args.batches} timed batches; DALI filter {args.dali_filter}"
    )
    build_index(root, progress=True)  # validate once, outside the timings
    rates, costs = {}, {}
    for backend in args.backends.split(","):
        rates[backend], costs[backend] = measure(root, backend, args)
        print(
            f"{backend:>6}: {rates[backend]:8.1f} images/s wall, {costs[backend]:6.2f} CPU-ms/image "
            f"({1e3 / costs[backend]:6.1f} images/s per core)"
        )
    if "dali" in rates and "torch" in rates:
        print(
            f"ratio dali/torch: {rates['dali'] / rates['torch']:.2f}x wall, "
            f"{costs['torch'] / costs['dali']:.2f}x per CPU second; load average {os.getloadavg()[0]:.1f}"
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
