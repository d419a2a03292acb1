"""What a CPU can say about the official release as shipped (blocks wrapped in `torch.compile`).

The traffic counter sees aten ops; a compiled block runs inductor-generated kernels instead, and on a
GPU those are Triton kernels whose fusion choices, bytes and timings exist only on the GPU. On a CPU,
inductor compiles the same graph to C++ kernels with the same scheduler, so the number of kernels it
generates for an eager block (forward, backward) is a proxy for how far compilation cuts launches.
It is not a byte count (CPU codegen records none), the CPU backend fuses differently from the Triton
backend (no split reductions, different tiling), and GEMMs and attention stay extern calls (counted
here from the eager count). The GPU benchmark times the compiled block and step side by side instead.
"""

from __future__ import annotations

import time

import torch

from benchmarks.traffic import (
    block_index,
    block_leaves,
    capture_block_inputs,
    count_block,
    flash_attention_standin,
)
from jit_fast import model as jit_model
from jit_fast.configs import model_config


def inductor_cpu_proxy(model: str = "JiT-B/16", img_size: int = 64, batch: int = 2) -> dict:
    """Kernels inductor generates (C++ backend) for the standard eager block forward and backward.

    A small image size keeps compile and run cheap; the graph, and so the kernel structure, does not
    depend on the token count. Extern GEMM/attention calls are taken from the eager count.
    """
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config
    from torch._inductor import metrics

    cfg = model_config(model, img_size=img_size, kernels="torch")
    start = time.perf_counter()
    torch._dynamo.reset()
    no_cache = (  # cached graphs would skip codegen (no kernel counts) and compile the backward eagerly
        inductor_config.patch(fx_graph_cache=False),
        functorch_config.patch(enable_autograd_cache=False),
    )
    with no_cache[0], no_cache[1], flash_attention_standin():
        net = jit_model.JiT(cfg).train()
        idx = block_index(cfg, "standard")
        amp = torch.autocast("cpu", dtype=torch.bfloat16)
        with amp:
            args, kwargs = capture_block_inputs(net, idx, batch)
        args = block_leaves(args)
        block = torch.compile(net.blocks[idx], fullgraph=True)
        metrics.reset()
        with amp:
            outs = [o for o in block(*args, **kwargs) if o.requires_grad]
        fwd_kernels = metrics.generated_kernel_count
        torch.autograd.backward(outs, [torch.randn_like(o) for o in outs])
        bwd_kernels = metrics.generated_kernel_count - fwd_kernels
    eager = count_block(model, "eager", batch, img_size)
    extern = {
        p: eager.totals((p,), ("gemm",))["launches"] + eager.totals((p,), ("attention",))["launches"]
        for p in ("fwd", "bwd")
    }
    torch._dynamo.reset()
    return dict(
        model=model,
        img_size=img_size,
        batch=batch,
        backend="inductor C++ (CPU)",
        generated_kernels=dict(fwd=fwd_kernels, bwd=bwd_kernels),
        extern_calls=extern,
        launches_proxy=dict(fwd=fwd_kernels + extern["fwd"], bwd=bwd_kernels + extern["bwd"]),
        seconds=time.perf_counter() - start,
        caveat=__doc__.split("\n\n")[1].replace("\n", " "),
    )
