"""Process groups and FSDP2 wrapping for torchrun (NCCL on GPU, gloo on CPU) or a plain single process.

`init_distributed()` reads the torchrun environment; without it training runs in one process
with an unwrapped model (or, with `fsdp=True`, a world of one). `shard_model()` applies
`fully_shard` to every JiT block and then to the root, keeping fp32 sharded master weights
and gathering them in bf16 on the bf16 path (`MixedPrecisionPolicy(bf16, reduce fp32)`).
"""

from __future__ import annotations

import datetime
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

# FSDP2 warns whenever a wrapped module returns a view (our blocks return chunks of the adaLN
# projection). The model never modifies those outputs in place, so the warning is noise here.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

T = TypeVar("T")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistEnv:
    """Where this process sits: rank, world, device and the process groups it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group
    owns_group: bool = False  # we created the default group and destroy it at the end
    control_group: object = None  # gloo group for host-side flags (preemption agreement)
    checkpoint_group: object = None  # gloo group for async checkpoint collectives

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_world_size() -> int:
    """WORLD_SIZE from the launcher environment (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda:local_rank when available (or asked), else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was given but CUDA is not available")
        idx = int(device.split(":")[1]) if ":" in device else local_rank
        torch.cuda.set_device(idx)
        return torch.device("cuda", idx)
    if device != "cpu":
        raise ValueError(f"unknown device {device!r} (use auto, cpu or cuda)")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(name, autocast dtype or None for fp32) of a --precision choice: auto = bf16 on CUDA GPUs that have it
    (sm_80+), fp16 on older ones (T4, V100: bf16 there is emulated), fp32 elsewhere."""
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"
    return precision, PRECISIONS[precision]


def init_distributed(device: str = "auto", force_group: bool = False, timeout_s: float = 1800.0) -> DistEnv:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo on CPU).

    Without torchrun this is a single process; `force_group=True` then creates a world of one
    (so that FSDP2 can be used on one device). An existing default group is reused.
    """
    world = torchrun_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if not dist.is_available():
        if world > 1:
            raise RuntimeError("torch.distributed is not available in this PyTorch build")
        return DistEnv(device=dev)
    if world == 1 and not force_group and not dist.is_initialized():
        return DistEnv(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=timeout, **kwargs)
        else:  # a world of one without a launcher
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    else:
        backend = dist.get_backend()
    env = DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=backend,
        owns_group=owns,
    )
    env.control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    env.checkpoint_group = dist.new_group(backend="gloo")
    return env


def shutdown(env: DistEnv) -> None:
    """Destroy the default process group if `init_distributed` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        env.owns_group = False


def rank0_print(env: DistEnv) -> Callable[[str], None]:
    """A print that speaks on rank 0 only (the log of a run before its progress bar exists)."""
    return lambda msg: print(msg, flush=True) if env.is_main else None


def barrier(env: DistEnv) -> None:
    """Host-side barrier over the control group (no device synchronization)."""
    if env.distributed:
        dist.barrier(group=env.control_group)


def any_rank(env: DistEnv, flag: bool) -> bool:
    """True on every rank if `flag` is True on any rank; a host-side gloo all-reduce."""
    if not env.distributed or env.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return bool(t.item())


def _group(env: DistEnv | None) -> tuple[bool, object]:
    """(more than one rank?, group): the env's control group, or the default group when env is None."""
    if env is not None:
        return env.distributed and env.world_size > 1, env.control_group
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1, None


def broadcast_object(env: DistEnv | None, obj: T, src: int = 0) -> T:
    """Broadcast a picklable object from `src` to every rank (env's control group; env None: default group)."""
    several, group = _group(env)
    if not several:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def leader_first(fn: Callable[[], T], leader: bool, env: DistEnv | None = None) -> T:
    """fn() on the leader, then on the other ranks after a barrier, so a download or cache is made once.

    The leader reaches the barrier even when fn() raises, so the others are never left waiting.
    """
    several, group = _group(env)
    if not several:
        return fn()
    if leader:
        try:
            return fn()
        finally:
            dist.barrier(group=group)
    dist.barrier(group=group)
    return fn()


def all_reduce_mean(env: DistEnv, t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks on the training group (asynchronous on the device, no host sync)."""
    if env.distributed and env.world_size > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (shares storage), or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a DTensor to its full value on every rank (collective); plain tensors pass through."""
    return t.full_tensor() if is_dtensor(t) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of the full tensor `full` laid out as `like` (DTensor), without communication."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    d = distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)
    return d.to_local()


def checkpoint_block_forward(block: nn.Module) -> None:
    """Activation checkpointing for one block: recompute its forward in backward (FQNs unchanged)."""
    from torch.utils.checkpoint import checkpoint

    inner = block.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def prepare_model(
    model: nn.Module,
    env: DistEnv,
    *,
    fsdp: bool,
    param_dtype: torch.dtype | None,
    compile_blocks: bool = False,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Activation checkpointing, per-block torch.compile, then FSDP2 (each block, then the root).

    `param_dtype` is the dtype parameters are gathered in (bf16 on the bf16 path, None keeps fp32);
    gradients are reduced in fp32 and the sharded master weights stay fp32. Without `fsdp` the
    model is just moved to the device.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError("prepare_model expects a JiT with a `.blocks` ModuleList")
    for block in blocks:
        if activation_checkpointing:
            checkpoint_block_forward(block)
        if compile_blocks:
            block.compile()
    if not fsdp:
        return model.to(env.device)
    if not env.distributed:
        raise RuntimeError("FSDP needs a process group: call init_distributed(force_group=True)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    # Inputs are not cast: autocast decides op dtypes exactly as on the unsharded path and t stays fp32.
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    # The root's own parameters (embedders, pos_embed, in-context tokens, final layer; ~3% of JiT-B)
    # are gathered in fp32: as under plain autocast, pos_embed and the label embedding then keep the
    # residual stream and the conditioning in fp32 (a bf16 pos_embed would make the stream bf16).
    root_mp = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    n = len(blocks)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward and i < n - 1)
    fully_shard(model, mesh=mesh, mp_policy=root_mp, reshard_after_forward=reshard_after_forward)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """FSDP2: skip the gradient reduce-scatter on accumulation micro-steps (no-op for plain modules)."""
    fn = getattr(model, "set_requires_gradient_sync", None)
    if fn is not None:
        fn(enabled)
