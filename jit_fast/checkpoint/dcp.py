"""Sharded DCP training checkpoints: finding, listing and resolving them, safe reading, `CheckpointManager`.

Training checkpoints are torch.distributed.checkpoint (DCP) directories
``<run>/checkpoints/step_<N>/`` holding the sharded model, optimizer and both EMAs (resharding
on load: any world size can resume any other), ``meta.json`` (step, epoch, data position,
model metadata, recipe), ``rank<R>.pt`` (per-rank loader position; no RNG state) and ``checksums.json``
(sha256 of every file, `jit_fast.shared.integrity`). A checkpoint is written into ``.tmp-step_<N>`` and
renamed into place only when complete, so the newest ``step_*`` directory is always whole; a save that
fails for want of space is one DiskFullError line (disk, free space, the checkpoint's size).
Every DCP read goes through `jit_fast.checkpoint.safe_dcp.SafeFileSystemReader` (no code from the files,
checksums verified unless `verify=False`).
"""

from __future__ import annotations

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
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from jit_fast.checkpoint.meta import ARCH_KEYS, RECIPE_KEYS, CheckpointError, ModelMeta, short_error
from jit_fast.shared import distributed as D
from jit_fast.shared import integrity
from jit_fast.shared.files import TMP_PREFIX, DiskFullError, disk_full_error

CHECKPOINT_SUBDIR = "checkpoints"
STEP_PREFIX = "step_"
META_FILE = "meta.json"
FORMAT = "jit_fast-dcp-v1"
TENSOR_OVERHEAD = 2048  # bytes a checkpoint file spends per tensor beyond its data (serialization, .metadata)
_SINGLE_PROCESS_WARNING = r"torch.distributed is (disabled, )?unavailable or uninitialized"


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns on every single-process save/load that it assumes a single process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint in")
        yield


def _dcp_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a DCP call raises on bad files (its CheckpointException is a BaseException)."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


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


def dcp_model_meta(run: dict, path: str | Path) -> ModelMeta:
    """The ModelMeta of a DCP checkpoint's meta.json: its `model_meta`, the config's recipe, step and epoch."""
    meta = ModelMeta.from_dict(run.get("model_meta", {}), Path(path) / META_FILE, required=ARCH_KEYS)
    conf = run.get("config", {})
    return meta.replace(step=run.get("step"), epoch=run.get("epoch"),
                        **{k: float(conf[k]) for k in RECIPE_KEYS if k in conf})


def _safe_reader(ckpt_dir: str | Path, verify: bool, what: str = "read"):
    """A SafeFileSystemReader whose metadata is already parsed (a refusal is a CheckpointError here, not in DCP)."""
    from jit_fast.checkpoint.safe_dcp import SafeFileSystemReader, UnsafeCheckpointError
    from jit_fast.checkpoint.sanity import WeightsError

    reader = SafeFileSystemReader(ckpt_dir, verify=verify)
    try:
        reader.read_metadata()
    except (UnsafeCheckpointError, integrity.ChecksumError, WeightsError) as e:
        raise CheckpointError(f"cannot {what} checkpoint {ckpt_dir}: {e}") from None
    return reader


def load_dcp_keys(ckpt_dir: str | Path, keys: set[str], verify: bool = True) -> dict:
    """Load top-level entries (e.g. {"ema1"}) of a DCP checkpoint as full CPU tensors, in one process.

    `verify=False` skips the checksums (never the allow-lists) of `jit_fast.checkpoint.safe_dcp`.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    reader = _safe_reader(ckpt_dir, verify)
    try:
        with _quiet_dcp():
            return _load_state_dict_from_keys(keys=set(keys), storage_reader=reader)
    except _dcp_errors() as e:  # DCP wraps reader failures in its own exception type
        raise CheckpointError(f"cannot read checkpoint {ckpt_dir}: {reader.error or short_error(e)}") from None


def read_rank_state(ckpt_dir: str | Path, rank: int) -> dict | None:
    """The per-rank file of a checkpoint (None if absent; older ones also hold RNG states); weights-only, one-line
    errors."""
    p = Path(ckpt_dir) / f"rank{rank:05d}.pt"
    if not p.is_file():
        return None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint file {p}: {short_error(e)}") from None
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
        why = reader.error or _checksum_cause(e) or short_error(e)
        raise CheckpointError(f"cannot load checkpoint {ckpt_dir}: {why}") from None


def _checksum_cause(e: BaseException) -> str | None:
    """The refusal another rank reported (checksums, allow-lists, weights), if that is what failed."""
    from jit_fast.checkpoint.safe_dcp import UnsafeCheckpointError
    from jit_fast.checkpoint.sanity import WeightsError

    for cause in _causes(e)[1:]:
        if isinstance(cause, integrity.ChecksumError | UnsafeCheckpointError | WeightsError):
            return str(cause)
    return None


class CheckpointManager:
    """Atomic, optionally asynchronous DCP saves of a run, keeping the newest `keep_last`.

    Every rank calls `save` (a collective). Data goes to `.tmp-step_<N>`; rank 0 writes
    meta.json and `checksums.json` and renames the directory to `step_<N>` once every rank's data
    is on disk. With `async_save` the write, and rank 0's hashing of the written files, continue in
    background threads and are finalized by `poll()` at a later step boundary (or `wait()`).
    A save that fails for want of space raises DiskFullError (at the next `wait()` when asynchronous, on
    every rank); the previous checkpoint is never touched by a failed save.
    """

    def __init__(self, run_dir: str | Path, env, keep_last: int = 3, async_save: bool = False) -> None:
        self.dir = Path(run_dir) / CHECKPOINT_SUBDIR
        self.env = env
        self.keep_last = keep_last
        self.async_save = async_save
        self.pending: tuple[Any, Path, Path, dict, int] | None = None  # (future, tmp, final, meta, bytes needed)
        self.last_saved: Path | None = None
        self.last_error: str | None = None
        self.failure: DiskFullError | None = None  # an asynchronous save that found the disk full, for wait()
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

        self.wait()
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f"{TMP_PREFIX}{final.name}"
        needed = state_nbytes(state)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        try:
            with open(tmp / f"rank{self.env.rank:05d}.pt", "wb") as f:  # a Python file keeps ENOSPC's errno
                torch.save(rank_state, f)
            writer = _CheckedWriter(str(tmp), thread_count=2)
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
                    self.pending = (fut, tmp, final, meta, needed)
                    return
                dcp.save(state, storage_writer=writer, **dist_kw)
        except _dcp_errors() as e:
            if self.env.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise self._failed(e, final, needed) from None
        self.pending = (None, tmp, final, meta, needed)
        self._barrier()  # every rank's files are on disk
        failed = None
        try:
            self._finalize()
        except OSError as e:  # rank 0's meta.json, checksums.json or rename
            shutil.rmtree(tmp, ignore_errors=True)
            failed = self._failed(e, final, needed)
        if D.any_rank(self.env, failed is not None):  # every rank stops with rank 0
            raise failed or CheckpointError(f"saving checkpoint {final} failed on rank 0")

    def _failed(self, e: BaseException, final: Path, needed: int) -> CheckpointError | DiskFullError:
        """The one-line error of a failed save of `final` (after its temporary directory is gone)."""
        prev = latest_checkpoint(self.dir)
        for cause in _causes(e):
            full = disk_full_error(cause, self.dir, needed, f"checkpoint {final}")
            if full is not None:
                kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
                return DiskFullError(f"{full}; {kept}")
        return CheckpointError(f"saving checkpoint {final} failed: {short_error(e)}; "
                               f"the newest complete checkpoint is {prev}")

    def poll(self) -> None:
        """Finalize a finished asynchronous save (cheap; call at step boundaries)."""
        if self.pending is None or self.pending[0] is None:
            return
        fut = _future(self.pending[0])
        if not fut.done():
            return
        self._complete(fut)

    def wait(self) -> None:
        """Block until an asynchronous save is written and finalized (collective: every rank calls it).

        Raises DiskFullError on every rank if an asynchronous save on any rank found its disk full.
        """
        if self.pending is not None and self.pending[0] is not None:
            fut = _future(self.pending[0])
            with contextlib.suppress(*_dcp_errors()):
                fut.result()  # a failure is reported by _complete
            self._complete(fut)
        if D.any_rank(self.env, self.failure is not None):
            failure, self.failure = self.failure, None
            raise failure or DiskFullError("a checkpoint could not be saved on another rank: its disk is full")

    def _complete(self, fut: Future) -> None:
        _fut, tmp, final, _meta, needed = self.pending
        err = fut.exception()
        if err is None:
            try:
                self._finalize(fut.result() if self._hasher is not None else None)
                return
            except OSError as e:
                err = e
        self.pending = None
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        failed = self._failed(err, final, needed)
        if isinstance(failed, DiskFullError):
            self.failure = failed
            return
        self.last_error = f"checkpoint {final.name} failed: {short_error(err)}"
        if self.env.is_main:
            print(f"warning: {self.last_error}; the previous checkpoint stays the latest", file=sys.stderr)

    def _finalize(self, digests: dict[str, dict] | None = None) -> None:
        """Rank 0: meta.json, then checksums.json (`digests` of the data files if hashed already), then rename."""
        _fut, tmp, final, meta, _needed = self.pending
        if not self.env.is_main:
            self.pending, self.last_saved = None, final
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
        self.pending, self.last_saved = None, final
        _fsync_dir(self.dir)
        self._prune()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for _step, d in list_checkpoints(self.dir)[: -self.keep_last]:
            shutil.rmtree(d, ignore_errors=True)


class _RecordingFileSystem(FileSystem):
    """DCP's file system; while `collect` is set, an error writing a file is recorded and not raised."""

    def __init__(self) -> None:
        super().__init__()
        self.collect = False
        self.errors: list[BaseException] = []

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except Exception as e:
            if not self.collect:
                raise
            self.errors.append(e)


class _CheckedWriter(FileSystemWriter):
    """FileSystemWriter whose data-file errors reach the caller.

    DCP's extra writer threads print an error (a traceback on the console) and drop the file they were
    writing; the save then "succeeds" with those entries missing from `.metadata`. Here every writer thread's
    error is recorded and the first one is raised by `write_data`, before any `.metadata` is written.
    """

    def __init__(self, path: str, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.fs = _RecordingFileSystem()

    def write_data(self, plan, planner):
        """DCP's write of this rank's items; raises the first file error of any writer thread."""
        self.fs.errors.clear()
        self.fs.collect = True
        try:
            fut = super().write_data(plan, planner)
        finally:
            self.fs.collect = False
        if self.fs.errors:
            raise self.fs.errors[0]
        written = len(fut.wait())
        if written != len(plan.items):
            raise CheckpointError(f"DCP wrote {written} of {len(plan.items)} items")
        return fut


def state_nbytes(tree: Any) -> int:
    """Bytes a checkpoint of `tree` (DCP or torch.save) takes on disk over all ranks: global tensor sizes (a
    DTensor counts its full shape once) plus `TENSOR_OVERHEAD` each."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size() + TENSOR_OVERHEAD
    if isinstance(tree, dict):
        return sum(state_nbytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(state_nbytes(v) for v in tree)
    return 0


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and, for DCP's CheckpointException, each rank's exception."""
    failures = getattr(e, "failures", None) or {}
    return [e, *(pair[0] if isinstance(pair, tuple) else pair for pair in failures.values())]


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
