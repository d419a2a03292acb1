"""Demo datasets: scikit-learn's 1797 digits as a small RGB JPEG ImageFolder, or as a captioned folder (several
phrasings per digit) with a tiny local text encoder for the text-to-image demo; each is written once on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..shared.files import atomic_write
from .index import build_index, cache_dir
from .loader import to_float
from .torch_backend import decode_all

_MARKER = ".complete"
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Phrasings of the text demo, filled with a digit's word and numeral; the k-th image of a digit gets phrasing k (mod 6).
PHRASINGS = (
    "a handwritten {word}",
    "the digit {digit}",
    "a drawing of the number {word}",
    "handwritten digit {digit}",
    "the number {word} written by hand",
    "a {word}",
)


def _digits(size: int):
    """(index, size x size RGB PIL image, label) of every digit, upsampled BICUBIC from 8x8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    for i, (img, label) in enumerate(zip(images, digits.target, strict=True)):
        yield i, Image.fromarray(img).resize((size, size), resample=Image.BICUBIC).convert("RGB"), int(label)


def demo_caption(digit: int, phrasing: int) -> str:
    """Caption `phrasing` (any integer, taken modulo the number of phrasings) of `digit`."""
    return PHRASINGS[phrasing % len(PHRASINGS)].format(word=DIGIT_WORDS[digit], digit=digit)


def demo_prompts(digit: int) -> list[str]:
    """Every phrasing of `digit` (prompts for sampling and judging the text demo)."""
    return [demo_caption(digit, j) for j in range(len(PHRASINGS))]


def prepare_demo(root: str | Path | None = None, size: int = 32) -> Path:
    """Write the digits (upsampled to size x size RGB, JPEG q95 4:4:4) once; return the ImageFolder root."""
    base = Path(root) if root is not None else cache_dir() / "demo_digits"
    out = base / f"size{size}"
    train = out / "train"
    if (out / _MARKER).exists():
        return train
    if out.exists():
        shutil.rmtree(out)
    for c in range(10):
        (train / str(c)).mkdir(parents=True, exist_ok=True)
    n = 0
    for i, pil, label in _digits(size):
        pil.save(train / str(label) / f"{i:04d}.jpg", quality=95, subsampling=0)
        n += 1
    atomic_write(out / _MARKER, f"{n} images\n")
    return train


def prepare_demo_text(root: str | Path | None = None, size: int = 32) -> Path:
    """The digits as a captioned folder (images/NNNN.jpg, captions/NNNN.txt; the k-th image of digit d captioned
    demo_caption(d, k), so every digit cycles through every phrasing), written once; returns its root."""
    base = Path(root) if root is not None else cache_dir() / "demo_digits_text"
    out = base / f"size{size}"
    if (out / _MARKER).exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    (out / "captions").mkdir()
    seen = [0] * 10
    for i, pil, label in _digits(size):
        pil.save(out / "images" / f"{i:04d}.jpg", quality=95, subsampling=0)
        (out / "captions" / f"{i:04d}.txt").write_text(demo_caption(label, seen[label]) + "\n")
        seen[label] += 1
    atomic_write(out / _MARKER, f"{sum(seen)} captioned images\n")
    return out


def demo_text_encoder(root: str | Path | None = None) -> Path:
    """The demo's tiny text encoder (word-level tokenizer over every demo phrasing, seeded random BERT), built once."""
    from ..text.tiny import build_tiny_encoder

    base = Path(root) if root is not None else cache_dir()
    captions = [p for d in range(10) for p in demo_prompts(d)]
    return build_tiny_encoder(base / "demo_text_encoder", captions)


def demo_arrays(size: int = 32, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All demo digits exactly as the loader yields them unflipped: float [-1,1] (N,3,S,S) and labels (N,)."""
    index = build_index(prepare_demo(root, size), img_size=size)
    images = to_float(decode_all(index, size))
    return images, torch.tensor(index.labels, dtype=torch.int64)
