"""Pre-crop an ImageFolder once: `python -m jit_fast.data.prepare SRC DST --size 256 [--format png|jpeg]`.

Each image is ADM-cropped to SIZE and written under the same class folder (PNG lossless or JPEG q95
4:4:4); finished outputs are skipped, so an interrupted run resumes. Inputs training would skip (unreadable,
not regular files, names that are not UTF-8, decompression-bomb headers, 16/32-bit pixels) are skipped and
listed; two inputs that would write the same output are refused before anything is written.
"""

from __future__ import annotations

import argparse
import os
import sys
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..files import atomic_write
from .crop import center_crop
from .index import header_problem, listing, max_pixels, open_image, scan_folder, show_path

_EXT = {"png": ".png", "jpeg": ".jpg"}


SHOWN = 50  # skipped inputs listed at the end; the rest are counted


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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="ImageFolder root (class folders)")
    ap.add_argument("dst", help="output root (created)")
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
        if not os.path.isdir(args.src):
            raise PrepareError(f"source folder {args.src} does not exist or is not a folder")
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
