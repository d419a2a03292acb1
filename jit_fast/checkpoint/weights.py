"""Weights for sampling and export: one weight set from any checkpoint kind, safetensors, model rebuilding.

``python -m jit_fast.export SRC DST [--which ema1]`` converts between the formats (`export_checkpoint`;
DST ending in .safetensors or .pth).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from jit_fast.checkpoint.dcp import dcp_model_meta, load_dcp_keys, read_meta, resolve_checkpoint
from jit_fast.checkpoint.meta import CheckpointError, ModelMeta
from jit_fast.checkpoint.official import (
    export_official_checkpoint,
    load_official_checkpoint,
    meta_from_official_args,
    official_args,
    optimizer_to_official,
    strip_net_prefix,
)
from jit_fast.checkpoint.sanity import check_weights
from jit_fast.shared.files import atomic_write

WEIGHT_SETS = ("ema1", "ema2", "model")
_OFFICIAL_KEY = {"ema1": "model_ema1", "ema2": "model_ema2", "model": "model"}


def export_safetensors(path: str | Path, state_dict: dict[str, torch.Tensor], meta: ModelMeta,
                       which: str = "ema1") -> None:
    """Write one weight set (JiT key names) with the model metadata, step and epoch in the safetensors header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    on_disk = {**meta.to_dict(), "step": meta.step, "epoch": meta.epoch}
    header = {"format": "jit_fast", "weights": which, "jit_fast_meta": json.dumps(on_disk, sort_keys=True)}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda f: save_file(tensors, f.name, metadata=header), size=size)  # it writes by file name


def load_safetensors(path: str | Path, which: str | None = None) -> tuple[dict[str, torch.Tensor], ModelMeta]:
    """(state_dict, model meta) from a safetensors file written by `export_safetensors` (or bare weights).

    Every tensor is checked floating point and finite (`jit_fast.checkpoint.sanity`), naming the tensor.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read safetensors file {path}: {e}") from None
    held = header.get("weights")
    if which is not None and held is not None and held != which:
        raise CheckpointError(f"{path} holds the {held} weights, not {which}")
    check_weights(sd, f"checkpoint {path}", held)
    try:
        meta = json.loads(header["jit_fast_meta"]) if "jit_fast_meta" in header else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt jit_fast metadata ({e})") from None
    return strip_net_prefix(sd), ModelMeta.from_dict(meta, path)


def load_weights(path: str | Path, which: str = "ema1", verify: bool = True) -> tuple[dict[str, torch.Tensor],
                                                                                    ModelMeta]:
    """Weights `which` ("ema1", "ema2" or "model") and model metadata from any checkpoint kind.

    `path` may be a DCP checkpoint dir, a run output dir (newest checkpoint), an official `.pth`
    (or a folder with checkpoint-last.pth) or a `.safetensors` file. Returns (state_dict with JiT
    key names, meta) where meta records the network when known (build it with
    `build_model_from_meta`), the recipe, step/epoch, and source/kind/weights.
    `verify=False` skips the checksums of a DCP checkpoint (`--skip-checksum`).
    """
    if which not in WEIGHT_SETS:
        raise ValueError(f"unknown weight set {which!r}; choose one of {WEIGHT_SETS}")
    r = resolve_checkpoint(path)
    if r.kind == "dcp":
        run = read_meta(r.path)
        sd = load_dcp_keys(r.path, {which}, verify)[which]
        meta = dcp_model_meta(run, r.path)
    elif r.kind == "official":
        ckpt = load_official_checkpoint(r.path)
        key = _OFFICIAL_KEY[which]
        if key not in ckpt:
            raise CheckpointError(f"{r.path} has no '{key}' entry")
        sd = ckpt[key]
        meta = meta_from_official_args(ckpt.get("args"), r.path).replace(epoch=ckpt.get("epoch"))
    else:
        sd, meta = load_safetensors(r.path, which)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return sd, meta.replace(source=str(r.path), kind=r.kind, weights=which)


def build_model_from_meta(meta: ModelMeta, kernels: str = "torch", device: torch.device | str | None = None,
                          precision: str = "fp32", **overrides):
    """Rebuild the network a checkpoint was trained with from `load_weights` metadata, its op table chosen for
    `device` and `precision` (`jit_kernels.select_ops`)."""
    from jit_fast.model.network import build_model

    missing = [k for k in ("model", "img_size", "num_classes") if getattr(meta, k) is None]
    if missing:
        raise CheckpointError(f"{meta.source or 'checkpoint'} does not record {missing}; pass them explicitly")
    return build_model(meta.model, img_size=meta.img_size, num_classes=meta.num_classes, kernels=kernels,
                       device=device, precision=precision, **{**meta.overrides, **overrides})


def load_model(path: str | Path, which: str = "ema1", kernels: str = "torch", device="cpu", verify: bool = True):
    """(net in eval mode with weights `which`, meta) from any checkpoint kind."""
    sd, meta = load_weights(path, which, verify)
    net = build_model_from_meta(meta, kernels=kernels, device=device)
    check_state_dict(net, sd, str(meta.source))
    net.load_state_dict(sd, strict=True)
    return net.to(device).eval(), meta


def check_state_dict(net: torch.nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """One-line CheckpointError naming the first missing/unexpected/mis-shaped key."""
    own = net.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise CheckpointError(
            f"{source} does not fit the model: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(extra)} unexpected (e.g. {extra[:2]})"
        )
    for k, v in own.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source} does not fit the model: {k} has shape {tuple(sd[k].shape)}, "
                                  f"the model needs {tuple(v.shape)}")


def export_checkpoint(src: str | Path, dst: str | Path, which: str = "ema1", verify: bool = True) -> Path:
    """Convert any checkpoint to `.safetensors` (one weight set) or official `.pth` (all three + optimizer)."""
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        sd, meta = load_weights(src, which, verify)
        export_safetensors(dst, sd, meta, which)
        return dst
    if dst.suffix not in (".pth", ".pt"):
        raise ValueError(f"unknown export format for {dst} (use .safetensors or .pth)")
    r = resolve_checkpoint(src)
    if r.kind == "dcp":
        run = read_meta(r.path)
        full = load_dcp_keys(r.path, {"model", "ema1", "ema2", "optim"}, verify)
        meta = dcp_model_meta(run, r.path).replace(source=str(r.path))
        net = build_model_from_meta(meta)
        named = [(n, p.shape, p.requires_grad) for n, p in net.named_parameters()]
        optim = None
        if "optim" in full and full["optim"].get("state"):
            optim = optimizer_to_official(full["optim"], named)
        # official `epoch` = last finished epoch (its resume starts at epoch + 1)
        epoch = int(run.get("epoch", 0)) - 1
        export_official_checkpoint(dst, full["model"], full["ema1"], full["ema2"], epoch, official_args(meta), optim)
        return dst
    sds = {w: load_weights(src, w, verify) for w in WEIGHT_SETS}
    meta = sds["ema1"][1]
    export_official_checkpoint(dst, sds["model"][0], sds["ema1"][0], sds["ema2"][0], meta.epoch or 0,
                               official_args(meta))
    return dst
