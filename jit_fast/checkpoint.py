"""Checkpoints: sharded DCP training checkpoints, official import/export and weight loading.

Training checkpoints are torch.distributed.checkpoint (DCP) directories
``<run>/checkpoints/step_<N>/`` holding the sharded model, optimizer and both EMAs (resharding
on load: any world size can resume any other), ``meta.json`` (step, epoch, data position,
model metadata, recipe), ``rank<R>.pt`` (per-rank RNG and loader state) and ``checksums.json``
(sha256 of every file, `jit_fast.integrity`). A checkpoint is written into ``.tmp-step_<N>`` and
renamed into place only when complete, so the newest ``step_*`` directory is always whole.
Every DCP read goes through `jit_fast.safe_dcp.SafeFileSystemReader` (no code from the files,
checksums verified unless `verify=False`).

An official JiT checkpoint (`checkpoint-last.pth`) is a pickle holding `model`,
`model_ema1`, `model_ema2` (keys prefixed "net."), `optimizer`, `epoch` and the argparse
`args`. It is loaded weights-only with an allow-list for that Namespace.

``python -m jit_fast.export SRC DST [--which ema1]`` converts between the formats
(DST ending in .safetensors or .pth).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import shutil
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jit_fast import integrity
from jit_fast.errors import UserError
from jit_fast.files import TMP_PREFIX, atomic_write

OFFICIAL_MODEL_KEYS = ("model", "model_ema1", "model_ema2")
# Non-persistent RoPE tables that some releases stored; they are rebuilt from the config.
_DERIVED_PREFIXES = ("feat_rope.", "feat_rope_incontext.")

CHECKPOINT_SUBDIR = "checkpoints"
STEP_PREFIX = "step_"
META_FILE = "meta.json"
FORMAT = "jit_fast-dcp-v1"
WEIGHT_SETS = ("ema1", "ema2", "model")
_OFFICIAL_KEY = {"ema1": "model_ema1", "ema2": "model_ema2", "model": "model"}
# recipe values sampling needs besides the architecture (reported by load_weights when known)
_RECIPE_KEYS = ("noise_scale", "t_eps", "P_mean", "P_std")
_SINGLE_PROCESS_WARNING = r"torch.distributed is (disabled, )?unavailable or uninitialized"


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every single-process save/load that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint in")
        yield


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


def _dcp_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a DCP call raises on bad files (its CheckpointException is a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


# ----------------------------------------------------------------------------------------------
# official format


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
        raise CheckpointError(f"cannot read checkpoint {path}: {_short(e)}") from None
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
    """Read an official checkpoint: {"model", "model_ema1", "model_ema2", ...}, keys without "net."."""
    ckpt = safe_load(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path} has no 'model' entry (keys: {sorted(ckpt)[:8]})")
    out = dict(ckpt)
    for key in OFFICIAL_MODEL_KEYS:
        if key in ckpt:
            if not isinstance(ckpt[key], dict):
                raise CheckpointError(f"{path}: '{key}' is a {type(ckpt[key]).__name__}, expected a state dict")
            out[key] = strip_net_prefix(ckpt[key])
    return out


def official_args(meta: dict, **extra) -> argparse.Namespace:
    """The argparse Namespace an official checkpoint stores, from our model metadata."""
    ov = meta.get("overrides", {}) or {}
    return argparse.Namespace(
        model=meta.get("model"),
        img_size=meta.get("img_size"),
        class_num=meta.get("num_classes"),
        attn_dropout=float(ov.get("attn_drop", 0.0)),
        proj_dropout=float(ov.get("proj_drop", 0.0)),
        **extra,
    )


def meta_from_official_args(args: Any) -> dict:
    """Model metadata (preset, img_size, num_classes, overrides) from an official `args` Namespace."""
    if not isinstance(args, argparse.Namespace):
        return {}
    ns = vars(args)
    meta: dict[str, Any] = {}
    if ns.get("model"):
        meta["model"] = ns["model"]
    if ns.get("img_size"):
        meta["img_size"] = int(ns["img_size"])
    if ns.get("class_num"):
        meta["num_classes"] = int(ns["class_num"])
    ov = {}
    for src, dst in (("attn_dropout", "attn_drop"), ("proj_dropout", "proj_drop")):
        if ns.get(src) is not None:
            ov[dst] = float(ns[src])
    extra = ns.get("jit_fast_overrides")
    if isinstance(extra, dict):
        ov.update(extra)
    meta["overrides"] = ov
    return meta


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
    atomic_write(path, lambda f: torch.save(obj, f))


# ----------------------------------------------------------------------------------------------
# safetensors


def export_safetensors(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict, which: str = "ema1") -> None:
    """Write one weight set (JiT key names) with the model metadata in the safetensors header."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {"format": "jit_fast", "weights": which, "jit_fast_meta": json.dumps(meta, sort_keys=True)}
    atomic_write(path, lambda f: save_file(tensors, f.name, metadata=header))  # safetensors writes by file name


def load_safetensors(path: str | Path, which: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, model meta) from a safetensors file written by `export_safetensors` (or bare weights)."""
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
    try:
        meta = json.loads(header["jit_fast_meta"]) if "jit_fast_meta" in header else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: corrupt jit_fast metadata ({e})") from None
    return strip_net_prefix(sd), meta


# ----------------------------------------------------------------------------------------------
# DCP checkpoint directories


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:09d}"


def is_dcp_checkpoint(path: str | Path) -> bool:
    """A complete jit_fast DCP checkpoint: DCP `.metadata` plus our `meta.json`."""
    p = Path(path)
    return (p / ".metadata").is_file() and (p / META_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `run_dir` (or `run_dir/checkpoints`), sorted by step."""
    root = Path(run_dir)
    if (root / CHECKPOINT_SUBDIR).is_dir():
        root = root / CHECKPOINT_SUBDIR
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        if d.name.startswith(STEP_PREFIX) and d.is_dir() and is_dcp_checkpoint(d):
            try:
                out.append((int(d.name[len(STEP_PREFIX) :]), d))
            except ValueError:
                continue
    return sorted(out)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """Newest complete checkpoint of a run (temporary, half-written directories are ignored)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1][1] if ckpts else None


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """What a user-given checkpoint path points at: kind is "dcp", "official" or "safetensors"."""

    kind: str
    path: Path


def resolve_checkpoint(path: str | Path) -> ResolvedCheckpoint:
    """Find something loadable at `path` or raise CheckpointError naming what was expected.

    Accepts a DCP checkpoint dir, a run output dir (its newest complete checkpoint), an official
    `.pth` file or a folder holding `checkpoint-last.pth`, or a `.safetensors` file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_file():
        if p.suffix == ".safetensors":
            return ResolvedCheckpoint("safetensors", p)
        if p.name == META_FILE or p.name == ".metadata":
            return resolve_checkpoint(p.parent)
        return ResolvedCheckpoint("official", p)
    if is_dcp_checkpoint(p):
        return ResolvedCheckpoint("dcp", p)
    if (p / ".metadata").is_file():
        raise CheckpointError(f"{p} is an incomplete checkpoint (no {META_FILE}); it was not finished")
    latest = latest_checkpoint(p)
    if latest is not None:
        return ResolvedCheckpoint("dcp", latest)
    if (p / "checkpoint-last.pth").is_file():
        return ResolvedCheckpoint("official", p / "checkpoint-last.pth")
    raise CheckpointError(
        f"no checkpoint in {p}: expected a run directory with {CHECKPOINT_SUBDIR}/{STEP_PREFIX}*, "
        "a checkpoint directory, checkpoint-last.pth, or a .safetensors file"
    )


def read_meta(ckpt_dir: str | Path) -> dict:
    """meta.json of a DCP checkpoint."""
    p = Path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {p}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt checkpoint metadata {p}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{p} is not a {FORMAT} checkpoint")
    return meta


def _safe_reader(ckpt_dir: str | Path, verify: bool, what: str = "read"):
    """A SafeFileSystemReader whose metadata is already parsed (a refusal is a CheckpointError here, not in DCP)."""
    from jit_fast.safe_dcp import SafeFileSystemReader, UnsafeCheckpointError

    reader = SafeFileSystemReader(ckpt_dir, verify=verify)
    try:
        reader.read_metadata()
    except (UnsafeCheckpointError, integrity.ChecksumError) as e:
        raise CheckpointError(f"cannot {what} checkpoint {ckpt_dir}: {e}") from None
    return reader


def load_dcp_keys(ckpt_dir: str | Path, keys: set[str], verify: bool = True) -> dict:
    """Load top-level entries (e.g. {"ema1"}) of a DCP checkpoint as full CPU tensors, in one process.

    `verify=False` skips the checksums (never the allow-lists) of `jit_fast.safe_dcp`.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    reader = _safe_reader(ckpt_dir, verify)
    try:
        with _quiet_dcp():
            return _load_state_dict_from_keys(keys=set(keys), storage_reader=reader)
    except _dcp_errors() as e:  # DCP wraps reader failures in its own exception type
        raise CheckpointError(f"cannot read checkpoint {ckpt_dir}: {reader.error or _short(e)}") from None


def _short(e: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException is reduced to the first rank's cause."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = next(iter(failures.items()))
        cause = pair[0] if isinstance(pair, tuple) else pair
        return f"rank {rank}: {_short(cause)}"
    text = str(e).strip().splitlines()
    name = type(e).__name__
    if not text:
        return f"{name} (truncated or corrupt file?)" if isinstance(e, EOFError) else name
    return text[-1] if text[-1].startswith(name) else f"{name}: {text[-1]}"


def read_rank_state(ckpt_dir: str | Path, rank: int) -> dict | None:
    """Per-rank RNG/loader state saved with a checkpoint (None if absent); weights-only, one-line errors."""
    p = Path(ckpt_dir) / f"rank{rank:05d}.pt"
    if not p.is_file():
        return None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint file {p}: {_short(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{p} holds a {type(state).__name__}, expected a dict")
    return state


def dcp_keys(ckpt_dir: str | Path, verify: bool = True) -> set[str]:
    """Flattened keys stored in a DCP checkpoint (e.g. "optim.state.<fqn>.exp_avg")."""
    return set(_safe_reader(ckpt_dir, verify).read_metadata().state_dict_metadata)


def dcp_load(state: dict, ckpt_dir: str | Path, distributed: bool, verify: bool = True) -> None:
    """dcp.load in place (resharding DTensors as needed) through the safe reader; one-line errors."""
    import torch.distributed.checkpoint as dcp

    reader = _safe_reader(ckpt_dir, verify, "load")
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=reader, no_dist=not distributed)
    except _dcp_errors() as e:
        raise CheckpointError(f"cannot load checkpoint {ckpt_dir}: {reader.error or _checksum_cause(e) or _short(e)}") \
            from None


def _checksum_cause(e: BaseException) -> str | None:
    """The refusal another rank (the coordinator that verifies checksums) reported, if that is what failed."""
    from jit_fast.safe_dcp import UnsafeCheckpointError

    for pair in (getattr(e, "failures", None) or {}).values():
        cause = pair[0] if isinstance(pair, tuple) else pair
        if isinstance(cause, integrity.ChecksumError | UnsafeCheckpointError):
            return str(cause)
    return None


class CheckpointManager:
    """Atomic, optionally asynchronous DCP saves of a run, keeping the newest `keep_last`.

    Every rank calls `save` (a collective). Data goes to `.tmp-step_<N>`; rank 0 writes
    meta.json and `checksums.json` and renames the directory to `step_<N>` once every rank's data
    is on disk. With `async_save` the write, and rank 0's hashing of the written files, continue in
    background threads and are finalized by `poll()` at a later step boundary (or `wait()`).
    """

    def __init__(self, run_dir: str | Path, env, keep_last: int = 3, async_save: bool = False) -> None:
        self.dir = Path(run_dir) / CHECKPOINT_SUBDIR
        self.env = env
        self.keep_last = keep_last
        self.async_save = async_save
        self.pending: tuple[Any, Path, Path, dict] | None = None
        self.last_saved: Path | None = None
        self.last_error: str | None = None
        self._hasher = ThreadPoolExecutor(max_workers=1) if async_save and env.is_main else None
        if env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for d in self.dir.glob(f"{TMP_PREFIX}*"):  # leftovers of crashed saves
                shutil.rmtree(d, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.env.distributed and self.env.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.env.control_group)

    def save(self, step: int, state: dict, meta: dict, rank_state: dict) -> None:
        """Write checkpoint `step` (collective). Raises if a synchronous write fails."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        self.wait()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{final.name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        try:
            torch.save(rank_state, tmp / f"rank{self.env.rank:05d}.pt")
            writer = FileSystemWriter(str(tmp), thread_count=2)
            dist_kw: dict[str, Any] = {"no_dist": not self.env.distributed}
            with _quiet_dcp():
                if self.async_save:
                    # the background thread warns outside any catch_warnings context
                    warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
                    if self.env.distributed:
                        dist_kw["process_group"] = self.env.checkpoint_group
                    fut = dcp.async_save(state, storage_writer=writer, **dist_kw)
                    if self._hasher is not None:  # rank 0 hashes the files once every rank has written them
                        fut = self._hasher.submit(_digest_when_written, fut, tmp)
                    self.pending = (fut, tmp, final, meta)
                    return
                dcp.save(state, storage_writer=writer, **dist_kw)
        except _dcp_errors() as e:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"saving checkpoint {final} failed: {_short(e)}; "
                                  f"the newest complete checkpoint is {latest_checkpoint(self.dir)}") from e
        self.pending = (None, tmp, final, meta)
        self._barrier()  # every rank's files are on disk
        self._finalize()
        self._barrier()

    def poll(self) -> None:
        """Finalize a finished asynchronous save (cheap; call at step boundaries)."""
        if self.pending is None or self.pending[0] is None:
            return
        fut = _future(self.pending[0])
        if not fut.done():
            return
        self._complete(fut)

    def wait(self) -> None:
        """Block until an asynchronous save is written and finalized (all ranks)."""
        if self.pending is None:
            return
        if self.pending[0] is not None:
            fut = _future(self.pending[0])
            with contextlib.suppress(*_dcp_errors()):
                fut.result()  # a failure is reported by _complete
            self._complete(fut)
        self._barrier()

    def _complete(self, fut: Future) -> None:
        err = fut.exception()
        if err is not None:
            _fut, tmp, final, _meta = self.pending
            self.pending = None
            self.last_error = f"checkpoint {final.name} failed: {_short(err)}"
            if self.env.is_main:
                print(f"warning: {self.last_error}; the previous checkpoint stays the latest", file=sys.stderr)
                shutil.rmtree(tmp, ignore_errors=True)
            return
        self._finalize(fut.result() if self._hasher is not None else None)

    def _finalize(self, digests: dict[str, dict] | None = None) -> None:
        """Rank 0: meta.json, then checksums.json (`digests` of the data files if hashed already), then rename."""
        _fut, tmp, final, meta = self.pending
        self.pending = None
        self.last_saved = final
        if not self.env.is_main:
            return
        meta = {**meta, "format": FORMAT, "saved_at": time.time()}
        mpath = tmp / META_FILE
        with open(mpath, "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        digests = dict(digests or {})
        digests.update(integrity.digest_files(tmp, set(integrity.checkpoint_files(tmp)) - set(digests)))
        integrity.write_manifest(tmp, digests)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it atomically enough
            old = self.dir / f"{TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._prune()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _step, d in list_checkpoints(self.dir)[: -self.keep_last]:
            shutil.rmtree(d, ignore_errors=True)


def _future(obj):
    """The Future of a dcp.async_save result (newer releases wrap it in an AsyncSaveResponse)."""
    return getattr(obj, "upload_completion", obj)


def _digest_when_written(save_result, tmp: Path) -> dict[str, dict]:
    """Background job of rank 0: wait for the asynchronous DCP write, then hash the files it left in `tmp`."""
    _future(save_result).result()
    return integrity.digest_files(tmp, integrity.checkpoint_files(tmp))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# weights for sampling / export


def load_weights(path: str | Path, which: str = "ema1", verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights `which` ("ema1", "ema2" or "model") and model metadata from any checkpoint kind.

    `path` may be a DCP checkpoint dir, a run output dir (newest checkpoint), an official `.pth`
    (or a folder with checkpoint-last.pth) or a `.safetensors` file. Returns (state_dict with JiT
    key names, meta) where meta has "model", "img_size", "num_classes", "overrides" when known
    (build the net with `build_model_from_meta`), plus "source", "kind" and "step"/"epoch".
    `verify=False` skips the checksums of a DCP checkpoint (`--skip-checksum`).
    """
    if which not in WEIGHT_SETS:
        raise ValueError(f"unknown weight set {which!r}; choose one of {WEIGHT_SETS}")
    r = resolve_checkpoint(path)
    if r.kind == "dcp":
        meta = read_meta(r.path)
        sd = load_dcp_keys(r.path, {which}, verify)[which]
        info = dict(meta.get("model_meta", {}))
        info.update(step=meta.get("step"), epoch=meta.get("epoch"))
        info.update({k: meta.get("config", {})[k] for k in _RECIPE_KEYS if k in meta.get("config", {})})
    elif r.kind == "official":
        ckpt = load_official_checkpoint(r.path)
        key = _OFFICIAL_KEY[which]
        if key not in ckpt:
            raise CheckpointError(f"{r.path} has no '{key}' entry")
        sd = ckpt[key]
        info = meta_from_official_args(ckpt.get("args"))
        info.update(epoch=ckpt.get("epoch"))
        args = ckpt.get("args")
        if isinstance(args, argparse.Namespace):
            info.update({k: getattr(args, k) for k in _RECIPE_KEYS if getattr(args, k, None) is not None})
    else:
        sd, info = load_safetensors(r.path, which)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    info.setdefault("step", None)
    info.setdefault("epoch", None)
    info.update(source=str(r.path), kind=r.kind, weights=which)
    return sd, info


def build_model_from_meta(meta: dict, kernels: str = "torch", **overrides):
    """Rebuild the network a checkpoint was trained with from `load_weights` metadata."""
    from jit_fast.model import build_model

    missing = [k for k in ("model", "img_size", "num_classes") if meta.get(k) is None]
    if missing:
        raise CheckpointError(f"{meta.get('source', 'checkpoint')} does not record {missing}; pass them explicitly")
    ov = {**(meta.get("overrides") or {}), **overrides}
    return build_model(meta["model"], img_size=int(meta["img_size"]), num_classes=int(meta["num_classes"]),
                       kernels=kernels, **ov)


def load_model(path: str | Path, which: str = "ema1", kernels: str = "torch", device="cpu", verify: bool = True):
    """(net in eval mode with weights `which`, meta) from any checkpoint kind."""
    sd, meta = load_weights(path, which, verify)
    net = build_model_from_meta(meta, kernels=kernels)
    check_state_dict(net, sd, str(meta.get("source")))
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
        export_safetensors(dst, sd, {**_model_meta(meta), "step": meta.get("step"), "epoch": meta.get("epoch")}, which)
        return dst
    if dst.suffix not in (".pth", ".pt"):
        raise ValueError(f"unknown export format for {dst} (use .safetensors or .pth)")
    r = resolve_checkpoint(src)
    if r.kind == "dcp":
        meta = read_meta(r.path)
        full = load_dcp_keys(r.path, {"model", "ema1", "ema2", "optim"}, verify)
        mm = meta.get("model_meta", {})
        net = build_model_from_meta({**mm, "source": str(r.path)})
        named = [(n, p.shape, p.requires_grad) for n, p in net.named_parameters()]
        optim = None
        if "optim" in full and full["optim"].get("state"):
            optim = optimizer_to_official(full["optim"], named)
        # official `epoch` = last finished epoch (its resume starts at epoch + 1)
        epoch = int(meta.get("epoch", 0)) - 1
        conf = meta.get("config", {})
        args = official_args(mm, jit_fast_overrides=mm.get("overrides", {}),
                             **{k: conf[k] for k in _RECIPE_KEYS if k in conf})
        export_official_checkpoint(dst, full["model"], full["ema1"], full["ema2"], epoch, args, optim)
        return dst
    sds = {w: load_weights(src, w, verify) for w in WEIGHT_SETS}
    mm = _model_meta(sds["ema1"][1])
    epoch = sds["ema1"][1].get("epoch") or 0
    extra = {k: mm.pop(k) for k in _RECIPE_KEYS if k in mm}
    export_official_checkpoint(dst, sds["model"][0], sds["ema1"][0], sds["ema2"][0], epoch,
                               official_args(mm, jit_fast_overrides=mm.get("overrides", {}), **extra))
    return dst


def _model_meta(meta: dict) -> dict:
    return {k: meta[k] for k in ("model", "img_size", "num_classes", "overrides", *_RECIPE_KEYS) if k in meta}
