"""FP8 training of the block linears through torchao.float8 (`--fp8 tensorwise|rowwise`; off by default).

The four block linears (attn.qkv, attn.proj, mlp.w12, mlp.w3) become torchao `Float8Linear`s
(`convert_to_float8_training`): their weights keep the names, shapes and dtypes of `nn.Linear`, so state dicts,
DCP checkpoints and the EMAs are those of a bf16 run and load there and in sample.py. The adaLN, embedders and
final layer stay in the run's precision. Three of the four GEMMs are called by the op table (the fused ops take
their output without the bias and add it themselves), so the table gets the same float8 GEMM (`float8_ops`):
every fused op's inputs and outputs stay in the run's precision and only the GEMMs change.

A GPU without FP8 tensor cores (below sm_89) and the CPU are refused unless torchao's emulation is asked for
(`--fp8-emulate`: the casts and scales of the real recipe, the matmul in high precision; for tests).
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import torch

from jit_kernels import OpTable

from ..shared.quiet import quiet_pytree_notices

if TYPE_CHECKING:
    from torchao.float8 import Float8LinearConfig

RECIPES = ("tensorwise", "rowwise")
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.w12", "mlp.w3")
_BLOCK_LINEAR = re.compile(r"(^|\.)blocks\.\d+\.(" + "|".join(re.escape(n) for n in BLOCK_LINEARS) + r")$")
MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores


def refusal(recipe: str, emulate: bool, device: torch.device) -> str | None:
    """Why `--fp8 recipe` cannot run on `device` (None: it can): unknown recipe, torchao missing, no FP8 GPU."""
    if recipe == "off":
        return "--fp8-emulate emulates --fp8 tensorwise or rowwise; pass one" if emulate else None
    if recipe not in RECIPES:
        return f"--fp8 {recipe!r} is not a recipe; choose off, {' or '.join(RECIPES)}"
    try:
        with quiet_pytree_notices():
            import torchao.float8  # noqa: F401
    except ImportError:
        return "--fp8 needs torchao (pip install 'jit_fast[fp8]')"
    if emulate:
        return None
    if device.type != "cuda":
        return f"--fp8 runs on GPUs with FP8 tensor cores (sm_89+), not on {device.type}; add --fp8-emulate to test it"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"--fp8 needs FP8 tensor cores (sm_89+: L4, L40, H100); this GPU is sm_{cap[0]}{cap[1]}; "
                "train in bf16 (--fp8 off)")
    return None


def float8_config(recipe: str, emulate: bool = False, fsdp_all_gather: bool = False) -> Float8LinearConfig:
    """torchao's config of `recipe` (tensorwise or rowwise scaling), emulated or not; `fsdp_all_gather` gathers
    FSDP2 shards in float8 (tensorwise only: torchao has it for no other scaling)."""
    from torchao.float8 import Float8LinearConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulate,
                               enable_fsdp_float8_all_gather=fsdp_all_gather and recipe == "tensorwise")


def float8_gemm(config: Float8LinearConfig):
    """x @ weight.T in float8 as a `Float8Linear` of `config` computes it (no bias), for the op table's GEMMs."""
    from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args

    with torch.device("meta"):
        mm_config = Float8Linear(16, 16, bias=False, config=config).linear_mm_config

    def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # as Float8Linear: the GEMM runs in the autocast dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # contiguous: a rowwise-scaled float8 tensor cannot be copied into the 2-D layout torch.mm takes
        return matmul_with_hp_or_float8_args.apply(x.contiguous(), weight.t(), mm_config, config)

    return gemm


def float8_ops(ops: OpTable, config: Float8LinearConfig) -> OpTable:
    """`ops` with the GEMMs it runs (qkv, w12, attention proj) in float8: each returns its output without the bias
    and the op it feeds (q/k norm + RoPE, SwiGLU, the residual) adds the bias, on the torch and the fused table."""
    gemm = float8_gemm(config)

    def linear_qk_norm_rope(x, weight, bias, q_weight, k_weight, cos, sin, num_heads, eps=1e-6):
        return ops.qk_norm_rope(gemm(x, weight), q_weight, k_weight, cos, sin, num_heads, eps, bias)

    def linear_swiglu(x, weight, bias, dropout=None):
        return ops.swiglu(gemm(x, weight), bias, dropout)

    def branch_linear(x, weight, bias):
        return gemm(x, weight), bias

    return dataclasses.replace(ops, linear_qk_norm_rope=linear_qk_norm_rope, linear_swiglu=linear_swiglu,
                               branch_linear=branch_linear, deferred_bias=True)


def is_block_linear(fqn: str) -> bool:
    """Whether module path `fqn` is one of the block linears FP8 converts (blocks.N.attn.qkv, ...)."""
    return bool(_BLOCK_LINEAR.search(fqn))


def convert_block_linears(net: torch.nn.Module, config: Float8LinearConfig) -> torch.nn.Module:
    """Swap the block linears of `net` for torchao Float8Linears sharing their parameters (values unchanged);
    build `net` with `float8_ops(ops, config)` so the table's GEMMs use the same config."""
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(net, config=config, module_filter_fn=lambda _m, fqn: is_block_linear(fqn))


def float8_linear_count(net: torch.nn.Module) -> int:
    """How many of `net`'s modules are torchao Float8Linears (0 without torchao)."""
    try:
        from torchao.float8.float8_linear import Float8Linear
    except ImportError:
        return 0
    return sum(isinstance(m, Float8Linear) for m in net.modules())
