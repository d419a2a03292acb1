"""The official JiT checkpoint format (`checkpoint-last.pth`): safe loading, export, optimizer layout, shapes.

An official checkpoint is a pickle holding `model`, `model_ema1`, `model_ema2` (keys prefixed
"net."), `optimizer` (AdamW state keyed by parameter index), `epoch` and the argparse `args`. It is
loaded weights-only with an allow-list for that Namespace.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch

from jit_fast.checkpoint.dcp import state_nbytes
from jit_fast.checkpoint.meta import RECIPE_KEYS, CheckpointError, ModelMeta, short_error
from jit_fast.checkpoint.sanity import check_weights
from jit_fast.configs import ModelConfig
from jit_fast.shared.files import atomic_write

OFFICIAL_MODEL_KEYS = ("model", "model_ema1", "model_ema2")
# Non-persistent RoPE tables that some releases stored; they are rebuilt from the config.
_DERIVED_PREFIXES = ("feat_rope.", "feat_rope_incontext.")


def safe_load(path: str | Path) -> dict:
    """torch.load with weights_only=True plus argparse.Namespace; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        why = next((x for x in lines if "GLOBAL" in x or "global" in x), lines[0] if lines else "")
        raise CheckpointError(f"refused to load {path}: it needs a global outside the allow-list ({why})") from None
    except Exception as e:  # garbage bytes fail inside the unpickler in many ways (e.g. KeyError on a text file)
        raise CheckpointError(f"cannot read checkpoint {path}: {short_error(e)}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a dict")
    return obj


def strip_net_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the Denoiser's "net." prefix and derived buffers from an official state dict."""
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("net.")
        if not k.startswith(_DERIVED_PREFIXES):
            out[k] = v
    return out


def add_net_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official key names for a JiT state dict."""
    return {f"net.{k}": v for k, v in sd.items()}


def load_official_checkpoint(path: str | Path) -> dict:
    """Read an official checkpoint: {"model", "model_ema1", "model_ema2", ...}, keys without "net.".

    Every weight is checked floating point and finite (`jit_fast.checkpoint.sanity`), naming the tensor.
    """
    ckpt = safe_load(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path} has no 'model' entry (keys: {sorted(ckpt)[:8]})")
    out = dict(ckpt)
    for key in OFFICIAL_MODEL_KEYS:
        if key in ckpt:
            if not isinstance(ckpt[key], dict):
                raise CheckpointError(f"{path}: '{key}' is a {type(ckpt[key]).__name__}, expected a state dict")
            out[key] = strip_net_prefix(ckpt[key])
            check_weights(out[key], f"checkpoint {path}", key)
    return out


def official_args(meta: ModelMeta) -> argparse.Namespace:
    """The argparse Namespace an official checkpoint stores, from our model metadata (overrides and recipe kept)."""
    ov = meta.overrides
    return argparse.Namespace(
        model=meta.model,
        img_size=meta.img_size,
        class_num=meta.num_classes,
        attn_dropout=float(ov.get("attn_drop", 0.0)),
        proj_dropout=float(ov.get("proj_drop", 0.0)),
        jit_fast_overrides=ov,
        **meta.recipe(),
    )


def meta_from_official_args(args: Any, source: str | Path) -> ModelMeta:
    """Model metadata (preset, img_size, num_classes, overrides, recipe) from an official `args` Namespace."""
    if not isinstance(args, argparse.Namespace):
        return ModelMeta()
    ns = vars(args)
    meta: dict[str, Any] = {}
    if ns.get("model"):
        meta["model"] = ns["model"]
    if ns.get("img_size"):
        meta["img_size"] = ns["img_size"]
    if ns.get("class_num"):
        meta["num_classes"] = ns["class_num"]
    ov = {}
    for src, dst in (("attn_dropout", "attn_drop"), ("proj_dropout", "proj_drop")):
        if ns.get(src) is not None:
            ov[dst] = float(ns[src])
    extra = ns.get("jit_fast_overrides")
    if isinstance(extra, dict):
        ov.update(extra)
    meta["overrides"] = ov
    meta.update({k: ns[k] for k in RECIPE_KEYS if ns.get(k) is not None})
    return ModelMeta.from_dict(meta, source)


def official_param_order(named_params: list[tuple[str, torch.Size, bool]]) -> list[str]:
    """Parameter names in the order of the official optimizer's state indices.

    The official script builds AdamW on two groups, [no-decay (1-D or bias), decay], each in
    `named_parameters` order and skipping frozen parameters; state index i is the i-th of them.
    """
    no_decay, decay = [], []
    for name, shape, requires_grad in named_params:
        if not requires_grad:
            continue
        (no_decay if len(shape) == 1 or name.endswith(".bias") else decay).append(name)
    return no_decay + decay


def optimizer_from_official(
    osd: dict, named_params: list[tuple[str, torch.Size, bool]]
) -> tuple[dict | None, str]:
    """Official index-keyed AdamW state -> FQN-keyed full state; (None, reason) if shapes do not fit."""
    try:
        state, groups = osd["state"], osd["param_groups"]
    except (KeyError, TypeError):
        return None, "no 'state'/'param_groups' in the optimizer entry"
    names = official_param_order(named_params)
    shapes = {n: tuple(s) for n, s, _ in named_params}
    n_group = sum(len(g["params"]) for g in groups)
    if n_group != len(names):
        return None, f"it covers {n_group} parameters, the model trains {len(names)}"
    index = [i for g in groups for i in g["params"]]
    out_state = {}
    for i, name in zip(index, names, strict=True):
        if i not in state:
            continue
        s = state[i]
        for k in ("exp_avg", "exp_avg_sq"):
            if k in s and tuple(s[k].shape) != shapes[name]:
                return None, f"{name}.{k} has shape {tuple(s[k].shape)}, the model needs {shapes[name]}"
        out_state[name] = dict(s)
    out_groups, pos = [], 0
    for g in groups:
        g2 = {k: v for k, v in g.items() if k != "params"}
        g2["params"] = names[pos : pos + len(g["params"])]
        pos += len(g["params"])
        out_groups.append(g2)
    return {"state": out_state, "param_groups": out_groups}, ""


def optimizer_to_official(osd: dict, named_params: list[tuple[str, torch.Size, bool]]) -> dict:
    """FQN-keyed full AdamW state (from get_optimizer_state_dict) -> official index-keyed layout."""
    names = official_param_order(named_params)
    idx = {n: i for i, n in enumerate(names)}
    state = {idx[n]: dict(s) for n, s in osd["state"].items() if n in idx}
    groups = []
    for g in osd["param_groups"]:
        g2 = {k: v for k, v in g.items() if k != "params"}
        g2["params"] = [idx[n] for n in g["params"]]
        groups.append(g2)
    return {"state": state, "param_groups": groups}


def export_official_checkpoint(
    path: str | Path,
    model: dict,
    ema1: dict,
    ema2: dict,
    epoch: int,
    args: argparse.Namespace | None = None,
    optimizer: dict | None = None,
) -> None:
    """Write EMA and model weights in the official `.pth` layout (keys prefixed "net.").

    `optimizer`, if given, must already be in the official index-keyed layout.
    """
    obj = {
        "model": add_net_prefix(model),
        "model_ema1": add_net_prefix(ema1),
        "model_ema2": add_net_prefix(ema2),
        "epoch": epoch,
        "args": args or argparse.Namespace(),
    }
    if optimizer is not None:
        obj["optimizer"] = optimizer
    _atomic_torch_save(obj, Path(path))


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f), size=state_nbytes(obj))


def official_state_dict_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key (without the "net." prefix) and shape of the official JiT state_dict, from the facts."""
    d, p, c, b = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.bottleneck_dim
    hd, h = cfg.head_dim, cfg.mlp_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, cfg.grid_size**2, d),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + 1, d),
        "x_embedder.proj1.weight": (b, c, p, p),
        "x_embedder.proj2.weight": (d, b, 1, 1),
        "x_embedder.proj2.bias": (d,),
    }
    if cfg.conditioning == "text":  # not official: the label table's place is taken by the caption projection
        del shapes["y_embedder.embedding_table.weight"]
        shapes.update({"y_embedder.proj.weight": (d, cfg.text_dim), "y_embedder.proj.bias": (d,)})
        if cfg.null_text == "learned":
            shapes["y_embedder.null_embedding"] = (d,)
        else:
            shapes["y_embedder.empty_pooled"] = (cfg.text_dim,)
        if cfg.text_tokens == "sequence":
            shapes["y_embedder.pad_token"] = (d,)
            if cfg.null_text == "empty":
                shapes["y_embedder.empty_tokens"] = (cfg.in_context_len, cfg.text_dim)
                shapes["y_embedder.empty_mask"] = (cfg.in_context_len,)
    if cfg.in_context_len > 0:
        shapes["in_context_posemb"] = (1, cfg.in_context_len, d)
    for i in range(cfg.depth):
        k = f"blocks.{i}."
        shapes.update({
            k + "norm1.weight": (d,),
            k + "attn.qkv.weight": (3 * d, d),
            k + "attn.qkv.bias": (3 * d,),
            k + "attn.q_norm.weight": (hd,),
            k + "attn.k_norm.weight": (hd,),
            k + "attn.proj.weight": (d, d),
            k + "attn.proj.bias": (d,),
            k + "norm2.weight": (d,),
            k + "mlp.w12.weight": (2 * h, d),
            k + "mlp.w12.bias": (2 * h,),
            k + "mlp.w3.weight": (d, h),
            k + "mlp.w3.bias": (d,),
            k + "adaLN_modulation.1.weight": (6 * d, d),
            k + "adaLN_modulation.1.bias": (6 * d,),
        })
    shapes.update({
        "final_layer.norm_final.weight": (d,),
        "final_layer.linear.weight": (p * p * c, d),
        "final_layer.linear.bias": (p * p * c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    })
    return shapes


