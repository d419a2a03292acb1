"""Files the runs write: atomic writes (a reader sees the old file or the complete new one, never a torn one),
and a full disk told as such."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from jit_fast.shared.errors import UserError

TMP_PREFIX = ".tmp-"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = tuple(os.strerror(e) for e in _FULL_ERRNOS)  # how C++ and Rust writers word it without an errno


class DiskFullError(UserError, OSError):
    """A write failed because its file system has no space left (or the quota is used up)."""


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], object], fsync: bool = True,
                 size: int | None = None) -> Path:
    """Write bytes, UTF-8 text or `data(file)`'s output to a temp file beside `path`, fsync, then rename over it.

    The temp name is hidden and ends in no image or array suffix, so a crash leaves nothing a reader picks up;
    on any error the temp file is removed and the old `path` is untouched. A full disk raises DiskFullError
    naming the disk, its free space and `size` (the bytes `data` writes; known for bytes and text).
    """
    path = Path(path)
    if not callable(data):
        data = data.encode() if isinstance(data, str) else data
        size = len(data)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(e, path.parent, size, str(path))
        if full is not None:
            raise full from None
        raise
    return path


def format_bytes(n: int | float) -> str:
    """A byte count for people: 512 B, 4.2 MB, 2.6 GB (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding `path` (or where it would be created)."""
    p = _existing(Path(path)).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: str | Path) -> int:
    """Bytes this user may still write on the file system holding `path`."""
    return shutil.disk_usage(_existing(Path(path))).free


def _says_disk_full(e: BaseException) -> bool:
    """True if `e` or an exception it was raised from or during is an ENOSPC/EDQUOT error (by errno or wording)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) in _FULL_ERRNOS or any(t in str(e) for t in _FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def disk_full_error(e: BaseException, where: str | Path, needed: int | None, what: str) -> DiskFullError | None:
    """The one-line DiskFullError for a failed write of `what` into `where`, or None if the disk is not the cause.

    The disk is the cause when the error says so (ENOSPC, EDQUOT: torch's zip writer loses the errno, hence the
    wording and the space check) or when less than `needed` bytes are free once the partial file is gone.
    """
    if isinstance(e, DiskFullError):
        return e
    free = free_bytes(where)
    if not (_says_disk_full(e) or (needed is not None and free < needed)):
        return None
    need = f"about {format_bytes(needed)} needed" if needed is not None else "more needed"
    return DiskFullError(f"the disk at {mount_point(where)} is full: {format_bytes(free)} free, {need} to write {what}")
