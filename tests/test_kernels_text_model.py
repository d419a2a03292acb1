"""A text-conditional JiT through the fused kernels (interpreter) agrees with the torch table, as class models do.

Same rule as tests/test_kernels_model.py (norm-wise and element-wise error vs a float64 copy, bounded by the
eager bf16 path's own error), on a sequence-mode model with a dropped caption so the projection, the pad
token and the learned null all carry gradients.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_model import B, compare

import jit_fast
from jit_fast.shared.conditioning import TextCondition

TEXT = dict(img_size=32, depth=1, hidden_size=64, num_heads=4, bottleneck_dim=16, in_context_len=4,
            in_context_start=0, text_dim=24, text_tokens="sequence")


@pytest.mark.slow  # ~6 s alone, 14 s on a busy 2-core machine: the interpreter runs every kernel launch
def test_text_model_through_triton_kernels():
    torch.manual_seed(0)
    net = jit_fast.build_model("JiT-B/16-Text", kernels="triton", **TEXT)
    gen = torch.Generator().manual_seed(1)
    net.load_state_dict({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()})
    assert net.ops.swiglu.__module__ == "jit_kernels.swiglu"
    x, t = torch.randn(B, 3, 32, 32, generator=gen), torch.rand(B, generator=gen)
    mask = torch.tensor([[True, True, True, False, False, False]]).expand(B, 6)
    y = TextCondition(torch.randn(B, 24, generator=gen), torch.randn(B, 6, 24, generator=gen), mask,
                      torch.arange(B) == 1)
    errs = compare(net, x, t, y, torch.bfloat16)
    assert {"y_embedder.proj.weight", "y_embedder.pad_token", "y_embedder.null_embedding"} <= set(errs)
