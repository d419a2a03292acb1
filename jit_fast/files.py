"""Atomic file writes: a reader sees the old file or the complete new one, never a torn one."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], object], fsync: bool = True) -> Path:
    """Write bytes, UTF-8 text or `data(file)`'s output to a temp file beside `path`, fsync, then rename over it.

    The temp name is hidden and ends in no image or array suffix, so a crash leaves nothing a reader picks up;
    on any error the temp file is removed and the old `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
