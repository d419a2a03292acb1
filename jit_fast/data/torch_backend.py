"""Reference backend: PIL decode + ADM crop (torchvision ImageFolder semantics) via a DataLoader or RAM cache."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .crop import center_crop
from .index import FolderIndex, show_path
from .order import EpochPlan

MAX_LOAD_WARNINGS = 10


def decode_all(index: FolderIndex, size: int) -> torch.Tensor:
    """Every image of the index ADM-cropped into one uint8 (N, 3, S, S) tensor (small datasets only)."""
    return decode_with_labels(index, size)[0]


def decode_with_labels(index: FolderIndex, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """decode_all() and the labels that go with it: a file that no longer decodes gets CropDataset's stand-in."""
    dataset = CropDataset(index, size)
    out = np.empty((len(index), 3, size, size), dtype=np.uint8)
    labels = np.empty(len(index), dtype=np.int64)
    for i in range(len(index)):
        x, labels[i] = dataset[(i, False)]
        out[i] = x.numpy()
    return torch.from_numpy(out), labels


class PathTable:
    """Paths packed in one bytes blob: forked DataLoader workers share it without refcount copy-on-write."""

    def __init__(self, paths: list[str]) -> None:
        encoded = [p.encode() for p in paths]
        self.blob = b"".join(encoded)
        self.offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.blob[self.offsets[i] : self.offsets[i + 1]].decode()


class CropDataset(Dataset):
    """Maps (index, flip) to a cropped, optionally flipped uint8 CHW tensor and its label."""

    def __init__(self, index: FolderIndex, size: int) -> None:
        self.paths = PathTable(index.paths)
        self.labels = np.asarray(index.labels, dtype=np.int64)
        self.size = size
        self.failures = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        i, flip = item
        for attempt in range(len(self.paths)):
            j = (i + attempt) % len(self.paths)
            try:
                arr = center_crop(self.paths[j], self.size)
                break
            except Exception as exc:  # a file broken after validation must not stop a long run
                self._warn(self.paths[j], exc)
        else:
            raise RuntimeError("no readable image left")
        if flip:
            arr = arr[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), int(self.labels[j])

    def _warn(self, path: str, exc: Exception) -> None:
        """Name the first MAX_LOAD_WARNINGS load-time failures of this process, then say that the rest are silent."""
        self.failures += 1
        if self.failures <= MAX_LOAD_WARNINGS:
            last = " (further failures in this process are not reported)" if self.failures == MAX_LOAD_WARNINGS else ""
            warnings.warn(
                f"skipping unreadable image {show_path(path)!r} at load time, the next file stands in: {exc}{last}",
                stacklevel=3,
            )


class _PlanSampler:
    """Batch sampler that replays whatever plan was installed last (lets persistent workers survive epochs)."""

    def __init__(self) -> None:
        self.plan: EpochPlan | None = None

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        assert self.plan is not None
        for idx, fl in zip(self.plan.indices.tolist(), self.plan.flips.tolist(), strict=True):
            yield list(zip(idx, fl, strict=True))

    def __len__(self) -> int:
        return 0 if self.plan is None else len(self.plan)


class TorchBackend:
    """Yields uint8 (B,3,S,S) batches and int64 labels for a plan, from RAM or through DataLoader workers."""

    def __init__(self, index: FolderIndex, size: int, *, num_workers: int, cache: bool, prefetch: int = 2) -> None:
        self.labels = np.asarray(index.labels, dtype=np.int64)
        self.images = None
        if cache:
            images, self.labels = decode_with_labels(index, size)
            self.images = images.numpy()
        self.loader: DataLoader | None = None
        if self.images is None:
            self.sampler = _PlanSampler()
            self.loader = DataLoader(
                CropDataset(index, size),
                batch_sampler=self.sampler,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                prefetch_factor=prefetch if num_workers > 0 else None,
                pin_memory=torch.cuda.is_available(),
            )

    def iterate(self, plan: EpochPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the plan in order (RAM path in numpy: no intra-op thread pool per small batch)."""
        if self.images is not None:
            for idx, fl in zip(plan.indices, plan.flips, strict=True):
                x = self.images[idx]
                x[fl] = x[fl][..., ::-1]
                yield torch.from_numpy(x), torch.from_numpy(self.labels[idx])
            return
        assert self.loader is not None
        self.sampler.plan = plan
        yield from self.loader
