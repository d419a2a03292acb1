"""What a CPU can say about the official release as shipped (blocks wrapped in `torch.compile`).

The traffic counter sees aten ops; a compiled block runs inductor-generated kernels instead, and on a
GPU those are Triton kernels whose fusion choices and timings exist only on the GPU. On a CPU, inductor
lowers and fuses the same graph with the same scheduler and emits C++ kernels; its scheduler records
for each fused kernel the bytes of the buffers it reads and writes. `jit_fast/perf/compiled.py` compiles the eager
standard block (forward and backward), reads those per-kernel byte estimates, and scales them from
batch 2 and 4 to the requested batch (every buffer is batch-proportional or batch-independent).
Limits: the C++ backend fuses differently from the Triton backend (no split reductions, other
tiling), the byte figures are inductor's own estimates, and GEMMs and attention stay extern calls
(taken from the eager count). The GPU benchmark times the compiled block side by side instead.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from jit_fast.configs import model_config
from jit_fast.model import network as jit_model
from jit_fast.perf.blocks import block_index, block_leaves, capture_block_inputs
from jit_fast.perf.flash_standin import flash_attention_standin
from jit_fast.perf.traffic import Count, OpRecord, count_block

COMPILE_BATCHES = (2, 4)
KERNEL_NODES = ("SchedulerNode", "FusedSchedulerNode", "OuterLoopFusedSchedulerNode", "ForeachKernelSchedulerNode")


@contextlib.contextmanager
def _record_scheduled(graphs: list[list[tuple[str, str, int]]]) -> Iterator[None]:
    """Append (node name, node kind, bytes read+written) of every scheduled node, one list per compiled graph."""
    from torch._inductor import scheduler

    original = scheduler.Scheduler.codegen

    def codegen(self):
        graphs.append([(n.get_name(), type(n).__name__, int(n.get_read_write_buffers_sizes())) for n in self.nodes])
        return original(self)

    scheduler.Scheduler.codegen = codegen
    try:
        yield
    finally:
        scheduler.Scheduler.codegen = original


def _compile_block(model: str, img_size: int, batch: int) -> list[list[tuple[str, str, int]]]:
    """Compile and run the eager standard block forward+backward on CPU; return the two scheduled graphs."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    cfg = model_config(model, img_size=img_size, kernels="torch")
    graphs: list[list[tuple[str, str, int]]] = []
    torch._dynamo.reset()
    with (  # caches would skip scheduling (nothing recorded) and compile the backward eagerly
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
        flash_attention_standin(),
        _record_scheduled(graphs),
    ):
        net = jit_model.JiT(cfg).train()
        idx = block_index(cfg, "standard")
        amp = torch.autocast("cpu", dtype=torch.bfloat16)
        with amp:
            args, kwargs = capture_block_inputs(net, idx, batch)
        args = block_leaves(args)
        block = torch.compile(net.blocks[idx], fullgraph=True, dynamic=False)
        with amp:
            outs = [o for o in block(*args, **kwargs) if o.requires_grad]
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
    torch._dynamo.reset()
    if len(graphs) != 2:
        raise RuntimeError(f"expected a forward and a backward graph, inductor scheduled {len(graphs)}")
    return graphs


def inductor_cpu_proxy(model: str = "JiT-B/16", img_size: int = 256, batch: int = 128) -> dict:
    """Kernels and bytes of the compiled eager standard block at `batch`, from inductor's CPU scheduler.

    Compiles at two small batches and extrapolates each kernel's bytes linearly in the batch; both
    compiles must schedule the same kernels (checked; batch 1 is avoided, inductor fuses it differently).
    """
    start = time.perf_counter()
    lo, hi = COMPILE_BATCHES
    small, large = _compile_block(model, img_size, lo), _compile_block(model, img_size, hi)
    phases = {}
    for phase, g_lo, g_hi in (("fwd", small[0], large[0]), ("bwd", small[1], large[1])):
        at_lo = {name: (kind, b) for name, kind, b in g_lo}
        at_hi = {name: (kind, b) for name, kind, b in g_hi}
        if {n: k for n, (k, _) in at_lo.items()} != {n: k for n, (k, _) in at_hi.items()}:
            raise RuntimeError(f"{phase}: inductor scheduled different kernels at batch {lo} and {hi}; cannot scale")
        kernels = [b + (at_hi[name][1] - b) * (batch - lo) // (hi - lo)
                   for name, (kind, b) in at_lo.items() if kind in KERNEL_NODES]
        extern = sum(1 for kind, b in at_lo.values() if kind == "ExternKernelSchedulerNode" and b > 0)
        phases[phase] = dict(kernels=len(kernels), extern_calls=extern, kernel_bytes=kernels)
    return dict(
        model=model, img_size=img_size, batch=batch, compiled_at_batches=list(COMPILE_BATCHES),
        backend="inductor C++ (CPU)",
        phases=phases, seconds=time.perf_counter() - start,
        caveat=" ".join(__doc__.split("\n\n")[1].split()),
    )


def compiled_block_count(proxy: dict, eager: Count | None = None) -> Count:
    """A Count for the compiled block: inductor's fused kernels (category "other") plus the eager
    path's GEMM and attention records, for the roofline. Modeled, with the limits of the proxy."""
    if eager is None:
        eager = count_block(proxy["model"], "eager", proxy["batch"], proxy["img_size"])
    records = [r for r in eager.records if r.category in ("gemm", "attention")]
    for phase, p in proxy["phases"].items():
        records += [OpRecord(phase=phase, region="inductor", op="inductor::cpp_kernel", category="other", launches=1,
                             bytes_read=b, bytes_written=0) for b in p["kernel_bytes"]]
    meta = dict(eager.meta, path="compiled (inductor CPU proxy)")
    return Count(meta=meta, records=records)
