"""Second reduction stage (`sum_rows`) under the interpreter vs a float64 sum of the same fp32 partial rows.

Every fused backward finishes its sums over tokens here, so the cases take many loop steps (R = 8k + 3 rows:
the last step partial), several 512-wide column programs (the last partial), several groups and 1 to 5
outputs of mixed dtypes, read through padded strides. Gaps between partial rows hold NaN (a read of one
poisons the sum) and guard elements around every output catch stray writes.

What is deterministic in principle: each output is an fp32 sum in some fixed order (the order inside a
BLOCK_R tile is the compiler's), rounded once to the output dtype. Any order has an error within
gamma_m * sum |x| of the exact sum, m = the additions an element goes through (BLOCK_R - 1 inside its tile,
one per loop step after). An fp32 output must lie within that bound; a bf16 output must be the rounding of
some value within it (rounding is monotone, so the admissible bf16 values are those between the roundings of
the bound's ends): the correctly rounded sum, or its neighbour when the sum lies that close to a tie; more
only where rows cancel so far that the fp32 bound spans several bf16 ulps of the result.
"""

from __future__ import annotations

import pytest
import torch
import triton
from triton_interp import use_gpu_bf16_rounding

from jit_kernels import _common

use_gpu_bf16_rounding()

SUM_ROWS = _common.sum_rows  # the entry point under test
BLOCK_R = _common.SUM_ROWS_CONFIG.kwargs["BLOCK_R"]
BLOCK_C = _common.SUM_ROWS_CONFIG.kwargs["BLOCK_C"]
GROUPS = 3
COLS = 2 * BLOCK_C + 76  # three column programs, the last 76 wide
GUARD = 7
SENTINEL = 1234.5

F32, BF16 = torch.float32, torch.bfloat16
ADALN = (BF16, BF16, F32, BF16)  # rmsnorm_modulate stage 2 under autocast: dshift, dscale, dweight rows, dgate
# (output dtypes, layout): every output count once, each layout with all five outputs
CASES = [
    ((F32,), "row-major"),
    ((BF16,), "output-major"),
    ((F32, BF16), "broadcast"),
    ((BF16, F32, BF16), "row-major"),
    (ADALN, "output-major"),
    (ADALN + (F32,), "row-major"),
    (ADALN + (F32,), "output-major"),
    (ADALN + (F32,), "broadcast"),
]


def strides(layout: str, rows: int, n_out: int) -> tuple[int, int, int, int]:
    """(stride_g, stride_r, stride_j, buffer size) of a partials layout with gaps between its rows.

    "row-major": a row holds every output's partial (the rmsnorm_modulate stage 2 layout), groups outermost;
    "output-major": each output's rows are one block (stage 3); "broadcast": stride_g = 0, every group sums
    the same rows."""
    if layout == "row-major":
        stride_j = COLS + 3
        stride_r = n_out * stride_j + 5
        stride_g = rows * stride_r + 11
        return stride_g, stride_r, stride_j, GROUPS * stride_g
    if layout == "output-major":
        stride_r = COLS + 2
        stride_g = rows * stride_r + 9
        stride_j = GROUPS * stride_g + 4
        return stride_g, stride_r, stride_j, n_out * stride_j
    stride_r = COLS + 1
    stride_j = rows * stride_r + 6
    return 0, stride_r, stride_j, n_out * stride_j


def run_case(rows: int, dtypes: tuple[torch.dtype, ...], layout: str) -> None:
    """Launch `SUM_ROWS` on NaN-padded random partials and check every output against the float64 sum."""
    n_out = len(dtypes)
    stride_g, stride_r, stride_j, size = strides(layout, rows, n_out)
    partials = torch.full((size,), float("nan"))
    groups_stored = 1 if stride_g == 0 else GROUPS
    scale = torch.exp2(torch.randint(-6, 7, (n_out, groups_stored, rows, 1)).float())  # magnitudes that cancel
    values = torch.randn(n_out, groups_stored, rows, COLS) * scale
    partials.as_strided(values.shape, (stride_j, stride_g, stride_r, 1)).copy_(values)
    src = partials.as_strided((n_out, GROUPS, rows, COLS), (stride_j, stride_g, stride_r, 1)).double()
    assert not src.isnan().any()

    guarded = [torch.full((GROUPS * COLS + 2 * GUARD,), SENTINEL, dtype=dt) for dt in dtypes]
    outs = [g[GUARD:-GUARD].view(GROUPS, COLS) for g in guarded]
    for o in outs:
        o.fill_(float("nan"))
    SUM_ROWS(partials, outs, rows, stride_g, stride_r, stride_j)

    exact = src.sum(2)
    additions = BLOCK_R - 1 + triton.cdiv(rows, BLOCK_R)
    u32, u64 = 2.0**-24, 2.0**-53
    bound = (additions * u32 / (1 - additions * u32) + rows * u64 / (1 - rows * u64)) * src.abs().sum(2)
    for j, (out, g) in enumerate(zip(outs, guarded, strict=True)):
        assert torch.all(g[:GUARD] == SENTINEL) and torch.all(g[-GUARD:] == SENTINEL), f"output {j}: stray write"
        got = out.double()
        if out.dtype == F32:
            err = (got - exact[j]).abs()
            assert torch.all(err <= bound[j]), f"output {j}: max error {err.max():.3e}, bound {bound[j].max():.3e}"
        else:
            lo = (exact[j] - bound[j]).float().to(out.dtype).double()
            hi = (exact[j] + bound[j]).float().to(out.dtype).double()
            inside = (lo <= got) & (got <= hi)
            assert torch.all(inside), f"output {j}: {(~inside).sum()} elements not a rounding of the sum"


@pytest.mark.parametrize(
    "dtypes,layout", CASES, ids=[",".join(str(t).removeprefix("torch.") for t in d) + "-" + lay for d, lay in CASES]
)
def test_sum_rows_many_steps(dtypes: tuple[torch.dtype, ...], layout: str) -> None:
    """43 rows = 5 full steps of BLOCK_R plus 3 rows, over 3 column programs and 3 groups."""
    run_case(5 * BLOCK_R + 3, dtypes, layout)


@pytest.mark.parametrize("rows", [3, 5 * BLOCK_R])
def test_sum_rows_step_counts(rows: int) -> None:
    """A single partial step, and whole steps only (no masked rows)."""
    run_case(rows, (BF16, F32), "row-major")


@pytest.mark.slow
def test_sum_rows_production_steps() -> None:
    """203 rows (26 steps, the last 3 rows): stage 2 of rmsnorm_modulate over 801 tokens, five outputs."""
    run_case(25 * BLOCK_R + 3, ADALN + (F32,), "row-major")


def test_sum_rows_rejects_bad_outputs() -> None:
    """Output count and shapes are checked before launching."""
    partials = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="1 to 5 outputs"):
        SUM_ROWS(partials, [], 4, 0, 8)
    with pytest.raises(ValueError, match="1 to 5 outputs"):
        SUM_ROWS(partials, [torch.empty(8), torch.empty(9)], 4, 0, 8)
    with pytest.raises(ValueError, match="must be contiguous"):
        SUM_ROWS(partials, [torch.empty(8, 2).t()], 4, 0, 8)
