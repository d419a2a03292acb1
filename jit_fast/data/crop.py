"""ADM center crop (the official JiT / guided-diffusion preprocessing) and its exact geometry."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CropGeometry:
    """Where the ADM crop of a (width, height) image lands: halvings, sizes and crop offset."""

    halvings: int
    halved_w: int
    halved_h: int
    resized_w: int
    resized_h: int
    left: int
    top: int


def crop_geometry(width: int, height: int, size: int) -> CropGeometry:
    """Geometry of `center_crop` for an image of the given size, computed without touching pixels."""
    w, h, k = width, height, 0
    while min(w, h) >= 2 * size:
        w, h, k = w // 2, h // 2, k + 1
    scale = size / min(w, h)
    rw, rh = round(w * scale), round(h * scale)
    return CropGeometry(k, w, h, rw, rh, (rw - size) // 2, (rh - size) // 2)


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image as RGB exactly like torchvision's ImageFolder loader (PIL, convert("RGB"))."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def center_crop(image: str | Path | Image.Image, size: int) -> np.ndarray:
    """Reference ADM crop: BOX-halve while the short side >= 2*size, BICUBIC to size, center crop; uint8 (S,S,3)."""
    img = load_rgb(image) if isinstance(image, str | Path) else image.convert("RGB")
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])
