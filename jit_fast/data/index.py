"""ImageFolder scan (torchvision order and labels) and a one-time validation pass cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_INDEX_VERSION = "jit_fast-index-v1"
_UNSUPPORTED_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")


def cache_dir() -> Path:
    """Cache root: $JIT_FAST_CACHE, else ~/.cache/jit_fast."""
    env = os.environ.get("JIT_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "jit_fast"


def find_classes(root: str | Path) -> list[str]:
    """Sorted class-folder names, as torchvision's ImageFolder."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}")
    return classes


def scan_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, label)]) in torchvision ImageFolder order; empty classes keep their label and warn."""
    root = os.fspath(root)
    classes = find_classes(root)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        before = len(samples)
        for dirpath, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, fname), label))
        if len(samples) == before:
            warnings.warn(f"empty class folder {os.path.join(root, name)!r} (label {label} kept)", stacklevel=2)
    return classes, samples


def probe_image(path: str) -> tuple[int, int] | str:
    """Decode a file fully (reduced-scale JPEG DCT for speed) and return (width, height), or an error text.

    High-bit-depth images are rejected: PIL's RGB conversion clips them where DALI rescales.
    """
    try:
        with Image.open(path) as img:
            size = img.size
            if img.mode in _UNSUPPORTED_MODES:
                return f"unsupported {img.mode} pixels (backends would disagree)"
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.convert("RGB").load()
        return size
    except Exception as exc:  # any decoder failure means: skip this file
        return f"{type(exc).__name__}: {exc}"


@dataclass
class FolderIndex:
    """Validated dataset: classes, sample paths, labels and header sizes; `bad` lists skipped files."""

    root: str
    classes: list[str]
    paths: list[str]
    labels: list[int]
    sizes: list[tuple[int, int]]
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self) -> str:
        """One-line count of kept and skipped files, naming the skipped ones."""
        text = f"{len(self.paths)} images in {len(self.classes)} classes, {len(self.bad)} skipped"
        if self.bad:
            text += ": " + "; ".join(f"{p} ({why})" for p, why in self.bad)
        return text


def _listing_key(root: str, samples: list[tuple[str, int]]) -> str:
    h = hashlib.sha1(os.path.abspath(root).encode())
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\0{label}\0{os.path.getsize(path)}\n".encode())
    return h.hexdigest()[:20]


def _read_cache(path: Path, root: str, classes: list[str], key: str) -> FolderIndex | None:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    if not lines or lines[0] != f"{_INDEX_VERSION}\t{key}":
        return None
    index = FolderIndex(root, classes, [], [], [], [])
    for line in lines[1:]:
        kind, rel, *rest = line.split("\t")
        full = os.path.join(root, rel)
        if kind == "ok":
            index.paths.append(full)
            index.labels.append(int(rest[0]))
            index.sizes.append((int(rest[1]), int(rest[2])))
        else:
            index.bad.append((full, rest[0]))
    return index


def _write_cache(path: Path, index: FolderIndex, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{_INDEX_VERSION}\t{key}"]
    for p, lab, (w, h) in zip(index.paths, index.labels, index.sizes, strict=True):
        rows.append(f"ok\t{os.path.relpath(p, index.root)}\t{lab}\t{w}\t{h}")
    rows += [f"bad\t{os.path.relpath(p, index.root)}\t{why.replace(chr(9), ' ')}" for p, why in index.bad]
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)


def build_index(
    root: str | Path,
    *,
    num_workers: int | None = None,
    cache: bool | str | Path = True,
    progress: bool | None = None,
) -> FolderIndex:
    """Scan and validate `root` once (cached by listing); bad files are skipped with a warning naming them.

    `cache` True keeps the index under cache_dir()/index, a path puts it there, False disables it;
    `progress` None shows a tqdm bar for more than 10k files.
    """
    root = os.fspath(root)
    classes, samples = scan_folder(root)
    cache_file: Path | None = None
    key = ""
    if cache and not any("\t" in p or "\n" in p for p, _ in samples):  # the TSV cannot hold those names
        key = _listing_key(root, samples)
        cache_file = Path(cache) if not isinstance(cache, bool) else cache_dir() / "index" / f"{key}.tsv"
        index = _read_cache(cache_file, root, classes, key)
        if index is not None and len(index.paths) + len(index.bad) == len(samples):
            _report(index)
            return index
    progress = len(samples) > 10_000 if progress is None else progress
    paths = [p for p, _ in samples]
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and len(paths) > 256:
        with get_context("fork").Pool(workers) as pool:
            results = list(_progress(pool.imap(probe_image, paths, chunksize=64), len(paths), progress))
    else:
        results = list(_progress(map(probe_image, paths), len(paths), progress))
    index = FolderIndex(root, classes, [], [], [], [])
    for (path, label), res in zip(samples, results, strict=True):
        if isinstance(res, str):
            index.bad.append((path, res))
        else:
            index.paths.append(path)
            index.labels.append(label)
            index.sizes.append(res)
    if cache_file is not None:
        _write_cache(cache_file, index, key)
    _report(index)
    return index


def _progress(it: Iterable, total: int, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="validating images", unit="img")


def _report(index: FolderIndex) -> None:
    for path, why in index.bad:
        warnings.warn(f"skipping unreadable image {path!r}: {why}", stacklevel=3)
    if not index.paths:
        raise RuntimeError(f"no readable images under {index.root}: {index.summary()}")
    log.info("data index: %s", index.summary())
