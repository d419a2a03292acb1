"""`build_loader`: one resumable, sharded, per-epoch-reshuffled loader over an ImageFolder, DALI or torch."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..shared.distributed import leader_first
from .captions import build_caption_index
from .index import FolderIndex, build_index
from .order import EpochPlan, batches_per_epoch, plan_epoch

DEFAULT_CACHE_BYTES = 1 << 30


def default_backend() -> str:
    """Backend used when none is given: dali with CUDA, else torch (faster per batch on CPU here)."""
    return "dali" if torch.cuda.is_available() else "torch"


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1] (x / 127.5 - 1); on CPU in numpy: no OpenMP pool wake-up per batch."""
    if x.device.type != "cpu":
        return x.float().div_(127.5).sub_(1.0)
    arr = x.numpy().astype(np.float32)
    arr /= 127.5
    arr -= 1.0
    return torch.from_numpy(arr)


class ImageLoader:
    """Iterable of (images, labels) batches with len(), set_epoch() and a mid-epoch resumable state.

    Over a captioned dataset (`CaptionedIndex`) the labels are sample numbers: row i of a batch has the
    caption index.captions[labels[i]] and the embedding-cache key index.keys[labels[i]].
    """

    def __init__(
        self,
        index: FolderIndex,
        *,
        img_size: int,
        batch_size: int,
        backend: str,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        shuffle: bool,
        flip: bool,
        output: str,
        device: torch.device | str | None,
        num_workers: int | None,
        cache: bool | None,
        prefetch: int,
        dali_filter: str = "cubic",
    ) -> None:
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if batches_per_epoch(len(index), batch_size, world_size) == 0:
            raise ValueError(f"{len(index)} images cannot fill one batch of {batch_size} on {world_size} ranks")
        self.index, self.img_size, self.batch_size = index, img_size, batch_size
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, epoch
        self.shuffle, self.flip, self.output, self.backend_name = shuffle, flip, output, backend
        self.device = torch.device(device) if device is not None else None
        self.consumed = 0
        threads = num_workers if num_workers is not None else min(os.cpu_count() or 1, 8)
        if backend == "torch":
            from .torch_backend import TorchBackend

            fits = len(index) * 3 * img_size * img_size <= DEFAULT_CACHE_BYTES
            self.backend: Any = TorchBackend(
                index, img_size, num_workers=threads, cache=fits if cache is None else cache, prefetch=prefetch
            )
        elif backend == "dali":
            from .dali_backend import DaliBackend

            self.backend = DaliBackend(
                index,
                img_size,
                batch_size=batch_size,
                num_threads=max(1, threads),
                prefetch=prefetch,
                device=self.device,
                resize_filter=dali_filter,
            )
        else:
            raise ValueError(f"unknown data backend {backend!r} (use 'dali' or 'torch')")

    @property
    def classes(self) -> list[str]:
        """Class-folder names; label i is classes[i]."""
        return self.index.classes

    @property
    def num_classes(self) -> int:
        """Number of class folders (empty ones included, as torchvision)."""
        return len(self.index.classes)

    def __len__(self) -> int:
        return batches_per_epoch(len(self.index), self.batch_size, self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its first batch on the next iteration."""
        self.epoch, self.consumed = epoch, 0

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's full batch plan (indices, flips) for an epoch."""
        return plan_epoch(
            len(self.index),
            self.batch_size,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            rank=self.rank,
            world_size=self.world_size,
            shuffle=self.shuffle,
            flip=self.flip,
        )

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: epoch, batches already handed out this epoch, seed."""
        return {
            "epoch": self.epoch,
            "batch": self.consumed,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position: the next batch is the first one not handed out before."""
        if state.get("batch_size", self.batch_size) * state.get("world_size", self.world_size) != (
            self.batch_size * self.world_size
        ):
            raise ValueError("resuming with a different global batch size changes the batch order")
        self.epoch, self.consumed, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])

    def summary(self) -> str:
        """Kept / skipped image counts naming skipped files."""
        return self.index.summary()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0
        plan = self.plan().tail(self.consumed)
        for x, y in self.backend.iterate(plan):
            self.consumed += 1
            yield self._finish(x), self._to_device(y)
        if self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device is None or t.device == self.device:
            return t
        return t.to(self.device, non_blocking=True)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = self._to_device(x)
        return x if self.output == "uint8" else to_float(x)


def _shared_index(
    root: str | Path, img_size: int, num_workers: int | None, index_cache: bool | str | Path, captions: bool = False
) -> FolderIndex:
    """Validate once per node under torch.distributed: local rank 0 first, the others then read its cache."""
    build = functools.partial(build_caption_index if captions else build_index, root, img_size=img_size,
                              num_workers=num_workers, cache=index_cache)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return build()
    return leader_first(build, int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0)


def build_loader(
    root: str | Path,
    img_size: int = 256,
    batch_size: int = 128,
    backend: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    flip: bool = True,
    output: str = "float",
    device: torch.device | str | None = None,
    *,
    num_workers: int | None = None,
    cache: bool | None = None,
    prefetch: int = 2,
    index_cache: bool | str | Path = True,
    dali_filter: str = "cubic",
    captions: bool = False,
) -> ImageLoader:
    """Loader over ImageFolder `root` (class folders) yielding (B,3,S,S) images ([-1,1] float or uint8), labels.

    captions=True reads a captioned folder instead (`data.captions`: images/ + captions/ or captions.jsonl)
    and yields sample numbers as labels (see `ImageLoader`); crop, backends, order and resume are the same.
    backend None or "auto" picks `default_backend()`; num_workers = DataLoader workers (torch; 0 loads in
    the main process) or DALI threads (at least 1);
    cache (torch) keeps decoded crops in RAM, default when they fit in 1 GiB;
    dali_filter (dali) is the final resize filter: "cubic" (PIL BICUBIC, ~56 dB from the reference) or "linear"
    (antialiased triangle, about a third cheaper on CPU, ~44 dB); the torch backend is always PIL BICUBIC.
    """
    if dali_filter not in ("cubic", "linear"):  # checked before the (possibly long) validation pass
        raise ValueError(f"dali_filter must be 'cubic' or 'linear', got {dali_filter!r}")
    index = _shared_index(root, img_size, num_workers, index_cache, captions)
    return ImageLoader(
        index,
        img_size=img_size,
        batch_size=batch_size,
        backend=default_backend() if backend in (None, "auto") else backend,
        rank=rank,
        world_size=world_size,
        seed=seed,
        epoch=epoch,
        shuffle=shuffle,
        flip=flip,
        output=output,
        device=device,
        num_workers=num_workers,
        cache=cache,
        prefetch=prefetch,
        dali_filter=dali_filter,
    )
