"""Memory-traffic, launch, FLOP and saved-activation counter for a JiT block and a whole train step.

Counting runs on fake tensors (`FakeTensorMode`: real shapes and dtypes, no storage, no arithmetic),
so a JiT-H/16 train step at batch 128 is counted exactly, without scaling, in seconds on a CPU.
A `TorchDispatchMode` sees every aten op after autograd and autocast have expanded it (the same
ops a CUDA run dispatches), plus each `jit_fast::*` custom op as one opaque op.

Conventions (the modeled GPU execution):
- An aten op is one kernel launch that reads each tensor input once and writes each output once.
  Bytes of a tensor are its distinct elements times the element size (broadcast dims count once).
  Views, `detach`, allocations and metadata ops cost nothing. In-place ops write what they mutate;
  ops that overwrite (`copy_`, `fill_`, `bernoulli_`, ...) do not read their destination.
- A `jit_fast::*` custom op (a fused Triton kernel) is opaque: its inputs read plus outputs written,
  one launch, plus the scratch its launch allocates (`fused_workspace`: each op module's `bwd_workspace`,
  the two-stage reduction buffers and the launches reading them). `count_block(..., launch_helpers=True)`
  instead routes each custom op to its CUDA kernel on the fake tensors (`jit_kernels.spec.LaunchHelpers`) and
  records every Triton launch; the tests require both counts to agree.
- Attention is the flash-attention kernel both paths use on a GPU: the model's `attention` is swapped
  for the counting stand-in of `jit_fast.perf.flash_standin` (one opaque op forward, one backward).
- Autocast is CPU autocast (bf16); for every op JiT uses its cast lists agree with CUDA autocast
  (linear, conv, matmul and SDPA run in bf16; elementwise ops keep their input dtypes).
- Saved-for-backward bytes come from `saved_tensors_hooks`, deduplicated by storage, split into
  activations and weights (parameters, buffers and anything computed from them alone, such as
  autocast's bf16 weight copies): `jit_fast.shared.saved_bytes.SavedBytes`, which the memory plan shares.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import jit_fast.model.network as jit_model
from jit_fast.configs import model_config
from jit_fast.perf.blocks import block_index, block_leaves, capture_block_inputs, cast_parameters, model_batch
from jit_fast.perf.flash_standin import BENCH_NAMESPACE, flash_attention_standin
from jit_fast.perf.flops import attention_flops, gemm_flops
from jit_fast.shared.saved_bytes import OVERWRITE_OPS, SavedBytes, storage_key
from jit_kernels.table import FUNCTIONS

if TYPE_CHECKING:
    from jit_kernels._common import Workspace

PATH_KERNELS = {"eager": "torch", "fused": "triton"}
PHASES = ("fwd", "bwd", "opt")
CATEGORIES = ("gemm", "attention", "fused", "other")
NON_GEMM = ("fused", "other")

FREE_OPS = frozenset({
    "alias", "as_strided", "detach", "empty", "empty_like", "empty_strided", "expand", "lift_fresh",
    "new_empty", "new_empty_strided", "permute", "select", "slice", "split", "split_with_sizes", "squeeze",
    "t", "transpose", "unbind", "unsqueeze", "view", "_unsafe_view", "_reshape_alias", "set_",
})
GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"})
FUSED_NAMESPACE = "jit_fast"
# Forward regions of the block linears' GEMMs (op-table functions and the w3 module), on both paths
BLOCK_LINEAR_REGION = re.compile(
    r"^blocks\.\d+\.(attn\[(linear_qk_norm_rope|branch_linear)\]|mlp\[linear_swiglu\]|mlp\.w3)$")


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a kernel touches in `t` (stride-0 broadcast dims count once).

    0-dim tensors count zero: scalars travel as kernel arguments.
    """
    if t.numel() == 0 or t.dim() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclass
class OpRecord:
    """One dispatched op: where it ran (phase, region), what it was, what it cost."""

    phase: str
    region: str
    op: str
    category: str
    launches: int
    bytes_read: int
    bytes_written: int
    flops: int = 0
    model_flops: int = 0
    gemm_mnk: tuple[int, int, int] | None = None  # a GEMM's (m, k, n): it multiplies m x k by k x n
    block_linear: bool = False  # a GEMM of a block linear (qkv, proj, w12, w3), forward or backward: what --fp8 runs
    # a block-linear GEMM's two operands: "input" or "weight" (forward), "saved" (a forward operand again, backward),
    # "grad" (an output gradient the first time a GEMM reads it), "grad again" (its second GEMM)
    operands: tuple[str, ...] = ()
    fp8: bool = False  # timed at the FP8 peak (see jit_fast.perf.float8)

    @property
    def bytes(self) -> int:
        """Bytes read plus bytes written."""
        return self.bytes_read + self.bytes_written


@dataclass
class Count:
    """All op records of one counted run plus its saved-for-backward bytes and shape metadata."""

    meta: dict
    records: list[OpRecord] = field(default_factory=list)
    saved_activation_bytes: int = 0
    saved_weight_bytes: int = 0

    def totals(self, phases: tuple[str, ...] = PHASES, categories: tuple[str, ...] = CATEGORIES) -> dict[str, int]:
        """Sums of launches, bytes and FLOPs over the records in `phases` and `categories`."""
        out = dict(ops=0, launches=0, bytes_read=0, bytes_written=0, bytes=0, flops=0, model_flops=0)
        for r in self.records:
            if r.phase in phases and r.category in categories:
                out["ops"] += 1
                out["launches"] += r.launches
                out["bytes_read"] += r.bytes_read
                out["bytes_written"] += r.bytes_written
                out["bytes"] += r.bytes
                out["flops"] += r.flops
                out["model_flops"] += r.model_flops
        return out

    def summary(self) -> dict:
        """Per-phase and per-category totals, saved bytes, and per-token-per-hidden normalized bytes."""
        phases = [p for p in PHASES if any(r.phase == p for r in self.records)]
        table = {}
        for p in phases:
            row = {c: self.totals((p,), (c,)) for c in CATEGORIES}
            row["all"] = self.totals((p,))
            row["non_gemm"] = self.totals((p,), NON_GEMM)
            table[p] = row
        elems = self.meta.get("batch", 0) * self.meta.get("tokens", 0) * self.meta.get("hidden", 0)
        per_elem = {p: table[p]["non_gemm"]["bytes"] / elems for p in phases} if elems else {}
        return dict(
            meta=self.meta,
            phases=table,
            fwd_bwd=self.totals(("fwd", "bwd")),
            fwd_bwd_non_gemm=self.totals(("fwd", "bwd"), NON_GEMM),
            saved_activation_bytes=self.saved_activation_bytes,
            saved_weight_bytes=self.saved_weight_bytes,
            non_gemm_bytes_per_token_hidden=per_elem,
        )

    def per_op(self, merge_blocks: bool = True) -> list[dict]:
        """Records aggregated by (phase, region, op); `blocks.<i>.` prefixes merge into `blocks.*.`."""
        rows: dict[tuple[str, str, str, str], dict] = {}
        for r in self.records:
            region = _merge_block_index(r.region) if merge_blocks else r.region
            key = (r.phase, region, r.op, r.category)
            row = rows.setdefault(
                key,
                dict(phase=r.phase, region=region, op=r.op, category=r.category, calls=0, launches=0,
                     bytes_read=0, bytes_written=0, flops=0),
            )
            row["calls"] += 1
            row["launches"] += r.launches
            row["bytes_read"] += r.bytes_read
            row["bytes_written"] += r.bytes_written
            row["flops"] += r.flops
        return list(rows.values())


def _merge_block_index(region: str) -> str:
    parts = region.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        parts[1] = "*"
    return ".".join(parts)


def _mutated_args(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Tensors the op writes in place (schema arguments annotated as written)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        val = args[i] if i < len(args) else kwargs.get(a.name)
        out += [t for t in tree_leaves(val) if isinstance(t, torch.Tensor)]
    return out


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def fused_workspace(op: str, args: dict) -> Workspace | None:
    """Scratch of a fused op beyond its inputs read and outputs written, as the op's spec declares it for its
    launch (`LibraryOp.workspace`: fp32 reduction buffers and the second-stage launches reading them); `args` are
    the op's arguments by schema name. None for ops without scratch. Kept honest by tests/test_traffic.py, which
    counts the launch helpers' real launches."""
    from jit_kernels import op_specs

    return next((w for spec in op_specs() if (w := spec.workspace(op, args)) is not None), None)


def _named_args(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict:
    """An op's arguments by schema name, defaults filled in."""
    named = {}
    for i, a in enumerate(func._schema.arguments):
        named[a.name] = args[i] if i < len(args) else kwargs.get(a.name, a.default_value)
    return named


class TrafficCounter(TorchDispatchMode):
    """Dispatch mode that records an `OpRecord` per costed op; set `phase` and `region` while it runs."""

    def __init__(self, constants: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.phase = "fwd"
        self.regions: list[str] = []
        self.saved = SavedBytes(constants)
        # storages the block linears' forward GEMMs read (activations, weight copies): a backward GEMM reading one
        # is that linear's dgrad or wgrad; the storages stay referenced so no key is reused
        self.linear_operands: dict[int, torch.UntypedStorage] = {}
        self.linear_grads: dict[int, torch.UntypedStorage] = {}  # output gradients a backward GEMM already read

    @property
    def region(self) -> str:
        """Label of the current op: the innermost module/op-table region forward, the autograd node backward."""
        if self.phase != "fwd":
            node = torch._C._current_autograd_node()
            return node.name() if node is not None else self.phase
        return self.regions[-1] if self.regions else ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns, name = func.namespace, func._schema.name.split("::")[-1]
        if ns in ("prim", "profiler") or (ns == "aten" and (name in FREE_OPS or func.is_view)):
            return out
        ins = _unique([t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)])
        outs = _unique([t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
        written = outs or _unique(_mutated_args(func, args, kwargs))
        if not written:  # returns no tensor and writes none (promote_types, sizes, ...): no kernel
            return out
        if name in OVERWRITE_OPS:
            skip = {id(t) for t in written}
            ins = [t for t in ins if id(t) not in skip]
        if self.phase == "fwd":
            self.saved.observe(func, ins, outs)
        record = OpRecord(
            phase=self.phase,
            region=self.region,
            op=f"{ns}::{name}",
            category="other",
            launches=1,
            bytes_read=sum(footprint(t) for t in ins),
            bytes_written=sum(footprint(t) for t in written),
        )
        if ns == BENCH_NAMESPACE:
            self._cost_attention(record, name, args)
        elif ns == FUSED_NAMESPACE:
            record.category = "fused"
            workspace = fused_workspace(record.op, _named_args(func, args, kwargs))
            if workspace is not None:
                record.launches += workspace.launches
                record.bytes_read += workspace.bytes
                record.bytes_written += workspace.bytes
        elif ns == "aten" and name in GEMM_OPS:
            record.category = "gemm"
            record.flops = record.model_flops = gemm_flops(name, args)
            self._tag_block_linear(record, name, args)
        self.records.append(record)
        return out

    def _tag_block_linear(self, record: OpRecord, name: str, args: tuple) -> None:
        """Note a 2-D GEMM's (m, k, n) and whether it belongs to a block linear: forward by its region, backward by
        reading a storage one of their forward GEMMs read."""
        if name not in ("mm", "addmm"):
            return
        a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
        record.gemm_mnk = (a.shape[0], a.shape[1], b.shape[1])
        if self.phase == "fwd":
            record.block_linear = bool(BLOCK_LINEAR_REGION.match(self.region))
            if record.block_linear:  # the weight (or autocast's copy of it) is a constant's storage
                record.operands = tuple("weight" if storage_key(t) in self.saved.constant_storages else "input"
                                        for t in (a, b))
                self.linear_operands.update({storage_key(t): t.untyped_storage() for t in (a, b)})
        else:
            keys = (storage_key(a), storage_key(b))
            record.block_linear = any(key in self.linear_operands for key in keys)
            if record.block_linear:
                record.operands = tuple("saved" if key in self.linear_operands else
                                        "grad again" if key in self.linear_grads else "grad" for key in keys)
                self.linear_grads.update({key: t.untyped_storage() for key, t in zip(keys, (a, b), strict=True)
                                          if key not in self.linear_operands})

    def _cost_attention(self, record: OpRecord, name: str, args: tuple) -> None:
        record.category = "attention"
        if name == "flash_attention":
            record.flops = record.model_flops = attention_flops(args[0], args[1], heads_dim=2)
        else:
            fwd = attention_flops(args[1], args[2], heads_dim=2)
            record.flops, record.model_flops = fwd * 5 // 2, 2 * fwd

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """saved_tensors_hooks pack hook (`SavedBytes.pack`)."""
        return self.saved.pack(t)

    @contextlib.contextmanager
    def in_region(self, name: str) -> Iterator[None]:
        """Label the forward ops issued inside the context with `name`."""
        self.regions.append(name)
        try:
            yield
        finally:
            self.regions.pop()


@contextlib.contextmanager
def record_triton_launches(counter: TrafficCounter) -> Iterator[None]:
    """Record `kernel[grid](...)` launches as one-launch records instead of running them (for fake tensors).

    Bytes are the footprints of the distinct tensor arguments: each buffer a kernel is handed is taken
    to be read or written once. With `jit_kernels.spec.LaunchHelpers`, counts the fused ops launch by launch.
    """
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        def launch(*args, **kwargs):
            tensors = _unique([a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)])
            name = getattr(getattr(kernel, "fn", None), "__name__", type(kernel).__name__)
            counter.records.append(OpRecord(
                phase=counter.phase, region=counter.region, op=f"triton::{name}", category="fused", launches=1,
                bytes_read=sum(footprint(t) for t in tensors), bytes_written=0,
            ))

        return launch

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


# ------------------------------------------------------------------------------------------------
# Regions: module names (forward hooks) and op-table entries (wrapped functions).


@contextlib.contextmanager
def track_regions(counter: TrafficCounter, root: torch.nn.Module) -> Iterator[None]:
    """Label forward ops with the innermost module name and op-table function that issued them."""
    handles = []
    for name, mod in root.named_modules():
        if not name:
            continue
        handles.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: counter.regions.append(n)))
        handles.append(mod.register_forward_hook(lambda _m, _a, _o: _pop(counter.regions)))
    ops = getattr(root, "ops", None)
    holders = [m for m in root.modules() if ops is not None and getattr(m, "ops", None) is ops]

    def wrap(fname: str, fn: Callable) -> Callable:
        def wrapped(*a, **kw):
            parent = counter.regions[-1] if counter.regions else ""
            with counter.in_region(f"{parent}[{fname}]" if parent else fname):
                return fn(*a, **kw)

        return wrapped

    if holders:  # the table is frozen: the modules get a labelling copy of it for the count
        labelled = dataclasses.replace(ops, **{f: wrap(f, getattr(ops, f)) for f in FUNCTIONS})
        for m in holders:
            m.ops = labelled
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in holders:
            m.ops = ops


def _pop(stack: list[str]) -> None:
    stack.pop()


# ------------------------------------------------------------------------------------------------
# Counting entry points.


def _constants(net: torch.nn.Module) -> list[torch.Tensor]:
    return [*net.parameters(), *net.buffers()]


def count_block(
    model: str = "JiT-B/16",
    path: str = "eager",
    batch: int = 128,
    img_size: int = 256,
    which: str = "standard",
    backward: bool = True,
    autocast: bool = True,
    fake: bool = True,
    launch_helpers: bool = False,
    param_dtype: torch.dtype | None = None,
    **overrides,
) -> Count:
    """Count one JiT block forward (and backward) at full shape for the eager or fused path.

    `fake=False` runs real CPU tensors instead of fake ones (same op stream; used to validate the fake run).
    `launch_helpers=True` (fused path, fake tensors) routes each custom op to its CUDA kernel, the Triton launch
    helpers, and records every Triton launch and helper aten op instead of the opaque op (validates `fused_workspace`).
    `param_dtype=torch.bfloat16` computes with bf16 block parameters, as FSDP2's bf16 gather does in
    multi-GPU training (see `cast_parameters`).
    """
    cfg = model_config(model, img_size=img_size, kernels=PATH_KERNELS[path], **overrides)
    idx = block_index(cfg, which)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with FakeTensorMode() if fake else contextlib.nullcontext(), flash_attention_standin():
        net = cast_parameters(jit_model.JiT(cfg).train(), param_dtype)
        net.set_dropout_seed(0)  # as the training loop keys each step's fused dropout
        block = net.blocks[idx]
        with amp:
            args, kwargs = capture_block_inputs(net, idx, batch)
        args = block_leaves(args)
        rope = args[2]
        counter = TrafficCounter(_constants(net) + list(rope))
        routed = contextlib.nullcontext
        if launch_helpers:
            from jit_kernels.spec import LaunchHelpers

            routed = LaunchHelpers
        with record_triton_launches(counter) if launch_helpers else contextlib.nullcontext():
            with counter, routed(), track_regions(counter, block), amp, torch.autograd.graph.saved_tensors_hooks(
                counter.pack, _id
            ):
                outs = block(*args, **kwargs)
            if backward:
                outs = [o for o in outs if o.requires_grad]
                grads = [torch.randn_like(o) for o in outs]
                counter.phase = "bwd"
                with counter, routed():
                    torch.autograd.backward(outs, grads)
    n_tokens = args[0].shape[1]
    meta = dict(kind="block", model=model, path=path, batch=batch, img_size=img_size, block=idx, which=which,
                tokens=n_tokens, hidden=cfg.hidden_size, heads=cfg.num_heads, depth=cfg.depth,
                autocast="bf16" if autocast else "off", params=str(param_dtype or torch.float32))
    return _finish(counter, meta)


def _id(t: torch.Tensor) -> torch.Tensor:
    return t


def _finish(counter: TrafficCounter, meta: dict) -> Count:
    return Count(
        meta=meta,
        records=counter.records,
        saved_activation_bytes=counter.saved.activation_bytes,
        saved_weight_bytes=counter.saved.weight_bytes,
    )


def count_train_step(
    model: str = "JiT-B/16",
    path: str = "eager",
    batch: int = 128,
    img_size: int = 256,
    optimizer: bool = True,
    param_dtype: torch.dtype | None = None,
    **overrides,
) -> Count:
    """Count a whole train step: flow-matching loss forward, backward, fused AdamW and two EMA updates.

    With `param_dtype` the forward and backward use block parameters of that dtype (FSDP2's bf16 gather); the
    optimizer phase is then not counted, since FSDP2 steps its fp32 shards (not modeled here).
    """
    from jit_fast.model.denoiser import flow_matching_loss
    from jit_fast.train.ema import EMA

    cfg = model_config(model, img_size=img_size, kernels=PATH_KERNELS[path], **overrides)
    with FakeTensorMode(), flash_attention_standin():
        net = cast_parameters(jit_model.JiT(cfg).train(), param_dtype)
        net.set_dropout_seed(0)  # as the training loop keys each step's fused dropout
        params = [p for p in net.parameters() if p.requires_grad]
        x, t, y = model_batch(cfg, batch)
        counter = TrafficCounter(_constants(net))
        with (
            counter,
            track_regions(counter, net),
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(counter.pack, _id),
        ):
            loss = flow_matching_loss(net, x, y, t=t, num_classes=cfg.num_classes)
        counter.phase = "bwd"
        with counter:
            loss.backward()
        if optimizer and param_dtype is None:
            opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
            emas = [EMA(params, 0.9999), EMA(params, 0.9996)]
            opt.step()
            counter.phase = "opt"
            with counter:
                opt.step()
                for ema in emas:
                    ema.update(params)
    meta = dict(kind="train_step", model=model, path=path, batch=batch, img_size=img_size,
                tokens=cfg.grid_size**2 + cfg.in_context_len, hidden=cfg.hidden_size, depth=cfg.depth,
                params=sum(p.numel() for p in params), autocast="bf16", param_dtype=str(param_dtype or torch.float32),
                optimizer="AdamW(fused) + 2 EMA" if optimizer and param_dtype is None else "none")
    return _finish(counter, meta)


def count_forward(
    model: str = "JiT-B/16", path: str = "eager", batch: int = 128, img_size: int = 256,
    param_dtype: torch.dtype | None = None, **overrides
) -> Count:
    """Count one inference forward of the whole model (eval mode, no grad, bf16 autocast): one sampler NFE.
    `param_dtype=torch.bfloat16`: block weights cast once beforehand, so no forward casts them (`cast_parameters`)."""
    cfg = model_config(model, img_size=img_size, kernels=PATH_KERNELS[path], **overrides)
    with FakeTensorMode(), flash_attention_standin():
        net = cast_parameters(jit_model.JiT(cfg).eval(), param_dtype)
        x, t, y = model_batch(cfg, batch)
        counter = TrafficCounter(_constants(net))
        with counter, torch.no_grad(), track_regions(counter, net), torch.autocast("cpu", dtype=torch.bfloat16):
            net(x, t, y)
    meta = dict(kind="forward", model=model, path=path, batch=batch, img_size=img_size,
                tokens=cfg.grid_size**2 + cfg.in_context_len, hidden=cfg.hidden_size, depth=cfg.depth, autocast="bf16",
                params=str(param_dtype or torch.float32))
    return _finish(counter, meta)


def count_function(fn: Callable[[], object], constants: Sequence[torch.Tensor] = ()) -> Count:
    """Count the ops `fn()` dispatches (forward only, no autograd phase split); for single-op checks."""
    counter = TrafficCounter(list(constants))
    with counter:
        fn()
    return _finish(counter, dict(kind="function"))


def count_call(fn: Callable, args: tuple, backward: bool = True, meta: dict | None = None) -> Count:
    """Count `fn(*args)` (and its backward w.r.t. the grad-requiring tensor args) on fake copies of `args`."""
    mode = FakeTensorMode()
    fargs = tuple(
        mode.from_tensor(a.detach()).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in args
    )
    with mode:
        wrt = [a for a in fargs if isinstance(a, torch.Tensor) and a.requires_grad]
        counter = TrafficCounter([a for a in fargs if isinstance(a, torch.Tensor) and not a.requires_grad])
        with counter, torch.autograd.graph.saved_tensors_hooks(counter.pack, _id):
            out = fn(*fargs)
        if backward:
            outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
            grads = [torch.randn_like(o) for o in outs]
            counter.phase = "bwd"
            with counter:
                torch.autograd.grad(outs, wrt, grads)
    return _finish(counter, dict(kind="call", **(meta or {})))


def compare(eager: Count, fused: Count) -> dict:
    """Fused/eager ratios of non-GEMM bytes, launches and saved activations over forward+backward."""
    e_ng, f_ng = eager.totals(("fwd", "bwd"), NON_GEMM), fused.totals(("fwd", "bwd"), NON_GEMM)
    e_all, f_all = eager.totals(("fwd", "bwd")), fused.totals(("fwd", "bwd"))
    return dict(
        non_gemm_bytes_eager=e_ng["bytes"],
        non_gemm_bytes_fused=f_ng["bytes"],
        non_gemm_bytes_ratio=f_ng["bytes"] / e_ng["bytes"],
        launches_eager=e_all["launches"],
        launches_fused=f_all["launches"],
        launches_ratio=f_all["launches"] / e_all["launches"],
        saved_activation_bytes_eager=eager.saved_activation_bytes,
        saved_activation_bytes_fused=fused.saved_activation_bytes,
        saved_ratio=fused.saved_activation_bytes / eager.saved_activation_bytes,
    )


def format_count(count: Count, top: int = 30) -> str:
    """Plain-text totals per phase and category, then the `top` op groups by bytes moved."""
    lines = [f"{count.meta}"]
    for phase, row in count.summary()["phases"].items():
        cats = ", ".join(f"{c} {row[c]['launches']} launches {row[c]['bytes'] / 1e9:.2f} GB" for c in CATEGORIES)
        lines.append(f"{phase}: {cats}")
    lines.append(f"saved for backward: activations {count.saved_activation_bytes / 1e9:.2f} GB, "
                 f"weights {count.saved_weight_bytes / 1e9:.2f} GB")
    rows = sorted(count.per_op(), key=lambda r: -(r["bytes_read"] + r["bytes_written"]))[:top]
    lines.append(f"{'phase':5} {'calls':>5} {'launch':>6} {'GB read':>8} {'GB wrote':>8} {'GFLOP':>8}  op  [region]")
    lines += [f"{r['phase']:5} {r['calls']:5d} {r['launches']:6d} {r['bytes_read'] / 1e9:8.3f} "
              f"{r['bytes_written'] / 1e9:8.3f} {r['flops'] / 1e9:8.1f}  {r['op']}  [{r['region']}]" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: count a block (or a train step) of one path and print totals and the heaviest ops."""
    import argparse

    ap = argparse.ArgumentParser(description="Count bytes, launches, FLOPs and saved activations (fake tensors).")
    ap.add_argument("--model", default="JiT-B/16")
    ap.add_argument("--path", default="fused", choices=sorted(PATH_KERNELS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--which", default="standard", choices=["standard", "dropout", "first"])
    ap.add_argument("--step", action="store_true", help="whole train step instead of one block")
    ap.add_argument("--bf16-params", action="store_true",
                    help="bf16 block parameters, as FSDP2 gathers them (root stays fp32)")
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    dtype = torch.bfloat16 if args.bf16_params else None
    if args.step:
        count = count_train_step(args.model, args.path, args.batch, args.img_size, param_dtype=dtype)
    else:
        count = count_block(args.model, args.path, args.batch, args.img_size, which=args.which, param_dtype=dtype)
    print(format_count(count, args.top))
    return 0


__all__ = [
    "Count",
    "OpRecord",
    "TrafficCounter",
    "compare",
    "count_block",
    "count_call",
    "count_forward",
    "count_function",
    "count_train_step",
    "footprint",
    "format_count",
]


if __name__ == "__main__":
    raise SystemExit(main())
