"""On-device verification of the fused ops alone (`python -m jit_fast.selfcheck` adds the model's checks).

    python -m jit_kernels.selfcheck [--json PATH] [--only SUBSTRING]

On CUDA it checks, at production shapes (JiT-B/H/G widths 768/1280/1664, head dims 64/80/104, SwiGLU widths
2048/3413/4437, batches whose row sums take several loop steps and whose heads span several programs):
every fused op forward and backward against float64 references computed on the device, in fp32 and in the
bf16- and fp16-autocast dtypes (fp16 only on GPUs without bf16, e.g. the T4), with the bounds of the CPU tests
(`jit_kernels.numerics.assert_within_rule`: norm-wise and element-wise); two backward runs bitwise equal (no atomics:
deterministic by construction); the fused dropout's masks equal the CPU twin's bit for bit. Prints one
PASS/FAIL line per check and exits 1 on any failure. Without CUDA there is nothing to check: it says so, exits 0.

`jit_kernels/` imports nothing from `jit_fast`: the whole-block and sampler checks, which need the model, are
`jit_fast.selfcheck`'s, built on the runner and report here. The check functions take a device, sizes and an
op table, so the tests run them on CPU tensors under TRITON_INTERPRET=1 at tiny shapes (tests/test_selfcheck.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TextIO

import torch

from jit_kernels.dropout import Dropout, keep_mask
from jit_kernels.numerics import assert_within_rule, error_bound
from jit_kernels.spec import EPS, MODE_DTYPES, OpCase
from jit_kernels.table import OpTable, get_ops, op_specs

MODES = tuple(MODE_DTYPES)


def device_modes(device: torch.device | str) -> tuple[str, ...]:
    """Modes a device runs: all of `MODES`, but no bf16 on a GPU older than sm_80 (Turing and older)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return tuple(m for m in MODES if m != "bf16")
    return MODES


def low_precision(device: torch.device | str) -> str:
    """The autocast mode of the device's training runs: bf16 where the device has it, else fp16."""
    return "bf16" if "bf16" in device_modes(device) else "fp16"


@dataclass(frozen=True)
class Sizes:
    """Shapes of one selfcheck run (PRODUCTION on a GPU; tests pass tiny ones)."""

    norm_batch: int = 32  # rmsnorm_modulate: the stage-3 row sum over the batch takes 4 loop steps
    tokens: int = 288  # 256 patches + 32 in-context tokens (JiT at 256 px)
    widths: tuple[int, ...] = (768, 1280, 1664)
    qk_batch: int = 16  # 4608 tokens: 18 backward programs per head, the last one partial
    heads: tuple[tuple[int, int], ...] = ((12, 64), (16, 80), (16, 104))  # (heads, head dim): B, H, G
    swiglu_rows: int = 8 * 288  # 36 backward programs: the bias-gradient sum takes 5 loop steps
    hidden: tuple[int, ...] = (2048, 3413, 4437)  # B, H, G (unpadded)
    block_batch: int = 8
    model: dict = field(default_factory=dict)  # build_model overrides of JiT-B/16 for the block / sampler checks
    sampler_batch: int = 8
    sampler_steps: int = 4


PRODUCTION = Sizes()


@dataclass
class CheckResult:
    """One line of the report: which fused ops it covers, PASS/FAIL and what was measured."""

    name: str
    ops: tuple[str, ...]
    passed: bool
    detail: str


@dataclass(frozen=True)
class Check:
    """A named check covering some op-table entries; `run()` returns a detail string or raises on failure."""

    name: str
    ops: tuple[str, ...]
    run: Callable[[], str]


# ------------------------------------------------------------------------------------------------
# Shared machinery: inputs, forward + backward, the rule.


def _run(call: Callable[[dict], tuple], inputs: dict, grad_names: Iterable[str], upstream: list[torch.Tensor],
         cast: torch.dtype | None = None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Forward `call(leaves)` then backward with `upstream` (cast to each output's dtype); (outputs, grads)."""
    grad_names = set(grad_names)
    leaves = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().clone() if cast is None or not v.is_floating_point() else v.detach().to(cast)
            v.requires_grad_(k in grad_names)
        leaves[k] = v
    outs = [o for o in call(leaves)]
    torch.autograd.backward(outs, [g.to(o.dtype) for g, o in zip(upstream, outs, strict=True)])
    return [o.detach() for o in outs], {k: leaves[k].grad for k in grad_names}


def judge(items: Iterable[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> str:
    """Apply the CPU tests' rule to every (name, actual, float64 expected, eager or None) and return the
    tightest margin; raises AssertionError naming the first tensor out of bounds."""
    worst = (0.0, "", 0.0, 0.0)
    for name, actual, expected, eager in items:
        err = assert_within_rule(name, actual, expected, eager)
        bound = error_bound(eager, expected)
        worst = max(worst, (err / bound, name, err, bound))
    return f"worst {worst[1]}: rel err {worst[2]:.2e} <= bound {worst[3]:.2e}"


def _compare_op(call_kernel, call_ref, inputs: dict, grad_names: tuple[str, ...], out_names: tuple[str, ...],
                upstream: list[torch.Tensor], low: torch.dtype | None) -> str:
    """Kernel vs float64 reference, bounded by the eager reference's own error in the run's dtypes (`low`: the
    autocast dtype, bf16 or fp16; None for fp32 runs)."""
    k_out, k_grad = _run(call_kernel, inputs, grad_names, upstream)
    r_out, r_grad = _run(lambda t: call_ref(t, None), inputs, grad_names, upstream, cast=torch.float64)
    e_out, e_grad = _run(lambda t: call_ref(t, low), inputs, grad_names, upstream) if low is not None else (
        [None] * len(k_out), dict.fromkeys(grad_names))
    items = [(n, k, r, e) for n, k, r, e in zip(out_names, k_out, r_out, e_out, strict=True)]
    items += [("d" + n, k_grad[n], r_grad[n], e_grad[n]) for n in grad_names]
    return judge(items)


def _bitwise_twice(call_kernel, inputs: dict, grad_names: tuple[str, ...], upstream: list[torch.Tensor]) -> str:
    """Two forward + backward runs on the same inputs give bitwise equal outputs and gradients."""
    a_out, a_grad = _run(call_kernel, inputs, grad_names, upstream)
    b_out, b_grad = _run(call_kernel, inputs, grad_names, upstream)
    pairs = list(zip(a_out, b_out, strict=True)) + [(a_grad[n], b_grad[n]) for n in grad_names]
    differing = sum(not torch.equal(x, y) for x, y in pairs)
    if differing:
        raise AssertionError(f"{differing} of {len(pairs)} outputs/gradients differ between two identical runs")
    return f"{len(pairs)} outputs and gradients bitwise equal"


# ------------------------------------------------------------------------------------------------
# The checks: every case every registered op declares (`OpSpec.cases`), then the dropout masks.


def _numerics(case: OpCase, device: torch.device | str, mode: str, table: OpTable) -> Callable[[], str]:
    """Check function comparing a case's kernel with its float64 reference (and the eager path, outside fp32)."""
    def run() -> str:
        data = case.make(device, mode, 0)
        low = None if mode == "fp32" else MODE_DTYPES[mode]
        ref = get_ops("torch")
        return _compare_op(lambda v: data.call(table, v, low), lambda v, out: data.call(ref, v, out), data.inputs,
                           data.grads, data.outs, data.upstream, low)

    return run


def _determinism(case: OpCase, device: torch.device | str, mode: str, table: OpTable) -> Callable[[], str]:
    """Check function running a case's kernel forward + backward twice."""
    def run() -> str:
        data = case.make(device, mode, 1)
        low = None if mode == "fp32" else MODE_DTYPES[mode]
        return _bitwise_twice(lambda v: data.call(table, v, low), data.inputs, data.grads, data.upstream)

    return run


def _cases(sizes: Sizes, kind: str) -> list[OpCase]:
    """Every registered op's cases of `kind`, in registry order."""
    return [case for spec in op_specs() for case in spec.cases(sizes) if case.kind == kind]


def op_checks(device: torch.device | str, sizes: Sizes = PRODUCTION, ops: OpTable | None = None) -> list[Check]:
    """Numerics (the device's modes of fp32, bf16, fp16; every width / head dim / bias variant) and determinism of
    every fused op (in the device's low precision).

    Cases are built lazily (inside each check), so a failing allocation is one FAIL line, not a crash."""
    ops = ops or get_ops("triton")
    modes, low = device_modes(device), low_precision(device)
    checks = [Check(f"{c.entry} {mode} {c.label}", (c.entry,), _numerics(c, device, mode, ops))
              for c in _cases(sizes, "numerics") for mode in modes]
    return checks + [Check(f"{c.entry} {low} backward twice: bitwise", (c.entry,), _determinism(c, device, low, ops))
                     for c in _cases(sizes, "determinism")]


def _dropout_masks(ops: OpTable, device: torch.device | str, sizes: Sizes) -> str:
    """The masks the kernels apply, read off their outputs and gradients, equal the CPU twin's bit for bit: residual
    op with x = 0, gate = branch = 1 (x_out and, with dx_out = 1 and dy = 0, dbranch are keep * scale) and SwiGLU
    with x1 = 4, x2 = 1 (h and, with dh = 1, dx2 are nonzero exactly where kept)."""
    b, n, d, h, rows = sizes.norm_batch, sizes.tokens, sizes.widths[-1], sizes.hidden[-1], sizes.swiglu_rows
    seed = torch.tensor([0x5EED_D50F_0123_4567], dtype=torch.int64)
    site = {"residual": Dropout(0.2, seed, 17), "swiglu": Dropout(0.2, seed, 18)}
    on_device = {k: v._replace(seed=seed.to(device)) for k, v in site.items()}
    ones, zero_v = torch.ones(b, n, d, device=device), torch.zeros(b, d, device=device)
    branch = ones.clone().requires_grad_()
    x_out, y = ops.residual_rmsnorm_modulate(torch.zeros_like(ones), branch, torch.ones(b, d, device=device),
                                             torch.ones(d, device=device), zero_v, zero_v, EPS, None, None,
                                             on_device["residual"])
    torch.autograd.backward([x_out, y], [ones, torch.zeros_like(y)])
    x12 = torch.cat((torch.full((rows, h), 4.0, device=device), torch.ones(rows, h, device=device)), -1)
    x12.requires_grad_()
    out = ops.swiglu(x12, None, on_device["swiglu"])
    out.backward(torch.ones_like(out))
    got = {"residual forward": x_out != 0, "residual backward": branch.grad != 0,
           "swiglu forward": out != 0, "swiglu backward": x12.grad[:, h:] != 0}
    twin = {"residual": keep_mask(site["residual"], b * n, d), "swiglu": keep_mask(site["swiglu"], rows, h)}
    wrong = [name for name, mask in got.items()
             if not torch.equal(mask.reshape(-1, mask.shape[-1]).cpu(), twin[name.split()[0]])]
    if wrong:
        raise AssertionError(f"masks differ from the CPU twin: {', '.join(wrong)}")
    return f"4 masks ({b * n} x {d}, {rows} x {h}) bitwise equal to the twin's"


def dropout_checks(device: torch.device | str, sizes: Sizes = PRODUCTION, ops: OpTable | None = None) -> list[Check]:
    """Fused dropout on the device: the kernels draw the CPU twin's masks (the Philox words and their layout exchange
    run compiled only here), and the ops' dropout cases meet the rule against float64 with the same mask (bf16, or
    fp16 where the device has no bf16)."""
    ops = ops or get_ops("triton")
    low = low_precision(device)
    masks = Check("dropout masks: kernels (forward and backward) vs CPU twin, bitwise",
                  ("residual_rmsnorm_modulate", "swiglu"), lambda: _dropout_masks(ops, device, sizes))
    return [masks] + [Check(f"{c.entry} {low} {c.label}", (c.entry,), _numerics(c, device, low, ops))
                      for c in _cases(sizes, "dropout")]


def kernel_checks(device: torch.device | str, sizes: Sizes = PRODUCTION, ops: OpTable | None = None) -> list[Check]:
    """Every check of the fused ops alone (numerics, determinism, dropout masks), in report order."""
    return [*op_checks(device, sizes, ops), *dropout_checks(device, sizes, ops)]


# ------------------------------------------------------------------------------------------------
# Running and reporting.


def run_checks(checks: Iterable[Check], progress: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run every check; an exception of any kind is that check's FAIL (with its message), never a crash."""
    results = []
    for check in checks:
        try:
            res = CheckResult(check.name, check.ops, True, check.run())
        except Exception as exc:  # noqa: BLE001 - a failing check is reported, the others still run
            msg = str(exc).strip().splitlines()
            res = CheckResult(check.name, check.ops, False, f"{type(exc).__name__}: {msg[0] if msg else ''}")
        results.append(res)
        if progress is not None:
            progress(res)
    return results


def format_line(r: CheckResult, width: int = 78) -> str:
    """One table line: PASS/FAIL, the check's name, what it measured."""
    return f"{'PASS' if r.passed else 'FAIL'}  {r.name.ljust(width)}  {r.detail}"


def failed_ops(results: Iterable[CheckResult]) -> set[str]:
    """Op-table entries (and "block", "sampler") covered by at least one failing check."""
    return {op for r in results if not r.passed for op in r.ops}


def summary(results: list[CheckResult]) -> str:
    """Last line of the report."""
    bad = [r for r in results if not r.passed]
    verdict = "all checks passed" if not bad else f"FAILED: {', '.join(sorted(failed_ops(results)))}"
    return f"{len(results)} checks, {len(results) - len(bad)} passed, {len(bad)} failed: {verdict}"


def report(results: list[CheckResult], device_name: str, seconds: float) -> dict:
    """JSON-serialisable record of a run (`--json`; `benchmarks.run` reads `failed_ops`)."""
    return dict(device=device_name, torch=torch.__version__, seconds=seconds, passed=all(r.passed for r in results),
                failed_ops=sorted(failed_ops(results)), checks=[asdict(r) for r in results])


def selfcheck(device: torch.device | str = "cuda", sizes: Sizes = PRODUCTION, checks: list[Check] | None = None,
              out: TextIO | None = None, prog: str = "jit_kernels.selfcheck") -> dict:
    """Run the checks (default: `kernel_checks(device, sizes)`), print the table as it goes, return the report."""
    out = out or sys.stdout
    checks = kernel_checks(device, sizes) if checks is None else checks
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else str(device)
    print(f"{prog} on {name} (torch {torch.__version__}): {len(checks)} checks", file=out, flush=True)
    start = time.perf_counter()
    width = max((len(c.name) for c in checks), default=0)
    results = run_checks(checks, lambda r: print(format_line(r, width), file=out, flush=True))
    seconds = time.perf_counter() - start
    print(summary(results) + f" ({seconds:.0f} s)", file=out, flush=True)
    return report(results, name, seconds)


def main(argv: list[str] | None = None, checks: list[Check] | None = None,
         build: Callable[[str], list[Check]] = kernel_checks, prog: str = "jit_kernels.selfcheck",
         description: str | None = None) -> int:
    """CLI: exit 0 when every check passes (or there is no CUDA device: nothing to check), 1 otherwise.

    `build(device)` makes the device checks (`jit_fast.selfcheck` adds the model's); `checks` replaces them
    (tests inject failing ones to exercise the table and exit code)."""
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=description or __doc__.splitlines()[0])
    ap.add_argument("--json", type=str, default=None, help="also write the results to this JSON file")
    ap.add_argument("--only", default=None, help="only checks whose name contains this string")
    args = ap.parse_args(argv)
    if checks is None:
        if not torch.cuda.is_available():
            print(f"{prog}: CUDA is not available, nothing to check (the fused kernels run on GPUs; "
                  "on CPU the test suite runs them under TRITON_INTERPRET=1).")
            return 0
        checks = build("cuda")
    if args.only:
        checks = [c for c in checks if args.only in c.name]
    result = selfcheck("cuda" if torch.cuda.is_available() else "cpu", checks=checks, prog=prog)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
