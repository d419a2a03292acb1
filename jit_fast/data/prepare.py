"""Pre-crop an ImageFolder once: `python -m jit_fast.data.prepare SRC DST --size 256 [--format png|jpeg]`.

Each image is ADM-cropped to SIZE and written under the same class folder (PNG lossless or JPEG q95
4:4:4); finished outputs are skipped, so an interrupted run resumes. Inputs training would skip (unreadable,
not regular files, names that are not UTF-8, decompression-bomb headers, 16/32-bit pixels) are skipped and
listed; two inputs that would write the same output are refused before anything is written.

`python -m jit_fast.data.prepare --imagenette DIR [--size 256]` first fetches ImageNette (10 ImageNet classes,
9469 train + 3925 val images) with torchvision's `Imagenette` downloader (network; md5-checked; an archive already
extracted under DIR/download is used as it is), then pre-crops its train and val splits into DIR/train and DIR/val:
`train.py --preset imagenette` reads DIR (data/imagenette by default). The download is kept.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from ..shared.errors import UserError
from ..shared.files import atomic_write
from .crop import center_crop
from .index import header_problem, listing, max_pixels, open_image, scan_folder, show_path

_EXT = {"png": ".png", "jpeg": ".jpg"}


SHOWN = 50  # skipped inputs listed at the end; the rest are counted
# ImageNette variants (torchvision's `size`) and the folder each archive extracts to (fastai's layout: train/ and
# val/ of WordNet-ID class folders); the 320px and 160px variants are resized to that shorter side.
IMAGENETTE = {"full": "imagenette2", "320px": "imagenette2-320", "160px": "imagenette2-160"}
IMAGENETTE_SPLITS = ("train", "val")


class PrepareError(UserError, ValueError):
    """A user error of the prepare tool, reported as one line naming the file or option."""


def output_path(src_root: str, dst_root: str, path: str, fmt: str) -> str:
    """Destination of `path`: same relative folder and stem, extension of the chosen format."""
    rel = os.path.relpath(path, src_root)
    return os.path.join(dst_root, os.path.splitext(rel)[0] + _EXT[fmt])


def _crop_one(job: tuple[str, str, int, str, int]) -> str | None:
    src, dst, size, fmt, quality = job
    if os.path.exists(dst):
        return None
    try:
        with open_image(src) as img:  # the same header rules as training's index
            why = header_problem(img, max_pixels(size))
            if why is not None:
                return f"{show_path(src)}: {why}"
            arr = center_crop(img, size)
    except Exception as exc:  # unreadable input: report, keep going
        return f"{show_path(src)}: {type(exc).__name__}: {exc}"
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    opts = {"format": "PNG"} if fmt == "png" else {"format": "JPEG", "quality": quality, "subsampling": 0}
    atomic_write(dst, lambda f: Image.fromarray(arr).save(f, **opts), fsync=False)  # one fsync per image is slow
    return None


def prepare(
    src: str | Path, dst: str | Path, size: int = 256, fmt: str = "png", quality: int = 95, workers: int = 1
) -> list[str]:
    """Write the ADM-cropped copy of ImageFolder `src` into `dst`; returns the messages of skipped files.

    Raises PrepareError (nothing written) when two inputs map to one output, e.g. one.jpg and one.png.
    """
    from tqdm import tqdm

    src, dst = os.fspath(src), os.fspath(dst)
    scan = scan_folder(src)
    jobs = [(p, output_path(src, dst, p, fmt), size, fmt, quality) for p, _ in scan.samples]
    first: dict[str, str] = {}
    clashes = []
    for p, out, *_ in jobs:
        if out in first:
            clashes.append(f"{first[out]} and {p} both become {out}")
        first.setdefault(out, p)
    if clashes:
        raise PrepareError(listing(clashes, 3) + " (same stem, different extension: rename one)")
    for name in scan.classes:
        os.makedirs(os.path.join(dst, name), exist_ok=True)
    todo = [j for j in jobs if not os.path.exists(j[1])]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="img", desc=f"cropping to {size}")
    failures: list[str] = []
    if workers > 1:
        with get_context("fork").Pool(workers) as pool:
            results = pool.imap_unordered(_crop_one, todo, chunksize=16)
            for res in results:
                bar.update()
                if res:
                    failures.append(res)
    else:
        for job in todo:
            res = _crop_one(job)
            bar.update()
            if res:
                failures.append(res)
    bar.close()
    return [f"{show_path(p)}: {why}" for p, why in scan.skipped] + sorted(failures)


def fetch_imagenette(root: str | Path, variant: str = "320px") -> Path:
    """Download and extract ImageNette `variant` under root/download with torchvision's downloader (skipped when
    its folder is already there); return the extracted folder (train/ and val/ of class folders)."""
    from torchvision.datasets import Imagenette

    download = Path(root) / "download"
    try:
        for split in IMAGENETTE_SPLITS:  # one archive holds both splits: the second call finds it extracted
            Imagenette(download, split=split, size=variant, download=True)
    except (OSError, RuntimeError) as exc:  # no network, a corrupt archive (md5), a full disk
        raise PrepareError(f"could not fetch ImageNette {variant} into {download}: {exc}") from exc
    return download / IMAGENETTE[variant]


def prepare_imagenette(root: str | Path, size: int = 256, fmt: str = "png", quality: int = 95, workers: int = 1,
                       variant: str = "320px") -> list[str]:
    """Fetch ImageNette into root/download and pre-crop its splits into root/train and root/val; skipped files."""
    if variant != "full" and size > int(variant.removesuffix("px")):
        raise PrepareError(f"--size {size} is larger than the {variant} ImageNette images: use --imagenette-size full")
    extracted = fetch_imagenette(root, variant)
    failures = []
    for split in IMAGENETTE_SPLITS:
        failures += prepare(extracted / split, Path(root) / split, size, fmt, quality, workers)
    return failures


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", help="ImageFolder root (class folders)")
    ap.add_argument("dst", nargs="?", help="output root (created)")
    ap.add_argument("--imagenette", metavar="DIR", default=None,
                    help="download ImageNette into DIR/download, pre-crop it into DIR/train and DIR/val")
    ap.add_argument("--imagenette-size", choices=sorted(IMAGENETTE), default="320px",
                    help="ImageNette variant to download (full: original sizes, 1.5 GB; 320px: ~0.3 GB)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--format", choices=sorted(_EXT), default="png")
    ap.add_argument("--quality", type=int, default=95, help="JPEG quality")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    try:
        for flag, value, low, high in (("--size", args.size, 1, None), ("--quality", args.quality, 1, 100),
                                       ("--workers", args.workers, 1, None)):
            if value < low or (high is not None and value > high):
                raise PrepareError(f"{flag} must be in [{low}, {high or 'inf'}], got {value}")
        if args.imagenette is not None:
            if args.src is not None:
                raise PrepareError("--imagenette DIR takes no SRC DST folders")
            failures = prepare_imagenette(args.imagenette, args.size, args.format, args.quality, args.workers,
                                          args.imagenette_size)
        elif args.src is None or args.dst is None:
            raise PrepareError("give SRC and DST folders, or --imagenette DIR")
        elif not os.path.isdir(args.src):
            raise PrepareError(f"source folder {args.src} does not exist or is not a folder")
        else:
            failures = prepare(args.src, args.dst, args.size, args.format, args.quality, args.workers)
    except (UserError, FileNotFoundError, ValueError) as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 2
    for msg in failures[:SHOWN]:
        print(f"skipped {msg}", file=sys.stderr)
    more = f" ({len(failures) - SHOWN} not listed)" if len(failures) > SHOWN else ""
    print(f"done: {len(failures)} skipped{more}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
