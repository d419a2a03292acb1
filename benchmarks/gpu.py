"""GPU timings with `triton.testing.do_bench`: fused ops (`benchmarks.ops`), a block, a train step, sampling and the
data loader.

Each section compares the eager official model (`kernels="torch"`), the official release as shipped
(its blocks wrapped in `torch.compile`) and the fused Triton path. Without CUDA nothing is timed and
`run_gpu_suite` returns the skip message instead. Every bench function takes a `timer` (milliseconds
per call of a closure) so the wiring can be exercised on CPU by tests; such runs are never reported.

Before timing anything, `run_gpu_suite` runs `jit_fast.selfcheck` on the device and refuses to time the fused
path of any op that failed it (and the fused block, train step and sampling if any check failed): a speed
of wrong kernels is not reported.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from benchmarks.ops import bench_ops, case_entries
from jit_fast.configs import model_config
from jit_fast.model.network import build_model
from jit_fast.perf.blocks import block_index, block_leaves, capture_block_inputs, model_batch
from jit_fast.perf.roofline import GPUS, GPUSpec
from jit_fast.perf.traffic import PATH_KERNELS, count_block, count_train_step

SKIP_MESSAGE = "CUDA is not available on this machine: GPU timings were not taken."
PATHS = ("eager", "compiled", "fused")
Timer = Callable[[Callable[[], object]], float]


def cuda_ms(fn: Callable[[], object], rep_ms: int = 200) -> float:
    """Median milliseconds per call measured by `triton.testing.do_bench` (CUDA events, L2 flushed)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def gpu_spec(device_name: str) -> GPUSpec | None:
    """The datasheet entry matching a CUDA device name, else None.

    The constants are the SXM parts (A100 80GB, H100, H200); PCIe and 40GB variants have other
    bandwidths and clocks, so they get no entry (no % of peak is printed rather than a wrong one).
    """
    name = device_name.upper()
    if "PCIE" in name or "40GB" in name or "NVL" in name:
        return None
    return next((spec for key, spec in GPUS.items() if key in name), None)


def _autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _fwd_bwd(fn: Callable, args: tuple, params: list[torch.Tensor] = ()) -> Callable[[], object]:
    """Closure: forward, then gradients of the float outputs w.r.t. every grad-requiring tensor in `args`
    (nested too) and `params`: the whole backward, weight gradients included, without accumulation kernels."""
    wrt = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad] + list(params)
    out = fn(*args)
    outs = [o for o in (out if isinstance(out, tuple | list) else (out,)) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outs]

    def run() -> object:
        o = fn(*args)
        o = [t for t in (o if isinstance(o, tuple | list) else (o,)) if t.requires_grad]
        return torch.autograd.grad(o, wrt, grads)

    return run


def refused_paths(failed: set[str] | frozenset[str]) -> dict[str, tuple[str, ...]]:
    """What selfcheck failures forbid timing: the fused path of each failed op (key = op name) and, if anything
    failed, the fused path of the aggregate sections (key "aggregate": block, train step, sampling)."""
    out: dict[str, tuple[str, ...]] = {op: ("fused",) for op in case_entries() if op in failed}
    if failed:
        out["aggregate"] = ("fused",)
    return out


def bench_block(
    model: str, batch: int, img_size: int, device: str, timer: Timer = cuda_ms, paths: tuple[str, ...] = PATHS,
    peak_flops: float | None = None,
) -> list[dict]:
    """A standard block's fwd and fwd+bwd ms per path, with MFU from the counted model FLOPs.

    `img_per_s_depth_blocks` = batch / (depth x fwd+bwd time): the training rate of the blocks alone.
    """
    rows = []
    for path in paths:
        count_path = "fused" if path == "fused" else "eager"
        torch.manual_seed(0)
        net = build_model(model, img_size, kernels=PATH_KERNELS[count_path]).to(device).train()
        idx = block_index(net.cfg, "standard")
        with _autocast(device):
            args, kwargs = capture_block_inputs(net, idx, batch, device)
        args = block_leaves(args)
        block = torch.compile(net.blocks[idx]) if path == "compiled" else net.blocks[idx]

        def call(*a, block=block, kwargs=kwargs):
            with _autocast(device):
                return block(*a, **kwargs)

        fwd = timer(lambda call=call, args=args: call(*args))
        fwd_bwd = timer(_fwd_bwd(call, args, [p for p in net.blocks[idx].parameters() if p.requires_grad]))
        flops = count_block(model, count_path, batch, img_size).totals()
        fwd_flops = count_block(model, count_path, batch, img_size, backward=False).totals()["model_flops"]
        depth = net.cfg.depth
        row = dict(path=path, block=idx, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd,
                   img_per_s_depth_blocks=batch / (depth * fwd_bwd * 1e-3))
        if peak_flops:
            row["mfu_fwd"] = fwd_flops / (fwd * 1e-3) / peak_flops
            row["mfu_fwd_bwd"] = flops["model_flops"] / (fwd_bwd * 1e-3) / peak_flops
        rows.append(row)
        del net, block
    return rows


def make_train_step(model: str, path: str, batch: int, img_size: int, device: str) -> Callable[[], object]:
    """One full step: bf16-autocast loss, backward, fused AdamW, two EMA updates (blocks compiled if asked)."""
    from jit_fast.model.denoiser import flow_matching_loss
    from jit_fast.train.ema import EMA

    torch.manual_seed(0)
    net = build_model(model, img_size, kernels=PATH_KERNELS["fused" if path == "fused" else "eager"]).to(device)
    net.train()
    if path == "compiled":
        for block in net.blocks:
            block.compile()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=device != "cpu")
    emas = [EMA(params, 0.9999), EMA(params, 0.9996)]
    x, _, y = model_batch(net.cfg, batch, device)

    def step() -> None:
        with _autocast(device):
            loss = flow_matching_loss(net, x, y, num_classes=net.cfg.num_classes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for ema in emas:
            ema.update(params)

    return step


def bench_train_step(
    model: str, batch: int, img_size: int, device: str, timer: Timer = cuda_ms, paths: tuple[str, ...] = PATHS,
    peak_flops: float | None = None,
) -> list[dict]:
    """Full train-step ms, images/s and MFU (counted model FLOPs / time / peak) per path."""
    rows = []
    for path in paths:
        step = make_train_step(model, path, batch, img_size, device)
        ms = timer(step)
        flops = count_train_step(model, "fused" if path == "fused" else "eager", batch, img_size).totals()
        row = dict(path=path, step_ms=ms, img_per_s=batch / (ms * 1e-3))
        if peak_flops:
            row["mfu"] = flops["model_flops"] / (ms * 1e-3) / peak_flops
        rows.append(row)
        del step
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_sampling(
    model: str, batch: int, img_size: int, device: str, steps: int = 10, cfg: float = 2.9,
    configs: tuple[tuple[str, bool], ...] = (("eager", False), ("fused", False), ("fused", True)),
) -> list[dict]:
    """Wall-clock images/s of a `steps`-step Heun run with CFG per (path, CUDA graph) configuration."""
    from jit_fast.sampling.sampler import StaticSampler

    rows = []
    for path, graphs in configs:
        torch.manual_seed(0)
        net = build_model(model, img_size, kernels=PATH_KERNELS[path]).to(device).eval()
        sampler = StaticSampler(net, batch, steps=steps, device=device, autocast_dtype=torch.bfloat16,
                                cuda_graph=graphs, img_size=img_size, num_classes=net.cfg.num_classes)
        noise = torch.randn(batch, 3, img_size, img_size, device=device)
        y = torch.randint(0, net.cfg.num_classes, (batch,), device=device)
        sampler.run(noise, y, cfg)
        _sync(device)
        start = time.perf_counter()
        sampler.run(noise, y, cfg)
        _sync(device)
        seconds = time.perf_counter() - start
        rows.append(
            dict(path=path, cuda_graph=graphs, steps=steps, cfg=cfg, seconds=seconds, img_per_s=batch / seconds)
        )
        del net, sampler
    return rows


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_data(
    img_size: int, batch: int, images: int = 512, batches: int = 10, workers: int = 4,
    backends: tuple[str, ...] = ("dali", "torch"),
) -> dict:
    """Loader images/s (and CPU ms per image) per backend on a synthetic ImageNet-like JPEG folder."""
    from benchmarks.data import make_synthetic, measure

    args = argparse.Namespace(img_size=img_size, batch_size=batch, workers=workers, batches=batches, warmup=2)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = str(make_synthetic(Path(tmp), images))
        for backend in backends:
            try:
                rate, cpu_ms = measure(root, backend, args)
                out[backend] = dict(images_per_s=rate, cpu_ms_per_image=cpu_ms)
            except Exception as e:  # noqa: BLE001 - a missing backend is reported, not fatal
                out[backend] = dict(error=f"{type(e).__name__}: {e}")
    return dict(images=images, batch=batch, workers=workers, **out)


def _selfcheck() -> dict:
    """`jit_fast.selfcheck` (the fused ops, a block, the sampler) on cuda:0 (prints its table), as a report dict."""
    from jit_fast.selfcheck import all_checks
    from jit_kernels.selfcheck import selfcheck

    return selfcheck("cuda", checks=all_checks("cuda"), prog="jit_fast.selfcheck")


def selfcheck_summary(check: dict) -> dict:
    """What a result records of the selfcheck run that gated its timings."""
    return dict(passed=check["passed"], failed_ops=check["failed_ops"], checks=len(check["checks"]),
                failed=[c["name"] for c in check["checks"] if not c["passed"]], seconds=check["seconds"])


def bench_attention(model: str, batch: int, img_size: int, device: str, timer: Timer = cuda_ms,
                    dropout_p: float = 0.0) -> dict:
    """Every attention backend this GPU runs at the model's (heads, head dim, tokens), bf16, forward and
    forward+backward side by side (ms; the head dim each runs at, padded or not)."""
    from jit_fast.model import attention as A

    cfg = model_config(model, img_size=img_size)
    tokens = cfg.grid_size**2 + cfg.in_context_len
    cap = torch.cuda.get_device_capability(device)
    rows = {}
    for b in (*A.BACKENDS, A.SDPA):
        dim = b.padded_dim(cfg.head_dim) or cfg.head_dim
        if not (b.installed() and cap >= b.min_capability and (b.dropout or dropout_p == 0)):
            continue
        qkv = [torch.randn(batch, tokens, cfg.num_heads, cfg.head_dim, device=device, dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3)]
        call = lambda *t, b=b, dim=dim: A.run_at(b, dim, *t, dropout_p)  # noqa: E731
        try:
            rows[b.name] = dict(head_dim=dim, fwd_ms=timer(lambda c=call, t=qkv: c(*t)),
                                fwd_bwd_ms=timer(_fwd_bwd(call, tuple(qkv))))
        except Exception as e:  # noqa: BLE001 - a backend that refuses this GPU or shape: record why
            rows[b.name] = dict(head_dim=dim, error=f"{type(e).__name__}: {e}")
    return dict(tokens=tokens, heads=cfg.num_heads, head_dim=cfg.head_dim, batch=batch, dropout_p=dropout_p,
                backends=rows)


def run_gpu_suite(model: str, batch: int, img_size: int, sample_steps: int = 10) -> dict:
    """jit_fast.selfcheck, then all GPU sections on cuda:0 (each section's failure is recorded, not raised), fused
    paths that failed the selfcheck left out (see `refused_paths`); the skip message without CUDA."""
    if not torch.cuda.is_available():
        return dict(skipped=SKIP_MESSAGE)
    name = torch.cuda.get_device_name()
    spec = gpu_spec(name)
    out: dict = dict(device=name, datasheet=spec.name if spec else None, torch=torch.__version__)
    check = _selfcheck()
    out["selfcheck"] = selfcheck_summary(check)
    refused = refused_paths(set(check["failed_ops"]))
    out["refused"] = {k: list(v) for k, v in refused.items()}
    agg = tuple(p for p in PATHS if p not in refused.get("aggregate", ()))
    sampling = tuple(c for c in (("eager", False), ("fused", False), ("fused", True)) if c[0] in agg)
    peak_flops = spec.peak_bf16_flops if spec else None
    sections = {
        "ops": lambda: bench_ops(model, batch, img_size, "cuda", peak_bw=spec.hbm_bytes_per_s if spec else None,
                                 refused=refused),
        "attention": lambda: bench_attention(model, batch, img_size, "cuda"),
        "block": lambda: bench_block(model, batch, img_size, "cuda", paths=agg, peak_flops=peak_flops),
        "train_step": lambda: bench_train_step(model, batch, img_size, "cuda", timer=_step_timer, paths=agg,
                                               peak_flops=peak_flops),
        "sampling": lambda: bench_sampling(model, batch, img_size, "cuda", steps=sample_steps, configs=sampling),
        "data": lambda: bench_data(img_size, min(batch, 128)),
    }
    for key, fn in sections.items():
        try:
            out[key] = fn()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: keep the other sections
            out[key] = dict(error=f"{type(e).__name__}: {e}")
        torch.cuda.empty_cache()
    return out


def _step_timer(fn: Callable[[], object]) -> float:
    return cuda_ms(fn, rep_ms=3000)
