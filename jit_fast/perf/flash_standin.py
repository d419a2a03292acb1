"""Flash-attention stand-in for counting: one opaque op forward, one backward, like the GPU kernel.

During counting the model's `attention` is swapped for `jit_fast_bench::flash_attention` (fwd: read q, k, v; write
o and the fp32 log-sum-exp; bwd: read dO, q, k, v, o, lse; write dq, dk, dv), because the CPU SDPA kernel choice
(a math path with dropout) is not what runs on a GPU. Dropout inside flash attention moves no extra bytes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

import jit_fast.model.network as jit_model

BENCH_NAMESPACE = "jit_fast_bench"


@torch.library.custom_op(f"{BENCH_NAMESPACE}::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over (B, N, H, D) returning (o, lse (B, H, N)), computed in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf = (t.transpose(1, 2).to(acc) for t in (q, k, v))
    s = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, dim=-1)
    o = torch.exp(s - lse[..., None]) @ vf
    return o.transpose(1, 2).to(q.dtype).contiguous(), lse


@flash_attention.register_fake
def _flash_attention_fake(q, k, v):
    b, n, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=torch.promote_types(q.dtype, torch.float32))


@torch.library.custom_op(f"{BENCH_NAMESPACE}::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `flash_attention`, recomputing the probabilities from lse (fp32 math)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, of, dof = (t.transpose(1, 2).to(acc) for t in (q, k, v, o, do))
    scale = 1 / math.sqrt(q.shape[-1])
    p = torch.exp(qf @ kf.transpose(-1, -2) * scale - lse[..., None])
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * of).sum(-1, keepdim=True)) * scale
    dq, dk = ds @ kf, ds.transpose(-1, -2) @ qf
    return tuple(g.transpose(1, 2).to(t.dtype).contiguous() for g, t in ((dq, q), (dk, k), (dv, v)))


@flash_attention_bwd.register_fake
def _flash_attention_bwd_fake(do, q, k, v, o, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _fa_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return flash_attention_bwd(do.contiguous(), q, k, v, o, lse)


flash_attention.register_autograd(_fa_backward, setup_context=_fa_setup)


def standin_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Drop-in for `jit_fast.model.attention.attention` during counting (dropout changes no byte or FLOP)."""
    if dropout_p and not isinstance(q, torch._subclasses.fake_tensor.FakeTensor):
        raise ValueError("the flash-attention stand-in only counts; it has no dropout for real tensors")
    return flash_attention(q, k, v)[0]


@contextlib.contextmanager
def flash_attention_standin() -> Iterator[None]:
    """Route the model's attention through the counting stand-in for the duration of the context."""
    original = jit_model.attention
    jit_model.attention = standin_attention
    try:
        yield
    finally:
        jit_model.attention = original
