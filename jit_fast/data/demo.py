"""Demo dataset: scikit-learn's 1797 digits as a small RGB JPEG ImageFolder, cached once on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import atomic_write
from .index import build_index, cache_dir
from .loader import to_float
from .torch_backend import decode_all

_MARKER = ".complete"


def prepare_demo(root: str | Path | None = None, size: int = 32) -> Path:
    """Write the digits (upsampled to size x size RGB, JPEG q95 4:4:4) once; return the ImageFolder root."""
    from sklearn.datasets import load_digits

    base = Path(root) if root is not None else cache_dir() / "demo_digits"
    out = base / f"size{size}"
    train = out / "train"
    if (out / _MARKER).exists():
        return train
    if out.exists():
        shutil.rmtree(out)
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    for c in range(10):
        (train / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, digits.target, strict=True)):
        pil = Image.fromarray(img).resize((size, size), resample=Image.BICUBIC).convert("RGB")
        pil.save(train / str(int(label)) / f"{i:04d}.jpg", quality=95, subsampling=0)
    atomic_write(out / _MARKER, f"{len(images)} images\n")
    return train


def demo_arrays(size: int = 32, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All demo digits exactly as the loader yields them unflipped: float [-1,1] (N,3,S,S) and labels (N,)."""
    index = build_index(prepare_demo(root, size), img_size=size)
    images = to_float(decode_all(index, size))
    return images, torch.tensor(index.labels, dtype=torch.int64)
