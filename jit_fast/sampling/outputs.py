"""What `sample.py` writes: resumable chunk parts, the streamed samples.npz, PNGs and the grid.

Every file is written atomically (`jit_fast.shared.files.atomic_write`) with its size, so a kill leaves no torn file
and a full disk is one line naming the file and the space it needs.
"""

from __future__ import annotations

import itertools
import json
import queue
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from jit_fast.shared import distributed as D
from jit_fast.shared.errors import UsageError
from jit_fast.shared.files import atomic_write

ArraySpec = tuple[tuple[int, ...], np.dtype, Callable[[], Iterator[np.ndarray]]]
GRID_IMAGES = 64
GRID_COLUMNS = 8


def save_png(path: Path, image: np.ndarray, fsync: bool = True) -> None:
    """Write one uint8 HWC image as a PNG, atomically (its raw size as the space needed)."""
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"), fsync=fsync, size=image.nbytes)


def save_grid(images: np.ndarray, path: Path, cols: int = GRID_COLUMNS) -> None:
    """Save uint8 NHWC images as one PNG grid with 2-pixel gaps."""
    save_png(path, grid_canvas(images, cols))


def grid_canvas(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """uint8 NHWC images tiled into one HWC image, `cols` per row, white 2-pixel gaps."""
    n, h, w, c = images.shape
    cols = min(cols, n)
    rows = -(-n // cols)
    gap = 2
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        canvas[r * (h + gap) : r * (h + gap) + h, q * (w + gap) : q * (w + gap) + w] = img
    return canvas


def write_npz_streaming(path: Path, arrays: dict[str, ArraySpec]) -> None:
    """Write an uncompressed .npz whose arrays come in chunks: {key: (shape, dtype, chunk iterator factory)}.

    np.load reads it like np.savez output; nothing is held in memory beyond one chunk.
    """

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, (shape, dtype, chunks) in arrays.items():
                with zf.open(key + ".npy", "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                              "shape": tuple(shape)}
                    np.lib.format.write_array_header_1_0(member, header)
                    written = 0
                    for block in chunks():
                        block = np.ascontiguousarray(block, dtype=dtype)
                        member.write(block.tobytes())
                        written += block.shape[0]
                    if written != shape[0]:
                        raise RuntimeError(f"{key}: wrote {written} rows, expected {shape[0]}")

    size = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype, _ in arrays.values())
    atomic_write(path, write, size=size)


def write_pngs(folder: Path, images: np.ndarray, start: int) -> None:
    """Write images as folder/NNNNNN.png numbered from `start`, keeping files already there."""
    for j, img in enumerate(images):
        p = folder / f"{start + j:06d}.png"
        if not p.exists():
            save_png(p, img, fsync=False)


class PartStore:
    """Finished chunks on disk (`parts/chunk_K.npz`) for resuming, tied to one run fingerprint."""

    def __init__(self, env: D.DistEnv, root: Path, fingerprint: dict, overwrite: bool = False) -> None:
        self.root = root
        run_file = root / "run.json"
        mismatch = None
        if env.is_main:
            if run_file.is_file():
                old = _read_run_file(run_file)
                if old != fingerprint:
                    diff = "unreadable run.json" if old is None else "different " + ", ".join(
                        sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)))
                    if overwrite:
                        shutil.rmtree(root)
                    else:
                        mismatch = f"{root} holds chunks of another run ({diff}); use another --out or pass --overwrite"
            if mismatch is None:
                root.mkdir(parents=True, exist_ok=True)
                atomic_write(run_file, json.dumps(fingerprint, indent=1, sort_keys=True))
        mismatch = D.broadcast_object(env, mismatch)
        if mismatch:
            raise UsageError(mismatch)
        D.barrier(env)

    def path(self, k: int) -> Path:
        """File of chunk k."""
        return self.root / f"chunk_{k:07d}.npz"

    def has(self, k: int) -> bool:
        """Whether chunk k is on disk (it may still be torn: `load` checks)."""
        return self.path(k).is_file()

    def load(self, k: int, n: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(images, labels) of chunk k if it holds n readable rows, else None (regenerate it)."""
        p = self.path(k)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as data:
                images, labels = data["images"], data["labels"]
        except Exception:
            return None  # a torn or foreign file: regenerate the chunk
        return (images, labels) if images.shape[0] == n == labels.shape[0] else None

    def save(self, k: int, images: np.ndarray, labels: np.ndarray) -> None:
        """Store chunk k atomically."""
        atomic_write(self.path(k), lambda f: np.savez(f, images=images, labels=labels), fsync=False,
                     size=images.nbytes + labels.nbytes)

    def chunks(self, ks: list[int], key: str) -> Callable[[], Iterator[np.ndarray]]:
        """Factory of an iterator over array `key` of chunks ks, in order, one file open at a time."""

        def it() -> Iterator[np.ndarray]:
            for k in ks:
                with np.load(self.path(k), allow_pickle=False) as data:
                    yield data[key]

        return it


def _read_run_file(path: Path) -> dict | None:
    """The fingerprint stored in parts/run.json, or None when the file is not one (garbage, torn, foreign)."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return old if isinstance(old, dict) else None


def write_samples(out: Path, store: PartStore, ks: list[int], image_shape: tuple[int, int, int], num_images: int,
                  npz_keys: str | None, batch_size: int) -> None:
    """Stream the parts into out/samples.npz (keys "both", "named", "adm"; None: no npz) and write out/grid.png."""
    if npz_keys is not None:
        arrays: dict[str, ArraySpec] = {}
        img = ((num_images, *image_shape), np.uint8, store.chunks(ks, "images"))
        lab = ((num_images,), np.int64, store.chunks(ks, "labels"))
        if npz_keys in ("both", "named"):
            arrays |= {"images": img, "labels": lab}
        if npz_keys in ("both", "adm"):
            arrays |= {"arr_0": img, "arr_1": lab}
        write_npz_streaming(out / "samples.npz", arrays)
    first = itertools.islice(store.chunks(ks, "images")(), -(-GRID_IMAGES // batch_size))  # images 0..63
    save_grid(np.concatenate(list(first))[:GRID_IMAGES], out / "grid.png")


class BackgroundWriter:
    """One background thread for disk writes (chunk parts, PNGs) so they overlap the sampling."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.q.get()) is not None:
            if self.error is None:
                try:
                    job()
                except BaseException as e:  # re-raised in the main thread
                    self.error = e

    def put(self, job: Callable[[], object]) -> None:
        """Queue a job; raises the error of an earlier failed job."""
        if self.error is not None:
            raise self.error
        self.q.put(job)

    def close(self, raise_error: bool = True) -> None:
        """Finish the queued jobs and stop the thread; re-raise a job's error unless told not to."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None and raise_error:
            raise self.error
