"""A DCP `FileSystemReader` that cannot run code from a checkpoint directory and checks its checksums.

torch's reader unpickles `.metadata` with plain `pickle.load`, and its default planner loads the
non-tensor entries of a shard (optimizer hyper-parameters) with `torch.load(weights_only=False)`:
a crafted checkpoint directory runs code under both. `SafeFileSystemReader` unpickles `.metadata`
with an allow-list of the classes DCP metadata is made of, loads the non-tensor entries with
`weights_only=True`, and (unless told not to) verifies every file against `checksums.json`
(`jit_fast.shared.integrity`): `.metadata` before it is parsed, the data files once on the coordinator.
Weight tensors (model and EMAs) must be floating point (checked in `.metadata`) and finite (checked as
they are read), the rule of `jit_fast.checkpoint.sanity`.
"""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from jit_fast.checkpoint.sanity import (
    WeightsError,
    count_nonfinite,
    dcp_weight_name,
    dtype_problem,
    nonfinite_problem,
)
from jit_fast.shared import integrity
from jit_fast.shared.errors import UserError

METADATA_FILE = ".metadata"
# (module, name) of every global a DCP .metadata pickle needs (found by unpickling fp32, bf16,
# async and FSDP2 2-rank checkpoints with a recording Unpickler); dtypes are checked separately.
_ALLOWED: frozenset[tuple[str, str]] = frozenset({
    ("torch.distributed.checkpoint.metadata", "Metadata"),
    ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
    ("torch.distributed.checkpoint.metadata", "StorageMeta"),
    ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
    ("torch.distributed.checkpoint.metadata", "TensorProperties"),
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint file would need code or classes outside the allow-list to be read."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the DCP metadata classes and torch dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def load_metadata(path: str | Path) -> Metadata:
    """Unpickle a DCP `.metadata` file with the allow-list; UnsafeCheckpointError naming the file otherwise."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UnsafeCheckpointError(f"{path} not found") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError,
            MemoryError, OSError) as e:
        raise UnsafeCheckpointError(f"refused to load {path}: not a DCP metadata file ({_one_line(e)})") from None
    if not isinstance(md, Metadata):
        raise UnsafeCheckpointError(f"refused to load {path}: it holds a {type(md).__name__}, not DCP Metadata")
    return md


def check_weight_dtypes(md: Metadata, path: Path) -> None:
    """WeightsError naming the first model/EMA tensor that `.metadata` records with a non-float dtype."""
    for fqn, entry in md.state_dict_metadata.items():
        named = dcp_weight_name(fqn)
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        why = dtype_problem(named[1], dtype, named[0]) if named and isinstance(dtype, torch.dtype) else None
        if why is not None:
            raise WeightsError(f"{why} (as recorded in {path.name})")


def _one_line(e: BaseException) -> str:
    """One short line for an unpickling error (torch's weights-only errors name the global mid-text)."""
    text = [x.strip() for x in str(e).splitlines() if x.strip()]
    if not text:
        return type(e).__name__
    line = next((x for x in text if "GLOBAL" in x or "global" in x), text[0])
    return f"{type(e).__name__}: {line[:200]}"


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader with an allow-list unpickler for `.metadata`, weights-only bytes and checksums.

    `verify=False` (`--skip-checksum`) skips the checksums, never the allow-lists. The first refusal
    is kept in `error` (DCP wraps reader exceptions in its own), so callers can report it as is.
    """

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        super().__init__(str(path))
        self.dir = Path(path)
        self.verify = verify
        self.error: str | None = None
        self._metadata: Metadata | None = None
        self.nonfinite: dict[str, list] = {}  # DCP key -> [NaN/Inf count, elements read, file] of this read

    def reset(self, checkpoint_id: str | Path | None = None) -> None:
        """DCP's reset (a new load, perhaps of another directory): forget the parsed metadata and refusal."""
        super().reset(checkpoint_id)
        if checkpoint_id:
            self.dir = Path(checkpoint_id)
        self._metadata, self.error = None, None

    def _refuse(self, msg: str) -> None:
        self.error = self.error or msg

    def read_metadata(self, rank: int | None = None) -> Metadata:
        """The checkpoint's Metadata, unpickled with the allow-list (after its checksum, when recorded)."""
        if self._metadata is not None and rank is None:
            return self._metadata
        path = Path(self._get_metadata_path(rank))
        try:
            if self.verify:
                integrity.verify_files(self.dir, [path.name])
            md = load_metadata(path)
            check_weight_dtypes(md, path)
        except (integrity.ChecksumError, UnsafeCheckpointError, WeightsError) as e:
            self._refuse(str(e))
            raise
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        if rank is None:
            self._metadata = md
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """DCP's setup; the coordinator also verifies every file of the checkpoint once."""
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        if not (self.verify and is_coordinator):
            return
        try:
            manifest = integrity.read_manifest(self.dir)
            if manifest is None:
                print(f"warning: {self.dir} has no {integrity.MANIFEST_FILE} (saved before checksums were "
                      "recorded); its files are not verified", file=sys.stderr)
                return
            used = {info.relative_path for info in self.storage_data.values()}
            unlisted = sorted(used - set(manifest))
            if unlisted:
                raise integrity.ChecksumError(f"{self.dir / unlisted[0]} is not listed in {integrity.MANIFEST_FILE}; "
                                              "pass --skip-checksum to load anyway")
            integrity.verify_files(self.dir)
        except integrity.ChecksumError as e:
            self._refuse(str(e))
            raise

    def read_data(self, plan, planner):
        """DCP's read, with non-tensor entries loaded weights-only and weights refused when not finite."""
        self.nonfinite = {}
        fut = super().read_data(plan, _WeightsOnlyBytes(planner, self))
        bad = next((k for k, v in self.nonfinite.items() if v[0]), None)
        if bad is not None:
            (count, numel, file), (entry, name) = self.nonfinite[bad], dcp_weight_name(bad)
            msg = f"{nonfinite_problem(name, count, numel, entry)}, stored in {file}"
            self._refuse(msg)
            raise WeightsError(msg)
        return fut

    def count_weight(self, read_item, tensor: torch.Tensor) -> None:
        """Add the NaN/Inf count of a model/EMA chunk just read (a tensor may come in several chunks)."""
        if dcp_weight_name(read_item.dest_index.fqn) is None or not tensor.is_floating_point():
            return
        seen = self.nonfinite.setdefault(read_item.dest_index.fqn,
                                         [0, 0, self.storage_data[read_item.storage_index].relative_path])
        seen[0] += count_nonfinite(tensor)
        seen[1] += tensor.numel()


class _WeightsOnlyBytes:
    """Planner proxy: `load_bytes` re-serializes a weights-only load, so the planner never unpickles file bytes."""

    def __init__(self, planner, reader: SafeFileSystemReader) -> None:
        self._planner, self._reader = planner, reader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def commit_tensor(self, read_item, tensor: torch.Tensor) -> None:
        self._reader.count_weight(read_item, tensor)
        self._planner.commit_tensor(read_item, tensor)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            info = self._reader.storage_data[read_item.storage_index]
            msg = f"refused to load {self._reader.dir / info.relative_path} (entry {read_item.storage_index.fqn}): " \
                  f"{_one_line(e)}"
            self._reader._refuse(msg)
            raise UnsafeCheckpointError(msg) from None
        clean = io.BytesIO()
        torch.save(obj, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)

