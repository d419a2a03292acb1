"""ImageFolder scan (torchvision order and labels, safe on hostile trees) and a validation pass cached on disk."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from ..shared.files import atomic_write

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_INDEX_VERSION = "jit_fast-index-v2"
_UNSUPPORTED_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
MIN_PIXEL_LIMIT = 1 << 26  # 67.1 Mpx (8192 x 8192): passes camera photos, refuses absurd headers (used up to S=1024)
PIXELS_PER_TARGET = 64  # larger targets allow 64 x S^2 pixels (8x the target's side)
NAMED = 10  # skipped files named in one warning; the rest are counted


def cache_dir() -> Path:
    """Cache root: $JIT_FAST_CACHE, else ~/.cache/jit_fast."""
    env = os.environ.get("JIT_FAST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "jit_fast"


def max_pixels(img_size: int | None = None) -> int:
    """Largest header pixel count decoded for crops of `img_size`: bigger headers are decompression bombs."""
    return max(MIN_PIXEL_LIMIT, PIXELS_PER_TARGET * img_size * img_size) if img_size else MIN_PIXEL_LIMIT


def show_path(path: str) -> str:
    """Printable path: the text when it is valid UTF-8, else the repr of its raw bytes."""
    try:
        path.encode()
    except UnicodeEncodeError:
        return repr(os.fsencode(path))
    return path


def listing(items: list[str], named: int = NAMED) -> str:
    """The first `named` items joined by '; ', then a count of the rest (keeps warnings one line long)."""
    text = "; ".join(items[:named])
    return text + (f"; and {len(items) - named} more" if len(items) > named else "")


def _valid_name(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_dir(entry: os.DirEntry) -> bool:
    """entry.is_dir(), False where the stat itself fails (a link to itself raises ELOOP)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def find_classes(root: str | Path) -> list[str]:
    """Sorted class-folder names, as torchvision's ImageFolder; a name that is not UTF-8 is refused, named."""
    classes = sorted(e.name for e in os.scandir(root) if _is_dir(e))
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}")
    for name in classes:
        if not _valid_name(name):
            raise ValueError(f"class folder name is not valid UTF-8: {show_path(os.path.join(os.fspath(root), name))}")
    return classes


class Stamp(NamedTuple):
    """What identifies a file's content for the index cache: byte size, mtime and ctime in ns."""

    size: int
    mtime: int
    ctime: int


@dataclass
class FolderScan:
    """Image files of an ImageFolder in torchvision order with their stamps, and the entries skipped on the way."""

    classes: list[str]
    samples: list[tuple[str, int]]
    stamps: list[Stamp]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _link_problem(target: str, here: str, root_real: str, class_real: str, seen: bool) -> str | None:
    """Why the folder `target` (a real path) reached from real folder `here` must not be walked, or None."""
    if _within(root_real, target):
        return f"directory link to {target}, which holds the dataset root: not followed"
    if _within(target, root_real) and not _within(target, class_real):
        return f"directory link to {target}, outside its class folder: not followed (would relabel images)"
    if seen:
        if _within(here, target):
            return f"directory link loop back to {target}: not followed"
        return f"directory {target} already included through another path: not followed"
    return None


def walk_folder(
    class_dir: str, root_real: str, skipped: list[tuple[str, str]], extensions: tuple[str, ...] = IMG_EXTENSIONS
) -> list[tuple[str, list]]:
    """(folder, [(file name, Stamp)]) of one class folder, sorted by folder path as sorted(os.walk(...)).

    Only regular files whose lowercase name ends with one of `extensions` are listed.
    Folders are identified by (device, inode), so link and bind-mount loops end; real sub-folders are
    walked before directory links, so a link never displaces the folder it duplicates.
    """
    class_real = os.path.realpath(class_dir)
    try:
        st = os.stat(class_dir)
    except OSError as exc:
        skipped.append((class_dir, f"cannot stat: {exc.strerror}"))
        return []
    why = _link_problem(class_real, root_real, root_real, class_real, False)
    if why is not None:
        skipped.append((class_dir, why))
        return []
    visited = {(st.st_dev, st.st_ino)}
    folders, links, found = [(class_dir, class_real)], [], []
    while folders or links:
        if folders:
            d, d_real = folders.pop()
        else:
            d, d_real, target = links.pop(0)
            try:
                st = os.stat(d)
            except OSError as exc:
                skipped.append((d, f"cannot stat: {exc.strerror}"))
                continue
            why = _link_problem(target, d_real, root_real, class_real, (st.st_dev, st.st_ino) in visited)
            if why is not None:
                skipped.append((d, why))
                continue
            visited.add((st.st_dev, st.st_ino))
            d_real = target
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            skipped.append((d, f"cannot list folder: {exc.strerror}"))
            continue
        files = []
        for e in entries:
            is_dir = _is_dir(e)  # a link to itself is reported by the stat below when it is named like an image
            if not is_dir and not e.name.lower().endswith(extensions):
                continue
            if not _valid_name(e.name):
                skipped.append((e.path, "name is not valid UTF-8"))
                continue
            if is_dir and e.is_symlink():
                links.append((e.path, d_real, os.path.realpath(e.path)))
                continue
            try:
                st = e.stat()
            except OSError as exc:
                skipped.append((e.path, f"cannot stat: {exc.strerror}"))
                continue
            if is_dir:
                if (st.st_dev, st.st_ino) in visited:  # a bind mount, or reached earlier through a link
                    skipped.append((e.path, "folder already included through another path: not walked again"))
                else:
                    visited.add((st.st_dev, st.st_ino))
                    folders.append((e.path, os.path.join(d_real, e.name)))
            elif not stat.S_ISREG(st.st_mode):
                skipped.append((e.path, f"not a regular file ({_file_kind(st.st_mode)}): never opened"))
            else:
                files.append((e.name, Stamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns)))
        found.append((d, files))
    return sorted(found, key=lambda item: item[0])


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"))
    return next((name for test, name in kinds if test(mode)), "block device" if stat.S_ISBLK(mode) else "special")


def scan_folder(root: str | Path) -> FolderScan:
    """Image files of ImageFolder `root` in torchvision order, labels as torchvision; hostile entries skipped.

    Only regular files are kept (a FIFO is never opened); names that are not UTF-8 are skipped; directory
    links are followed unless they loop, duplicate a folder or lead into another class folder or above the root.
    Empty classes keep their label (torchvision allow_empty numbering) and are warned about in one line.
    """
    root = os.fspath(root)
    classes = find_classes(root)
    root_real = os.path.realpath(root)
    scan = FolderScan(classes, [], [])
    for label, name in enumerate(classes):
        before = len(scan.samples)
        for dirpath, files in walk_folder(os.path.join(root, name), root_real, scan.skipped):
            for fname, st in files:
                scan.samples.append((os.path.join(dirpath, fname), label))
                scan.stamps.append(st)
        if len(scan.samples) == before:
            scan.empty.append(name)
    if scan.empty:
        names = listing([f"{n!r} (label {classes.index(n)})" for n in scan.empty])
        warnings.warn(f"{len(scan.empty)} empty class folders under {root!r}, labels kept: {names}", stacklevel=2)
    return scan


def _too_big(w: int, h: int, limit: int) -> str:
    return f"header claims {w}x{h} = {w * h / 1e6:.0f} Mpx, over the {limit / 1e6:.0f} Mpx limit (decompression bomb?)"


def header_problem(img: Image.Image, limit: int) -> str | None:
    """Why an opened (not yet decoded) image must be skipped: too many pixels claimed, or deep pixels; else None."""
    w, h = img.size
    if w * h > limit:
        return _too_big(w, h, limit)
    if img.mode in _UNSUPPORTED_MODES:
        return f"unsupported {img.mode} pixels (16/32-bit: PIL's RGB conversion clips where DALI rescales)"
    return None


def open_image(path: str) -> Image.Image:
    """PIL's lazy open (header only) without PIL's own decompression-bomb warning: header_problem() decides."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


class _Probe(NamedTuple):
    status: str  # "ok": decodes; "big": header over the limit probed with, not decoded; "bad": see why
    width: int
    height: int
    why: str


def _probe(path: str, limit: int) -> _Probe:
    """Header check, then a full decode (reduced-scale JPEG DCT, which still reads every coded byte)."""
    try:
        with open_image(path) as img:
            w, h = img.size
            why = header_problem(img, limit)
            if why is not None:
                return _Probe("big" if w * h > limit else "bad", w, h, why)
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.convert("RGB").load()
        return _Probe("ok", w, h, "")
    except Exception as exc:  # any decoder failure means: skip this file
        return _Probe("bad", -1, -1, f"{type(exc).__name__}: {exc}")


def probe_image(path: str, limit: int = MIN_PIXEL_LIMIT) -> tuple[int, int] | str:
    """(width, height) when the file decodes and its header is within `limit` pixels, else why it is skipped."""
    res = _probe(path, limit)
    return (res.width, res.height) if res.status == "ok" else res.why


@dataclass
class FolderIndex:
    """Validated dataset: classes, sample paths, labels and header sizes; `bad` lists every skipped file."""

    root: str
    classes: list[str]
    paths: list[str]
    labels: list[int]
    sizes: list[tuple[int, int]]
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def summary(self, named: int = 20) -> str:
        """One-line count of kept and skipped files, naming the first `named` skipped ones."""
        text = f"{len(self.paths)} images in {len(self.classes)} classes, {len(self.bad)} skipped"
        if self.bad:
            text += ": " + listing([f"{show_path(p)} ({why})" for p, why in self.bad], named)
        return text


class _Record(NamedTuple):
    stamp: Stamp
    probe: _Probe


def _cache_file(root: str, cache: bool | str | Path) -> Path:
    if not isinstance(cache, bool):
        return Path(cache)
    return cache_dir() / "index" / f"{hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:20]}.tsv"


def _header(root: str) -> str:
    return f"{_INDEX_VERSION}\t{os.path.abspath(root)}"


def _read_cache(path: Path, root: str) -> dict[str, _Record]:
    """Cached probe results by path relative to root; empty when missing, of another version or another root."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeError):
        return {}
    if not lines or lines[0] != _header(root):
        return {}
    records = {}
    try:
        for line in lines[1:]:
            status, rel, size, mtime, ctime, w, h, why = line.split("\t")
            records[rel] = _Record(Stamp(int(size), int(mtime), int(ctime)), _Probe(status, int(w), int(h), why))
    except ValueError:  # a damaged cache only costs a full validation
        log.warning("ignoring the damaged data index cache %s", path)
        return {}
    return records


def _write_cache(path: Path, root: str, records: dict[str, _Record]) -> None:
    """Atomic rewrite (unique temporary name: ranks of several nodes may share the cache folder)."""
    rows = [_header(root)]
    for rel, (st, pr) in records.items():
        if "\t" not in rel and "\n" not in rel:  # such names are simply re-probed every run
            rows.append(f"{pr.status}\t{rel}\t{st.size}\t{st.mtime}\t{st.ctime}\t{pr.width}\t{pr.height}\t"
                        + pr.why.replace("\t", " ").replace("\n", " "))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "\n".join(rows) + "\n", fsync=False)
    except (OSError, UnicodeError) as exc:  # a read-only cache only costs the next run a re-validation
        log.warning("could not write the data index cache %s: %s", path, exc)


def build_index(
    root: str | Path,
    *,
    img_size: int | None = None,
    num_workers: int | None = None,
    cache: bool | str | Path = True,
    progress: bool | None = None,
) -> FolderIndex:
    """Scan and validate `root`; files unchanged since the cached pass (size, mtime, ctime) are not re-decoded.

    Headers over max_pixels(img_size) are skipped before decoding. `cache` True keeps the index under
    cache_dir()/index (one file per root), a path puts it there, False disables it; `progress` None shows a
    tqdm bar for more than 10k files to validate. Skipped files are summarized in one warning.
    """
    root = os.fspath(root)
    index = validate_scan(root, scan_folder(root), img_size=img_size, num_workers=num_workers, cache=cache,
                          progress=progress)
    _report(index)
    return index


def validate_scan(
    root: str,
    scan: FolderScan,
    *,
    img_size: int | None = None,
    num_workers: int | None = None,
    cache: bool | str | Path = True,
    progress: bool | None = None,
) -> FolderIndex:
    """The decodable files of `scan` (labels kept) and the skipped ones, probed once and cached as `build_index`."""
    limit = max_pixels(img_size)
    cache_file = _cache_file(root, cache) if cache else None
    cached = _read_cache(cache_file, root) if cache_file is not None else {}
    rels = [os.path.relpath(p, root) for p, _ in scan.samples]
    records: dict[str, _Record] = {}
    todo: list[int] = []
    for i, (rel, st) in enumerate(zip(rels, scan.stamps, strict=True)):
        rec = cached.get(rel)
        big_now_allowed = rec is not None and rec.probe.status == "big" and rec.probe.width * rec.probe.height <= limit
        if rec is None or rec.stamp != st or big_now_allowed:
            todo.append(i)
        else:
            records[rel] = rec
    paths = [scan.samples[i][0] for i in todo]
    progress = len(paths) > 10_000 if progress is None else progress
    probe = functools.partial(_probe, limit=limit)
    workers = num_workers if num_workers is not None else min(os.cpu_count() or 1, 8)
    if workers > 1 and len(paths) > 256:
        with get_context("fork").Pool(workers) as pool:
            results = list(_progress(pool.imap(probe, paths, chunksize=64), len(paths), progress))
    else:
        results = list(_progress(map(probe, paths), len(paths), progress))
    for i, res in zip(todo, results, strict=True):
        records[rels[i]] = _Record(scan.stamps[i], res)
    index = FolderIndex(root, scan.classes, [], [], [], [])
    for (path, label), rel in zip(scan.samples, rels, strict=True):
        pr = records[rel].probe
        if pr.status == "bad":
            index.bad.append((path, pr.why))
        elif pr.width * pr.height > limit:  # the text names this run's limit, whatever the cached probe used
            index.bad.append((path, _too_big(pr.width, pr.height, limit)))
        else:
            index.paths.append(path)
            index.labels.append(label)
            index.sizes.append((pr.width, pr.height))
    index.bad += scan.skipped
    if cache_file is not None and (todo or set(cached) != set(records)):
        _write_cache(cache_file, root, records)
    return index


def _progress(it: Iterable, total: int, enabled: bool) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="validating images", unit="img")


def _report(index: FolderIndex) -> None:
    if index.bad:
        n, named = len(index.bad), listing([f"{show_path(p)} ({why})" for p, why in index.bad])
        warnings.warn(f"skipping {n} file{'s' * (n != 1)} under {index.root!r}: {named}", stacklevel=3)
    if not index.paths:
        raise RuntimeError(f"no readable images under {index.root}: {index.summary()}")
    log.info("data index: %s", index.summary())
