"""DALI backend: validated files fed in plan order, JPEG decode (mixed on GPU, cpu otherwise), ADM crop.

The crop geometry is computed inside the pipeline from the encoded header (peek_image_shape):
BOX halvings are averages of four shifted nearest-neighbour resamples (bit-exact to PIL for even
sizes), then an antialiased resize to the ADM size fused with the center crop and the flip: cubic (the
PIL BICUBIC match, default) or linear (antialiased triangle, about a third cheaper on CPU, ~44 dB from PIL).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from .crop import crop_geometry
from .index import FolderIndex, probe_image
from .order import EpochPlan
from .torch_backend import CropDataset

_MAX_CONSECUTIVE_FAILURES = 3
FILTERS = ("cubic", "linear")  # DALI resize filter of the final ADM resize (the BOX halvings are exact either way)

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode
    from nvidia.dali.pipeline import Pipeline


def _python_round_scaled(x: DataNode, m: DataNode, size: int) -> DataNode:
    """Python's round(x * (size / m)): the same float64 operations, then round half to even."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    f64, i64 = types.FLOAT64, types.INT64
    v = fn.cast(x, dtype=f64) * (size / fn.cast(m, dtype=f64))
    low = dmath.floor(v)
    frac = v - low
    base = fn.cast(low, dtype=i64)
    tie_to_odd = (frac == 0.5) & (base % 2 == 1)
    return base + fn.cast(frac > 0.5, dtype=i64) + fn.cast(tie_to_odd, dtype=i64)


def dali_geometry(shape: DataNode, size: int, max_halvings: int) -> tuple:
    """ADM geometry as DALI nodes from an (H, W, C) header shape, exactly as crop_geometry() computes it.

    Returns ([(halve?, h, w) before each unrolled stage], h, w after halving, resized h, w, top, left).
    """
    import nvidia.dali.math as dmath

    h, w = shape[0], shape[1]
    stages = []
    for _ in range(max_halvings):
        do = dmath.min(h, w) >= 2 * size
        stages.append((do, h, w))
        h = h // 2 * do + h * (1 - do)
        w = w // 2 * do + w * (1 - do)
    m = dmath.min(h, w)
    rh, rw = _python_round_scaled(h, m, size), _python_round_scaled(w, m, size)
    return stages, h, w, rh, rw, (rh - size) // 2, (rw - size) // 2


def _box_halve(img: DataNode, h: DataNode, w: DataNode) -> DataNode:
    """PIL BOX reduction of (h, w) to (h//2, w//2): mean of the 2x2 nearest samples, PIL's two-pass rounding."""
    from nvidia.dali import fn, types

    hf, wf = fn.cast(h, dtype=types.FLOAT), fn.cast(w, dtype=types.FLOAT)
    oh, ow = fn.cast(h // 2, dtype=types.FLOAT), fn.cast(w // 2, dtype=types.FLOAT)
    zero = hf * 0  # per-sample scalar node: fn.stack takes nodes only

    def sample(dy: float, dx: float) -> DataNode:
        """Nearest-neighbour halving with the source window shifted by (dy, dx) pixels."""
        out = fn.resize(
            img,
            resize_y=oh,
            resize_x=ow,
            roi_start=fn.stack(zero + dy, zero + dx),
            roi_end=fn.stack(hf + dy, wf + dx),
            interp_type=types.INTERP_NN,
            antialias=False,
        )
        return fn.cast(out, dtype=types.UINT16)

    top = (sample(-0.5, -0.5) + sample(-0.5, 0.5) + 1) // 2
    bottom = (sample(0.5, -0.5) + sample(0.5, 0.5) + 1) // 2
    return fn.cast((top + bottom + 1) // 2, dtype=types.UINT8)


def adm_crop_nodes(
    encoded: DataNode, flips: DataNode, size: int, max_halvings: int, decode_device: str, resize_filter: str = "cubic"
) -> DataNode:
    """DALI graph: encoded images -> ADM-cropped, optionally flipped uint8 CHW images.

    resize_filter "cubic" (PIL's BICUBIC, antialiased) or "linear" (antialiased triangle: cheaper, less faithful).
    """
    from nvidia.dali import fn, types

    if resize_filter not in FILTERS:
        raise ValueError(f"DALI resize filter must be one of {', '.join(FILTERS)}, got {resize_filter!r}")
    interp = types.INTERP_CUBIC if resize_filter == "cubic" else types.INTERP_LINEAR

    shape = fn.peek_image_shape(encoded, adjust_orientation=False)
    images = fn.decoders.image(
        encoded,
        device=decode_device,
        output_type=types.RGB,
        adjust_orientation=False,
        jpeg_fancy_upsampling=True,
    )
    stages, h, w, rh, rw, top, left = dali_geometry(shape, size, max_halvings)
    for do, sh, sw in stages:
        if do:
            images = _box_halve(images, sh, sw)
    pos_y = fn.cast(top, dtype=types.FLOAT) / fn.cast(rh - size + (rh == size), dtype=types.FLOAT)
    pos_x = fn.cast(left, dtype=types.FLOAT) / fn.cast(rw - size + (rw == size), dtype=types.FLOAT)
    images = fn.resize_crop_mirror(
        images,
        resize_y=fn.cast(rh, dtype=types.FLOAT),
        resize_x=fn.cast(rw, dtype=types.FLOAT),
        crop=(size, size),
        crop_pos_y=pos_y,
        crop_pos_x=pos_x,
        mirror=flips,
        interp_type=interp,
        antialias=True,
    )
    return fn.transpose(images, perm=[2, 0, 1])


def max_halvings(index: FolderIndex, size: int) -> int:
    """Largest number of BOX halvings any indexed image needs (unrolled stages in the pipeline)."""
    return max((crop_geometry(w, h, size).halvings for w, h in index.sizes), default=0)


class _Feed:
    """external_source callback: file paths (as bytes, read by DALI), labels and flips of the next planned batch."""

    def __init__(self, index: FolderIndex) -> None:
        self.paths, self.labels = index.paths, np.asarray(index.labels, dtype=np.int64)
        self.pending: Iterator[tuple[np.ndarray, np.ndarray]] = iter(())

    def __call__(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        idx, flips = next(self.pending)  # StopIteration ends the DALI epoch
        names = [np.frombuffer(self.paths[i].encode(), dtype=np.uint8) for i in idx.tolist()]
        return names, self.labels[idx], flips.astype(np.int32)


class DaliBackend:
    """One persistent DALI pipeline fed batch by batch from the shared plan (rebuilt only after an abandoned pass)."""

    def __init__(
        self,
        index: FolderIndex,
        size: int,
        *,
        batch_size: int,
        num_threads: int,
        prefetch: int,
        device: torch.device | None,
        resize_filter: str = "cubic",
    ) -> None:
        if resize_filter not in FILTERS:
            raise ValueError(f"dali_filter must be one of {', '.join(FILTERS)}, got {resize_filter!r}")
        self.size, self.batch_size, self.resize_filter = size, batch_size, resize_filter
        self.num_threads, self.prefetch = num_threads, prefetch
        self.halvings = max_halvings(index, size)
        use_gpu = torch.cuda.is_available() and (device is None or device.type == "cuda")
        self.device_id: int | None = None
        if use_gpu:
            explicit = device is not None and device.index is not None
            self.device_id = device.index if explicit else torch.cuda.current_device()
        self.feed = _Feed(index)
        self.reference = CropDataset(index, size)
        self.iterator = None
        self.clean = False

    def _pipeline(self) -> Pipeline:
        from nvidia.dali import fn, pipeline_def

        decode = "mixed" if self.device_id is not None else "cpu"

        @pipeline_def(enable_conditionals=self.halvings > 0)
        def pipe():
            names, labels, flips = fn.external_source(source=self.feed, num_outputs=3, batch=True)
            encoded = fn.io.file.read(names)
            return adm_crop_nodes(encoded, flips, self.size, self.halvings, decode, self.resize_filter), labels

        return pipe(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            exec_dynamic=True,
        )

    def iterate(self, plan: EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the plan in order: uint8 (B,3,S,S) images and int64 labels.

        A batch DALI fails on (a file broken after validation) is produced by the PIL reference instead,
        with a warning naming the files; the pipeline is rebuilt and continues with the next batch.
        Failures on several consecutive batches are not a bad file and are raised.
        """
        done, failures = 0, 0
        while done < len(plan):
            try:
                for batch in self._run(plan.tail(done)):
                    done, failures = done + 1, 0
                    yield batch
            except RuntimeError as exc:
                self.iterator, self.clean = None, False
                failures += 1
                if failures > _MAX_CONSECUTIVE_FAILURES:
                    raise RuntimeError(f"DALI failed on {failures} consecutive batches") from exc
                yield self._reference_batch(plan.indices[done], plan.flips[done], exc)
                done += 1

    def _run(self, plan: EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.feed.pending = zip(plan.indices, plan.flips, strict=True)
        if self.iterator is not None and self.clean:
            self.iterator.reset()  # restarts prefetching from the new plan
        else:
            self.iterator = None  # a pass was abandoned mid-way: its prefetched batches are stale
            self.iterator = DALIGenericIterator([self._pipeline()], ["images", "labels"], auto_reset=False)
        self.clean = False
        for out in self.iterator:
            yield out[0]["images"], out[0]["labels"].reshape(-1)
        self.clean = True

    def _reference_batch(self, idx: np.ndarray, flips: np.ndarray, exc: Exception) -> tuple[torch.Tensor, torch.Tensor]:
        paths = [self.feed.paths[i] for i in idx.tolist()]
        culprits = [p for p in paths if isinstance(probe_image(p), str)] or paths
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        after = [lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"]
        reason = (after or lines or [type(exc).__name__])[0]
        warnings.warn(f"DALI failed on a batch containing {culprits}: {reason}; using the PIL reference", stacklevel=3)
        images, labels = [], []
        for i, flip in zip(idx.tolist(), flips.tolist(), strict=True):
            x, y = self.reference[(i, flip)]
            images.append(x)
            labels.append(y)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
