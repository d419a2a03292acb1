"""Model pieces the counters and benchmarks share: a random batch, a representative block and its inputs."""

from __future__ import annotations

import contextlib

import torch

import jit_fast.model.network as jit_model
from jit_fast.configs import ModelConfig


def cast_parameters(net: jit_model.JiT, dtype: torch.dtype | None) -> jit_model.JiT:
    """Give the blocks' parameters `dtype`, as `distributed.prepare_model`'s FSDP2 policy gathers them.

    The root's own parameters (embedders, pos_embed, in-context tokens, final layer) stay fp32 there,
    so the residual stream stays fp32 exactly as in FSDP2 training.
    """
    if dtype is not None:
        for p in net.blocks.parameters():
            p.data = p.data.to(dtype)
    return net


def model_batch(cfg: ModelConfig, batch: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, ...]:
    """Random images (B, C, S, S), times (B,) and labels (B,) for `cfg` on `device`."""
    s = cfg.input_size
    return (
        torch.randn(batch, cfg.in_channels, s, s, device=device),
        torch.rand(batch, device=device),
        torch.randint(0, cfg.num_classes, (batch,), device=device),
    )


def block_index(cfg: ModelConfig, which: str) -> int:
    """Index of a representative block: "standard" (in-context tokens, no dropout), "dropout" (in the
    dropout range, after the in-context start) or "first"; all but "first" receive a pending residual."""
    lo, hi = cfg.depth // 4, cfg.depth // 4 * 3
    if which == "standard":
        return max(cfg.in_context_start, hi) if max(cfg.in_context_start, hi) < cfg.depth else cfg.depth - 1
    if which == "dropout":
        return max(cfg.in_context_start + 1, lo)
    if which == "first":
        return 0
    raise ValueError(f"unknown block kind {which!r}; choose standard, dropout or first")


class _Captured(Exception):
    pass


def capture_block_inputs(
    net: jit_model.JiT, idx: int, batch: int, device: torch.device | str | None = None
) -> tuple[tuple, dict]:
    """Run the model forward up to block `idx` and return the (args, kwargs) that block receives."""
    got: dict = {}

    def hook(_m, args, kwargs):
        got.update(args=args, kwargs=kwargs)
        raise _Captured

    h = net.blocks[idx].register_forward_pre_hook(hook, with_kwargs=True)
    training = net.training
    net.eval()  # shapes and dtypes are those of training; eval skips dropout on the way (no RNG, no stand-in limit)
    try:
        with torch.no_grad(), contextlib.suppress(_Captured):
            net(*model_batch(net.cfg, batch, device))
    finally:
        h.remove()
        net.train(training)
    # the dropout key JiT.forward hands every block (its last argument): the one a forward in `net`'s mode would
    # (eval mode above passed None)
    return (*got["args"][:-1], net.forward_dropout_seed()), got["kwargs"]


def _leaf(x):
    """Fresh leaf activation(s) with x's shape/dtype that require grad (None stays None)."""
    if isinstance(x, tuple):
        return tuple(_leaf(v) for v in x)
    return None if x is None else torch.randn_like(x).requires_grad_(True)


def block_leaves(args: tuple) -> tuple:
    """Block arguments (x, c, rope, pending, ...) with x, c and the pending residual as fresh grad-requiring leaves."""
    return (_leaf(args[0]), _leaf(args[1]), args[2], _leaf(args[3]), *args[4:])
