"""Bytes autograd keeps for backward, counted on fake tensors: the activation term of the memory plan.

A `saved_tensors_hooks` pack hook sees every tensor an autograd node saves; storages are counted once each
(views share their base's storage) and split into activations and weights. Weights are parameters, buffers and
anything computed from them alone (autocast's low-precision weight copies): a forward dispatch mode marks the
outputs of an op whose tensor inputs are all constants as constants too. `jit_fast/perf/traffic.py` counts saved
bytes with the same `SavedBytes` inside its traffic counter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Ops that allocate without computing: their outputs hold nothing derived from their inputs.
ALLOC_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
# In-place ops that overwrite their destination: it is written, not read.
OVERWRITE_OPS = frozenset({"copy_", "fill_", "zero_", "bernoulli_", "normal_", "uniform_", "random_", "exponential_"})


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (shared by all its views)."""
    return t.untyped_storage()._cdata


class SavedBytes:
    """Saved-for-backward storages of one counted run, each counted once, as activations or weights."""

    def __init__(self, constants: Sequence[torch.Tensor] = ()) -> None:
        self.constant_storages = {storage_key(t) for t in constants}
        self.activations: dict[int, int] = {}
        self.weights: dict[int, int] = {}
        # every storage a key was taken of stays referenced until the count is dropped: a freed storage's address
        # (its key) can be reused by a later tensor, which would then be counted as that storage
        self.alive: list[torch.UntypedStorage] = []

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    def observe(self, func: torch._ops.OpOverload, ins: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
        """Forward op `func` was given `ins` and returned `outs`: outputs computed from constants alone are constants
        (the destination of an overwriting in-place op is not one of its inputs)."""
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in ALLOC_OPS:
            return
        if name in OVERWRITE_OPS:
            written = {id(t) for t in outs}
            ins = [t for t in ins if id(t) not in written]
        if ins and all(storage_key(t) in self.constant_storages for t in ins):
            self.constant_storages.update(storage_key(t) for t in outs)
            self.alive.extend(t.untyped_storage() for t in outs)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks pack hook: remember the storage's bytes once, as activation or weight."""
        key = storage_key(t)
        bucket = self.weights if key in self.constant_storages else self.activations
        bucket[key] = t.untyped_storage().nbytes()
        self.alive.append(t.untyped_storage())
        return t


def tensors(tree: object) -> list[torch.Tensor]:
    """The distinct tensors (by identity) among the leaves of a pytree, in order."""
    seen, out = set(), []
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


class _Observe(TorchDispatchMode):
    """Feeds every dispatched op to `SavedBytes.observe` (forward only)."""

    def __init__(self, saved: SavedBytes) -> None:
        super().__init__()
        self.saved = saved

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace not in ("prim", "profiler"):
            self.saved.observe(func, tensors((args, kwargs)), tensors(out))
        return out


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def count_saved(saved: SavedBytes) -> Iterator[SavedBytes]:
    """Count into `saved` (built with the parameters and buffers as constants) what the forward run inside the
    context saves for backward."""
    with _Observe(saved), torch.autograd.graph.saved_tensors_hooks(saved.pack, _unpack):
        yield saved
