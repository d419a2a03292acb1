"""The modeled FP8 train step (`--fp8`): the block linears' GEMMs at the FP8 peak, plus the casts that feed them.

`fp8_count(count, recipe)` rewrites a counted step (`count_train_step` / `count_block`, bf16 autocast) as
torchao's float8 training with dynamic scaling runs it under `torch.compile`:
- every GEMM of a block linear (qkv, proj, w12, w3; forward, input gradient and weight gradient; found by the
  counter, `OpRecord.block_linear`) reads its two operands in float8 (1 byte per element instead of 2) and is
  timed at the GPU's FP8 peak; its output and bias stay bf16;
- a cast from bf16 is an absolute-max reduction (reads the operand) and a scale-and-cast kernel (reads it again,
  writes one byte per element). Forward: the input and the weight are cast (a sampler's weights only once, before
  sampling: `weights_cast_once`). Backward: the output gradient is
  cast once for both of its GEMMs, in both layouts (writes two bytes per element); the input and weight saved
  in bf16 are cast again into the layout their backward GEMM takes: tensorwise reuses the forward scale (cast
  only), rowwise scales along the other axis (amax and cast). Scales are a few bytes and are not counted, nor is
  FSDP2's float8 all-gather (which casts weight shards before gathering).
On a GPU rowwise's scaled GEMMs also run slower than tensorwise's, which this model does not know.
"""

from __future__ import annotations

import dataclasses

from jit_fast.model.fp8 import RECIPES
from jit_fast.perf.traffic import Count, OpRecord

BF16_BYTES = 2


def _cast(r: OpRecord, side: str, elements: int, amax: bool, layouts: int) -> list[OpRecord]:
    """The cast kernels of one operand of `r` (`elements` bf16 values) into `layouts` float8 copies."""
    region = f"{r.region}[fp8 cast {side}]"
    out = [OpRecord(phase=r.phase, region=region, op="fp8::amax", category="other", launches=1,
                    bytes_read=BF16_BYTES * elements, bytes_written=0)] if amax else []
    out.append(OpRecord(phase=r.phase, region=region, op="fp8::scale_cast", category="other", launches=1,
                        bytes_read=BF16_BYTES * elements, bytes_written=layouts * elements))
    return out


def _casts(r: OpRecord, recipe: str, weights_cast_once: bool) -> list[OpRecord]:
    """The cast kernels feeding block-linear GEMM `r`'s two operands (a: m x k, b: k x n)."""
    m, k, n = r.gemm_mnk
    out = []
    for side, elements, kind in (("a", m * k, r.operands[0]), ("b", k * n, r.operands[1])):
        if kind == "input" or (kind == "weight" and not weights_cast_once):
            out += _cast(r, side, elements, amax=True, layouts=1)
        elif kind == "saved":
            out += _cast(r, side, elements, amax=recipe == "rowwise", layouts=1)
        elif kind == "grad":  # cast once, in both layouts, for the input-gradient and the weight-gradient GEMM
            out += _cast(r, side, elements, amax=True, layouts=2)
    return out


def fp8_count(count: Count, recipe: str = "tensorwise", weights_cast_once: bool = False) -> Count:
    """`count` with its block-linear GEMMs in float8 (operands 1 byte, `fp8=True`) and their casts added;
    `weights_cast_once`: the weights are float8 already (a sampler casts them once), only activations are cast."""
    if recipe not in RECIPES:
        raise ValueError(f"FP8 recipe {recipe!r} is not one of {', '.join(RECIPES)}")
    if not any(r.block_linear for r in count.records):
        raise ValueError(f"{count.meta.get('model')}: the count has no block-linear GEMM to run in FP8")
    records = []
    for r in count.records:
        if not r.block_linear:
            records.append(r)
            continue
        m, k, n = r.gemm_mnk
        operands = m * k + k * n
        if r.bytes_read < BF16_BYTES * operands:
            raise ValueError(f"{r.region} {r.op}: reads {r.bytes_read} bytes, less than its bf16 operands; "
                             "FP8 is modeled from bf16 autocast counts only")
        records += _casts(r, recipe, weights_cast_once)
        records.append(dataclasses.replace(r, fp8=True, bytes_read=r.bytes_read - (BF16_BYTES - 1) * operands))
    return Count(meta=dict(count.meta, path=f"{count.meta.get('path')} + fp8 {recipe}"), records=records,
                 saved_activation_bytes=count.saved_activation_bytes, saved_weight_bytes=count.saved_weight_bytes)
