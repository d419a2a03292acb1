"""On-device verification of a user's first GPU run: the fused ops, then a whole block and the sampler.

    python -m jit_fast.selfcheck [--json PATH] [--only SUBSTRING]

Runs every check of `jit_kernels.selfcheck` (each fused op forward and backward against float64 at production
shapes, bitwise-deterministic backward, dropout masks), then a whole JiT-B/16 block through
`torch.compile(fullgraph=True)` under the device's low-precision autocast (bf16, else fp16) against float64
within the same rule, and CUDA-graph capture + replay of the sampler's step bitwise equal to running that step
eagerly, every attention backend the GPU runs (flash-attn 3 / 2, cuDNN, SDPA) against float64, and on sm_89+
the float8 GEMM of each `--fp8` recipe. Those need
the model package, so they live here: the kernel package imports nothing from `jit_fast`.
One PASS/FAIL line per check, exit 1 on any failure; without CUDA there is nothing to check (exit 0).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from types import SimpleNamespace

import torch

from jit_fast.model.attention import BACKENDS, SDPA, Backend, run_at
from jit_fast.model.network import build_model
from jit_fast.sampling.sampler import StaticSampler
from jit_kernels import OpTable, get_ops
from jit_kernels.selfcheck import (
    MODE_DTYPES,
    PRODUCTION,
    Check,
    Sizes,
    judge,
    kernel_checks,
    low_precision,
)
from jit_kernels.selfcheck import main as run_main


def _perturbed_model(kernels: str, device: torch.device | str, overrides: dict, seed: int = 0) -> torch.nn.Module:
    """JiT-B/16 (with `overrides`) whose parameters are all perturbed: the official init zeroes adaLN and the
    output layer, which would make the gated branches vanish."""
    torch.manual_seed(seed)
    net = build_model("JiT-B/16", kernels=kernels, **overrides)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.to(device)


def _use_table(module: torch.nn.Module, table: OpTable) -> torch.nn.Module:
    """Point every submodule's op table at `table` (e.g. the eager reference for the float64 block)."""
    for m in module.modules():
        if hasattr(m, "ops"):
            m.ops = table
    return module


def _block_inputs(net: torch.nn.Module, idx: int, batch: int, device: torch.device | str,
                  amp: torch.dtype) -> tuple[tuple, dict]:
    """The positional and keyword inputs block `idx` receives in an `amp`-autocast forward of `net`."""
    captured = {}

    class _Stop(Exception):
        pass

    def hook(_m, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Stop

    cfg = net.cfg
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen).to(device)
    t = torch.rand(batch, generator=gen).to(device)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen).to(device)
    handle = net.blocks[idx].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=amp):
            net(x, t, y)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["args"], captured["kwargs"]


def check_block(device: torch.device | str, sizes: Sizes = PRODUCTION, backend: str = "inductor") -> str:
    """A JiT-B/16 block (after the in-context tokens, with a pending residual) with the fused custom ops through
    torch.compile(fullgraph=True) under the device's low-precision autocast (bf16, else fp16): output and every
    input / parameter gradient against a float64 eager block, bounded by the eager autocast block's own error (the
    rule of the CPU tests)."""
    low = MODE_DTYPES[low_precision(device)]
    net = _perturbed_model("triton", device, sizes.model).train()
    idx = min(net.cfg.in_context_start + 1, net.cfg.depth - 1)
    (x, c, rope, pending, out_dtype, *_), _ = _block_inputs(net, idx, sizes.block_batch, device, low)
    if pending is None:
        raise ValueError(f"block {idx} gets no pending residual: use a model with depth > in_context_start + 1")
    leaves = {"x": x, "c": c, "branch": pending[0], "gate": pending[1]}
    block = net.blocks[idx]
    eager = _use_table(copy.deepcopy(block), get_ops("torch"))
    ref = _use_table(copy.deepcopy(block), get_ops("torch")).double()
    compiled = torch.compile(block, fullgraph=True, backend=backend)
    amp = torch.autocast(torch.device(device).type, dtype=low)
    no_amp = torch.autocast(torch.device(device).type, enabled=False)
    runs = {"fused": (compiled, block, None, amp, out_dtype), "eager": (eager, eager, None, amp, out_dtype),
            "float64": (ref, ref, torch.float64, no_amp, None)}
    gen = torch.Generator().manual_seed(3)
    upstream = None
    results = {}
    for name, (call, params, cast, ctx, out) in runs.items():
        ins = {k: v.detach().to(cast or v.dtype).requires_grad_() for k, v in leaves.items()}
        with ctx:
            outs = call(ins["x"], ins["c"], tuple(r.to(cast or r.dtype) for r in rope), (ins["branch"], ins["gate"]),
                        out)
        if upstream is None:
            upstream = [torch.randn(o.shape, generator=gen).to(device) for o in outs]
        torch.autograd.backward(list(outs), [u.to(o.dtype) for u, o in zip(upstream, outs, strict=True)])
        named = {f"out{i}": o.detach() for i, o in enumerate(outs)}
        named.update({f"d{k}": v.grad for k, v in ins.items()})
        named.update({f"d{k}": p.grad for k, p in params.named_parameters() if p.requires_grad})
        results[name] = named
    fused, eager_t, ref_t = results["fused"], results["eager"], results["float64"]
    missing = sorted(k for k in ref_t if fused.get(k) is None)
    if missing:
        raise AssertionError(f"compiled block produced no {missing}")
    return f"{len(ref_t)} tensors; " + judge((k, fused[k], ref_t[k], eager_t[k]) for k in ref_t)


def check_sampler_graph(device: torch.device | str, sizes: Sizes = PRODUCTION, graph: bool | None = None) -> str:
    """The sampler's static step captured in CUDA graphs and replayed (Heun with interval CFG, so guided and
    unguided step kinds are both captured) gives bitwise the images of running that step eagerly."""
    net = _perturbed_model("triton", device, sizes.model).eval()
    cfg = net.cfg
    graph = torch.device(device).type == "cuda" if graph is None else graph
    gen = torch.Generator().manual_seed(4)
    noise = torch.randn(sizes.sampler_batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    y = torch.randint(0, cfg.num_classes, (sizes.sampler_batch,), generator=gen)
    images = []
    for use_graph in (False, graph):
        sampler = StaticSampler(net, sizes.sampler_batch, steps=sizes.sampler_steps, interval=(0.3, 1.0),
                                num_classes=cfg.num_classes, device=device,
                                autocast_dtype=MODE_DTYPES[low_precision(device)],
                                cuda_graph=use_graph)
        images.append(sampler.run(noise, y.to(device), 2.9))
        kinds = len(sampler.graphs)
    if not torch.equal(images[0], images[1]):
        diff = (images[0].double() - images[1].double()).abs().max().item()
        raise AssertionError(f"graph replay differs from the eager step: max |diff| {diff:.3e}")
    how = f"{kinds} step kinds captured + replayed" if graph else "graphs off (no CUDA): eager vs eager"
    return f"{sizes.sampler_steps} Heun steps, batch {sizes.sampler_batch}: bitwise equal; {how}"


def check_attention(backend: Backend, device: torch.device | str, sizes: Sizes = PRODUCTION) -> str:
    """One attention backend at the production (heads, head dim) of B, H and G, forward and backward in the
    device's low precision, against float64 within the rule that bounds by the math path's own error."""
    low = MODE_DTYPES[low_precision(device)]
    items = []
    for heads, d in sizes.heads:
        dim = backend.padded_dim(d) or d
        gen = torch.Generator().manual_seed(d)
        qkv = [torch.randn(2, sizes.tokens, heads, d, generator=gen, dtype=torch.float64) for _ in range(3)]
        up = torch.randn(2, sizes.tokens, heads, d, generator=gen, dtype=torch.float64)
        outs = []
        for i, dtype in enumerate((low, torch.float64, low)):  # the backend, then the math path twice
            leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in qkv]
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]) if i else \
                    contextlib.nullcontext():
                out = run_at(SDPA, d, *leaves) if i else run_at(backend, dim, *leaves)
            out.backward(up.to(device, dtype))
            outs.append([out, *(t.grad for t in leaves)])
        items += [(f"{name} d={d}", a, r, e) for name, a, r, e in zip(("out", "dq", "dk", "dv"), *outs, strict=True)]
    return judge(items)


def attention_checks(device: torch.device | str, sizes: Sizes = PRODUCTION) -> list[Check]:
    """A check per attention backend this device runs (installed, its GPU generation); none without CUDA."""
    if torch.device(device).type != "cuda":
        return []
    cap = torch.cuda.get_device_capability(device)
    return [Check(f"attention {b.name}: fwd+bwd at head dims {', '.join(str(d) for _, d in sizes.heads)} vs float64",
                  ("attention", b.name), lambda b=b: check_attention(b, device, sizes))
            for b in (*BACKENDS, SDPA) if b.installed() and cap >= b.min_capability]


# e4m3 keeps 3 mantissa bits (unit roundoff 2^-4): one float8 GEMM of random data lands near 2^-5 relative error
# (measured 2.4e-2 to 3.3e-2 emulated); 2^-3 leaves room for any reduction order and is ~10x under a wrong GEMM.
FP8_GEMM_BOUND = 2.0**-3


def check_fp8_gemm(recipe: str, device: torch.device | str, sizes: Sizes = PRODUCTION, emulate: bool = False) -> str:
    """The float8 GEMM the block linears run under `--fp8 recipe`, forward and both gradients, at each production
    width (tokens of two images, a (3D, D) qkv weight), against float64 within FP8_GEMM_BOUND."""
    from jit_fast.model import fp8

    gemm = fp8.float8_gemm(fp8.float8_config(recipe, emulate=emulate))
    worst = (0.0, "")
    for d in sizes.widths:
        gen = torch.Generator().manual_seed(d)
        x = torch.randn(2, sizes.tokens, d, generator=gen, dtype=torch.float64)
        w = torch.randn(3 * d, d, generator=gen, dtype=torch.float64) / d**0.5
        up = torch.randn(2, sizes.tokens, 3 * d, generator=gen, dtype=torch.float64)
        xs, ws = (t.to(device, torch.bfloat16).requires_grad_() for t in (x, w))
        out = gemm(xs, ws)
        out.backward(up.to(device, out.dtype))
        want = (x @ w.T, up @ w, up.flatten(0, 1).T @ x.flatten(0, 1))
        for name, got, ref in zip(("out", "dx", "dw"), (out, xs.grad, ws.grad), want, strict=True):
            err = float((got.double().cpu() - ref).norm() / ref.norm())
            if not err <= FP8_GEMM_BOUND:
                raise AssertionError(f"{recipe} {name} D={d}: rel err {err:.2e} > {FP8_GEMM_BOUND:.2e}")
            worst = max(worst, (err, f"{name} D={d}"))
    return f"worst {worst[1]}: rel err {worst[0]:.2e} <= bound {FP8_GEMM_BOUND:.2e}"


def fp8_checks(device: torch.device | str, sizes: Sizes = PRODUCTION) -> list[Check]:
    """A check per --fp8 recipe where it runs (torchao installed, an sm_89+ GPU); none elsewhere."""
    from jit_fast.model import fp8

    if fp8.refusal(fp8.RECIPES[0], False, torch.device(device)) is not None:
        return []
    return [Check(f"fp8 {r}: float8 GEMM of the block linears, fwd+bwd vs float64", ("fp8", r),
                  lambda r=r: check_fp8_gemm(r, device, sizes)) for r in fp8.RECIPES]


def all_checks(device: torch.device | str, sizes: Sizes = PRODUCTION, ops: SimpleNamespace | None = None,
               backend: str = "inductor", graph: bool | None = None) -> list[Check]:
    """Every check of a selfcheck run, in report order: the fused ops', then the block's and the sampler's."""
    return [
        *kernel_checks(device, sizes, ops),
        *attention_checks(device, sizes),
        *fp8_checks(device, sizes),
        Check(f"JiT-B/16 block, torch.compile(fullgraph=True), {low_precision(device)} autocast, fwd+bwd vs float64",
              ("block",),
              lambda: check_block(device, sizes, backend)),
        Check("sampler step: CUDA graph capture + replay vs eager", ("sampler",),
              lambda: check_sampler_graph(device, sizes, graph)),
    ]


def main(argv: list[str] | None = None, checks: list[Check] | None = None) -> int:
    """CLI: the kernel checks plus the block and sampler checks on cuda; exit 1 on any failure."""
    return run_main(argv, checks, build=all_checks, prog="jit_fast.selfcheck", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
