"""Attention behind one function, on the fastest backend the GPU and the call allow.

Order of preference: FlashAttention-3 (`flash_attn_interface`, Hopper, no dropout), FlashAttention-2 (`flash_attn`,
sm_80+), cuDNN SDPA (sm_80+, no dropout), then PyTorch SDPA (its flash / memory-efficient kernels, or math on
CPU). A backend that only takes some head dimensions gets q, k and v zero-padded to the next one it takes, with
the softmax scale of the real head dimension; the padded output columns are zeros and are cut off, so the result
is the unpadded attention. On a GPU the first choice for each (backend, head dim, padding) is printed once.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FLASH_MIN_CAPABILITY = (8, 0)  # flash-attn 2 and cuDNN attention run on Ampere and newer; Turing and Volta get SDPA
HOPPER = (9, 0)


@functools.cache
def _module(name: str):
    """The module if it imports (looked up once: this runs on every attention call), else None."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@dataclass(frozen=True)
class Backend:
    """One attention implementation: when it takes a call, which head dims, and the call on (B, N, H, D)."""

    name: str
    min_capability: tuple[int, int]
    dropout: bool  # takes dropout_p > 0
    head_dims: tuple[int, ...] | None  # the head dims it runs (others are padded up); None: any multiple of 8
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float | None], torch.Tensor]  # scale None: 1/sqrt
    installed: Callable[[], bool]

    def padded_dim(self, d: int) -> int | None:
        """The head dim this backend runs a head dim `d` at, or None if it cannot."""
        if self.head_dims is None:
            return d if d % 8 == 0 and d <= 256 else None
        return next((h for h in self.head_dims if h >= d), None)


def _fa3(q, k, v, dropout_p: float, scale: float | None) -> torch.Tensor:
    out = _module("flash_attn_interface").flash_attn_func(q, k, v, softmax_scale=scale)
    return out[0] if isinstance(out, tuple) else out  # early releases return (out, lse)


def _fa2(q, k, v, dropout_p: float, scale: float | None) -> torch.Tensor:
    return _module("flash_attn").flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale)


def _sdpa(q, k, v, dropout_p: float, scale: float | None) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)


def _cudnn(q, k, v, dropout_p: float, scale: float | None) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # cuDNN first; PyTorch's own kernels where cuDNN turns a shape down (an error would stop a run instead)
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        return _sdpa(q, k, v, dropout_p, scale)


@functools.cache
def _cudnn_installed() -> bool:
    return torch.backends.cudnn.is_available() and hasattr(torch.nn.attention, "SDPBackend")


BACKENDS: tuple[Backend, ...] = (
    Backend("flash-attn-3", HOPPER, False, (64, 96, 128, 192, 256), _fa3,
            lambda: _module("flash_attn_interface") is not None),
    Backend("flash-attn-2", FLASH_MIN_CAPABILITY, True, None, _fa2, lambda: _module("flash_attn") is not None),
    Backend("cudnn-sdpa", FLASH_MIN_CAPABILITY, False, (64, 128), _cudnn, _cudnn_installed),
)
SDPA = Backend("sdpa", (0, 0), True, None, _sdpa, lambda: True)
_announced: set[tuple[str, int, int]] = set()


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> tuple[Backend, int]:
    """The first of BACKENDS that takes this call, and the head dim it runs at; PyTorch SDPA at the real head dim
    when none does (CPU, fp32, older GPUs)."""
    d = q.shape[-1]
    if not (q.is_cuda and q.dtype == k.dtype == v.dtype and v.dtype in (torch.float16, torch.bfloat16)):
        return SDPA, d
    props = torch.cuda.get_device_properties(q.device)
    for b in BACKENDS:
        dim = b.padded_dim(d)
        if dim is not None and (props.major, props.minor) >= b.min_capability and (b.dropout or dropout_p == 0) \
                and b.installed():
            return b, dim
    return SDPA, d


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention over (B, N, H, D) tensors, returning (B, N, H, D), with scale 1/sqrt(D)."""
    backend, dim = choose(q, k, v, dropout_p)
    key = (backend.name, q.shape[-1], dim)
    if key not in _announced and q.is_cuda and not torch.compiler.is_compiling():
        _announced.add(key)
        print(f"attention: {backend.name}, head dim {q.shape[-1]}" + (f" padded to {dim}" if dim != key[1] else ""),
              flush=True)
    return run_at(backend, dim, q, k, v, dropout_p)


def run_at(backend: Backend, dim: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           dropout_p: float = 0.0) -> torch.Tensor:
    """`backend` at head dim `dim` >= D: q, k, v zero-padded, scale 1/sqrt(D), the padded columns cut off."""
    d = q.shape[-1]
    if dim == d:
        return backend.run(q, k, v, dropout_p, None)
    q, k, v = (F.pad(t, (0, dim - d)) for t in (q, k, v))
    return backend.run(q, k, v, dropout_p, 1.0 / math.sqrt(d))[..., :d]
