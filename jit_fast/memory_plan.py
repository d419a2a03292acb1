"""Peak GPU memory per rank of a training run, modeled before the first step, and the largest batch that fits.

    python -m jit_fast.memory_plan --model JiT-B/16 --batch 12 --img-size 256 --precision fp16
        [--activation-checkpointing] [--world-size N] [--max-memory-gb 16] [--kernels triton]

Terms (bytes per rank; with FSDP2, world size > 1, every persistent state is sharded over the ranks):
- parameters, fp32 master weights (all of them, pos_embed included);
- gradients, fp32, of the trainable parameters;
- AdamW state, exp_avg and exp_avg_sq in fp32;
- two EMAs, fp32 copies of every parameter;
- weight copies: one process keeps autocast's low-precision weight copies for backward (counted: saved tensors
  computed from the parameters alone); FSDP2 instead holds its unsharded working set (modeled: the root's fp32
  parameters, two blocks gathered in the autocast dtype, one block's gradients unsharded for the reduce-scatter);
- activations: the bytes autograd saves for backward (`jit_fast.shared.saved_bytes`, counted on fake tensors, one
  micro-batch). With activation checkpointing: what is saved outside the blocks (with the activations several
  blocks share, the fused model's SiLU(c)), the block inputs the checkpoints hold, and the largest block's saved
  bytes while it is recomputed in backward;
- reserve: CUDA context, cuBLAS workspaces, gradients in flight and allocator slack (an assumed constant).
Attention is counted as a flash kernel saves it (q, k, v, output, fp32 log-sum-exp; dropout keeps only its RNG
state), which is what flash-attn and PyTorch's CUDA SDPA kernels save. The sum is the modeled peak: an estimate
to plan a run with, not a measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import jit_fast.model.network as jit_model
from jit_fast.configs import (
    INT_POSITIVE,
    MODEL_PRESETS,
    NONNEGATIVE,
    POSITIVE,
    ModelConfig,
    TrainConfig,
    model_config,
)
from jit_fast.shared.errors import UserError
from jit_fast.shared.saved_bytes import SavedBytes, count_saved, storage_key, tensors

GIB = 2**30
# CUDA context (~0.3-0.5 GiB), cuBLAS / cuDNN workspaces, activation gradients in flight during backward and
# allocator fragmentation: assumed, not measured (no GPU here); `--reserve-gb` changes it.
RESERVE_BYTES = GIB
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FSDP_PREFETCH_BLOCKS = 2  # FSDP2 gathers the next block while the current one computes


class MemoryPlanError(UserError, ValueError):
    """A run that cannot fit, or plan settings that make no sense; one line naming the flag."""


@dataclass(frozen=True)
class ActivationCount:
    """Saved-for-backward bytes of one forward of the flow-matching loss at one batch size."""

    total: int  # every activation saved (no checkpointing)
    outside_blocks: int  # saved by the embedders, final layer and loss, and activations shared by several blocks
    block_inputs: int  # activation storages handed to the blocks and not saved outside (what checkpoints hold)
    recompute: tuple[int, ...]  # per block: what it saves beyond its own inputs (allocated again when recomputed)
    weight_copies: int  # saved tensors computed from parameters alone that are not parameters (autocast casts)

    def activations(self, checkpointing: bool) -> int:
        """Peak activation bytes: everything saved, or with checkpointing what is saved outside the blocks, the inputs
        the checkpoints hold and the largest block while it is recomputed in backward."""
        if not checkpointing:
            return self.total
        return self.outside_blocks + self.block_inputs + max(self.recompute, default=0)


class _BlockSaved(SavedBytes):
    """`SavedBytes` that also notes the storages saved inside each block and those each block was handed."""

    def __init__(self, constants, depth: int) -> None:
        super().__init__(constants)
        self.block: int | None = None
        self.packed: list[set[int]] = [set() for _ in range(depth + 1)]  # per block; the last: outside the blocks
        self.inputs: list[set[int]] = [set() for _ in range(depth)]
        self.nbytes: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.packed[-1 if self.block is None else self.block].add(storage_key(t))
        return super().pack(t)

    def enter(self, index: int, args: object) -> None:
        """Block pre-hook: later packs belong to block `index`; note the activation storages it is handed."""
        self.block = index
        for t in tensors(args):
            key = storage_key(t)
            if key not in self.constant_storages:
                self.inputs[index].add(key)
                self.nbytes[key] = t.untyped_storage().nbytes()
                self.alive.append(t.untyped_storage())

    def count(self) -> ActivationCount:
        """The totals of a finished forward."""
        acts = self.activations
        size = {**self.nbytes, **acts}
        # computed outside the blocks and handed to several of them (the fused model's SiLU(c), made once for every
        # adaLN): the checkpoints keep it for the whole backward, as an activation saved outside the blocks
        shared = {k for k in set().union(*self.inputs) if sum(k in inputs for inputs in self.inputs) > 1}
        outside = (self.packed[-1] & acts.keys()) | shared
        held = set().union(*self.inputs) - outside
        recompute = tuple(sum(acts[k] for k in (packed & acts.keys()) - inputs)
                          for packed, inputs in zip(self.packed, self.inputs, strict=False))
        return ActivationCount(self.activation_bytes, sum(size[k] for k in outside), sum(size[k] for k in held),
                               recompute, 0)


@contextlib.contextmanager
def flash_like_attention() -> Iterator[None]:
    """Run the model's attention as SDPA without dropout while counting: on CPU tensors SDPA then takes its flash
    kernel, which saves what the GPU kernels save (with dropout it would fall back to the math path and save the
    attention matrix, which no GPU kernel keeps)."""
    original = jit_model.attention
    jit_model.attention = lambda q, k, v, dropout_p=0.0: original(q, k, v, 0.0)
    try:
        yield
    finally:
        jit_model.attention = original


def count_activations(cfg: ModelConfig, batch: int, amp_dtype: torch.dtype | None,
                      block_param_dtype: torch.dtype | None = None) -> ActivationCount:
    """Count one training forward (flow-matching loss, CPU autocast to `amp_dtype`) on fake tensors.

    `block_param_dtype` gives the blocks' parameters that dtype, as FSDP2 gathers them (the root stays fp32)."""
    from jit_fast.model.denoiser import flow_matching_loss

    with FakeTensorMode(), flash_like_attention():
        net = jit_model.JiT(cfg).train()
        if block_param_dtype is not None:
            for p in net.blocks.parameters():
                p.data = p.data.to(block_param_dtype)
        constants = [*net.parameters(), *net.buffers()]
        own = {storage_key(t) for t in constants}
        s = cfg.input_size
        x, t = torch.randn(batch, cfg.in_channels, s, s), torch.rand(batch)
        y = torch.randint(0, cfg.num_classes, (batch,))
        saved = _BlockSaved(constants, cfg.depth)
        handles = []
        for i, block in enumerate(net.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda _m, args, kwargs, i=i: saved.enter(i, (args, kwargs)), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda *_: setattr(saved, "block", None)))
        amp = torch.autocast("cpu", dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
        try:
            with count_saved(saved), amp:
                flow_matching_loss(net, x, y, t=t, num_classes=cfg.num_classes)
        finally:
            for h in handles:
                h.remove()
    copies = sum(n for key, n in saved.weights.items() if key not in own)
    count = saved.count()
    return ActivationCount(count.total, count.outside_blocks, count.block_inputs, count.recompute, copies)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model: all (pos_embed included), trainable, inside the blocks, outside them (root)."""

    total: int
    trainable: int
    blocks: int
    largest_block: int

    @property
    def root(self) -> int:
        return self.total - self.blocks


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    """Count the parameters of `cfg` on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        net = jit_model.JiT(cfg)
    params = list(net.parameters())
    per_block = [sum(p.numel() for p in b.parameters()) for b in net.blocks]
    return ParameterCounts(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                           sum(per_block), max(per_block))


@dataclass(frozen=True)
class MemoryPlan:
    """Modeled peak memory per rank of one training configuration, term by term, with and without checkpointing."""

    model: str
    img_size: int
    batch: int
    precision: str
    kernels: str
    world_size: int
    checkpointing: bool
    params: ParameterCounts
    fixed: tuple[tuple[str, str, int], ...]  # (term, how, bytes per rank) that do not scale with the batch
    activations: dict[bool, int]  # checkpointing -> activation bytes at `batch`
    per_sample: dict[bool, float]  # checkpointing -> activation bytes per extra sample

    @property
    def fixed_bytes(self) -> int:
        return sum(b for _, _, b in self.fixed)

    def peak(self, checkpointing: bool | None = None) -> int:
        """Modeled peak bytes per rank (`checkpointing` None: as planned)."""
        return self.fixed_bytes + self.activations[self.checkpointing if checkpointing is None else checkpointing]

    def largest_batch(self, budget: int, checkpointing: bool | None = None) -> int:
        """Largest per-rank batch whose modeled peak fits in `budget` bytes (0: not even one sample)."""
        ac = self.checkpointing if checkpointing is None else checkpointing
        base = self.activations[ac] - self.per_sample[ac] * self.batch
        return max(0, math.floor((budget - self.fixed_bytes - base) / self.per_sample[ac]))

    def format(self, budget: int | None = None) -> str:
        """The printed plan: every term in GiB, both checkpointing settings, the largest batch within `budget`."""
        fsdp = f"FSDP2 over {self.world_size} ranks (sharded states)" if self.world_size > 1 else "1 rank, no FSDP"
        lines = [
            f"memory plan (modeled, per rank): {self.model} at {self.img_size}px, batch {self.batch} per rank, "
            f"{self.precision}, kernels={self.kernels}, {fsdp}",
            f"  {self.params.total / 1e6:.1f}M parameters ({self.params.trainable / 1e6:.1f}M trainable)",
        ]
        lines += [f"  {name:<26}{_gib(b):>10}  {how}" for name, how, b in self.fixed]
        for ac in (False, True):
            mark, how = ("*" if ac == self.checkpointing else " "), ("checkpointed" if ac else "all saved")
            lines.append(f"{mark} {'activations, ' + how:<26}{_gib(self.activations[ac]):>10}  saved for backward, "
                         f"{self.per_sample[ac] / GIB:.3f} GiB per sample")
        for ac in (False, True):
            mark, how = ("*" if ac == self.checkpointing else " "), ("checkpointed" if ac else "all saved")
            lines.append(f"{mark} {'peak, ' + how:<26}{_gib(self.peak(ac)):>10}")
        if budget is not None:
            fits = [f"{self.largest_batch(budget, ac)} ({'with' if ac else 'without'} checkpointing)"
                    for ac in (False, True)]
            lines.append(f"  largest batch per rank within {budget / GIB:g} GiB: {', '.join(fits)}")
        lines.append("  (* as planned; a model of the allocations, not a measurement: see jit_fast/memory_plan.py)")
        return "\n".join(lines)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def plan(model: str = "JiT-B/16", batch: int = 12, img_size: int = 256, precision: str = "fp16",
         kernels: str = "triton", activation_checkpointing: bool = False, world_size: int = 1,
         num_classes: int = 1000, reserve: int = RESERVE_BYTES, **overrides) -> MemoryPlan:
    """Model the per-rank peak of training `model` at per-rank `batch` (FSDP2 when `world_size` > 1)."""
    if precision not in AMP_DTYPES:
        raise MemoryPlanError(f"--precision must be one of {', '.join(AMP_DTYPES)}, got {precision!r}")
    for flag, value in (("--batch", batch), ("--world-size", world_size), ("--img-size", img_size)):
        if not INT_POSITIVE.contains(value):
            raise MemoryPlanError(f"{flag} must be {INT_POSITIVE.describe()}, got {value!r}")
    try:
        cfg = model_config(model, img_size=img_size, num_classes=num_classes, kernels=kernels, **overrides)
    except ValueError as e:
        raise MemoryPlanError(str(e)) from None
    amp = AMP_DTYPES[precision]
    low = 4 if amp is None else torch.finfo(amp).bits // 8
    fsdp = world_size > 1
    n = parameter_counts(cfg)

    def shard(count: int) -> int:
        return math.ceil(count / world_size)

    fixed = [
        ("parameters", "fp32 master weights", 4 * shard(n.total)),
        ("gradients", "fp32", 4 * shard(n.trainable)),
        ("AdamW state", "exp_avg + exp_avg_sq, fp32", 8 * shard(n.trainable)),
        ("EMAs", "two fp32 copies of the weights", 8 * shard(n.total)),
    ]
    other = 2 if batch == 1 else 1
    counts = {b: count_activations(cfg, b, amp, amp if fsdp else None) for b in (batch, other)}
    if fsdp:
        gathered = FSDP_PREFETCH_BLOCKS * n.largest_block * low + 4 * n.root
        reduce = n.largest_block * (low + 4 if amp is not None else 4)
        fixed.append(("FSDP2 unsharded", "root fp32 + 2 blocks gathered + 1 block's grads (modeled)",
                      gathered + reduce))
    if counts[batch].weight_copies:
        fixed.append(("weight copies", f"{precision} autocast casts saved for backward",
                      counts[batch].weight_copies))
    fixed.append(("reserve", "CUDA context, workspaces, slack (assumed)", reserve))
    acts = {ac: counts[batch].activations(ac) for ac in (False, True)}
    slope = {ac: (acts[ac] - counts[other].activations(ac)) / (batch - other) for ac in (False, True)}
    return MemoryPlan(model, img_size, batch, precision, kernels, world_size, activation_checkpointing, n,
                      tuple(fixed), acts, slope)


def plan_training(cfg: TrainConfig, precision: str, world_size: int, num_classes: int) -> MemoryPlan:
    """The plan of a training run: `cfg`'s model, per-rank batch and checkpointing, the resolved precision (fp32,
    bf16, fp16), the world size and the dataset's class count (FSDP2 assumed when world_size > 1, as fsdp=auto)."""
    return plan(cfg.model, cfg.batch_size, cfg.img_size, precision, cfg.kernels, cfg.activation_checkpointing,
                world_size, num_classes, **cfg.extra_model_args)


def check_fits(p: MemoryPlan, budget: int) -> None:
    """Raise MemoryPlanError (one line, before the first step) when the modeled peak exceeds `budget` bytes."""
    if p.peak() <= budget:
        return
    hint = [f"--batch-size {p.largest_batch(budget)}" if p.largest_batch(budget) else ""]
    if not p.checkpointing and p.largest_batch(budget, True) >= p.batch:
        hint.append("--activation-checkpointing")
    hints = " or ".join(h for h in hint if h) or "a smaller model or image size"
    raise MemoryPlanError(f"batch {p.batch} needs {p.peak() / GIB:.2f} GiB per rank (modeled) but "
                          f"{budget / GIB:.2f} GiB are available; try {hints}")


def check_training_run(cfg: TrainConfig, precision: str, world_size: int, num_classes: int, device: torch.device,
                       log: Callable[[str], None]) -> None:
    """Before a run's first step: log the plan (on a GPU, or on any device with --max-memory-gb) and raise
    MemoryPlanError when the modeled peak exceeds --max-memory-gb; without the flag a GPU's own memory is the
    budget and a plan over it is only a warning (the plan is a model, not a measurement)."""
    if device.type != "cuda" and not cfg.max_memory_gb:
        return
    p = plan_training(cfg, precision, world_size, num_classes)
    if cfg.max_memory_gb:
        log(p.format(round(cfg.max_memory_gb * GIB)))
        try:
            check_fits(p, round(cfg.max_memory_gb * GIB))
        except MemoryPlanError as e:
            raise MemoryPlanError(f"--max-memory-gb {cfg.max_memory_gb:g}: {e}") from None
        return
    budget = torch.cuda.get_device_properties(device).total_memory
    log(p.format(budget))
    if p.peak() > budget:
        log(f"warning: the modeled peak {p.peak() / GIB:.2f} GiB exceeds this GPU's {budget / GIB:.2f} GiB; pass "
            "--max-memory-gb to stop such runs before the first step")


def main(argv: list[str] | None = None) -> int:
    """CLI: print the plan (and the largest batch within --max-memory-gb); exit 2 on a bad flag."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="JiT-B/16", choices=sorted(MODEL_PRESETS))
    ap.add_argument("--batch", type=INT_POSITIVE, default=12, help="per-rank batch (one micro-step)")
    ap.add_argument("--img-size", type=INT_POSITIVE, default=256)
    ap.add_argument("--num-classes", type=INT_POSITIVE, default=1000)
    ap.add_argument("--precision", choices=sorted(AMP_DTYPES), default="fp16")
    ap.add_argument("--kernels", choices=["torch", "triton"], default="triton")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--world-size", type=INT_POSITIVE, default=1, help="ranks; > 1 shards with FSDP2")
    ap.add_argument("--max-memory-gb", type=POSITIVE, default=None, help="GPU memory per rank, GiB (2^30 bytes)")
    ap.add_argument("--reserve-gb", type=NONNEGATIVE, default=RESERVE_BYTES / GIB,
                    help="context, workspaces and slack added to the peak (assumed), GiB")
    args = ap.parse_args(argv)
    try:
        p = plan(args.model, args.batch, args.img_size, args.precision, args.kernels, args.activation_checkpointing,
                 args.world_size, args.num_classes, round(args.reserve_gb * GIB))
    except UserError as e:
        print(f"memory_plan: error: {e}", file=sys.stderr)
        return 2
    budget = None if args.max_memory_gb is None else round(args.max_memory_gb * GIB)
    print(p.format(budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
