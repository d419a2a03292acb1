"""Per-file sha256 checksums of a checkpoint directory (`checksums.json`): recorded at save, verified at load.

A flipped byte in a shard loads without error in DCP (it holds raw tensor bytes); the manifest turns
such corruption into a refusal that names the file. sha256 is the fastest of sha256 / blake2b / sha1
on CPUs with SHA extensions (x86 SHA-NI, ARMv8 SHA2) and is what `sample.py` already reports.
Verified digests are remembered per process by (path, size, mtime), so loading several weight sets
of one checkpoint hashes its files once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jit_fast.shared.errors import UserError
from jit_fast.shared.files import atomic_write

MANIFEST_FILE = "checksums.json"
ALGORITHM = "sha256"
MANIFEST_FORMAT = "jit_fast-checksums-v1"
HASH_THREADS = 2  # hashlib releases the GIL: files hash in parallel, off the training thread

_verified: dict[Path, tuple[int, int, str]] = {}


class ChecksumError(UserError, RuntimeError):
    """A checkpoint file is missing, truncated or differs from the checksum recorded when it was saved."""


def file_digest(path: str | Path) -> str:
    """Hex sha256 of one file, read in large blocks (no whole-file buffer)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def known_digest(path: str | Path) -> str:
    """sha256 of a file, reusing the digest `verify_files` computed this process when size and mtime still match."""
    path = Path(path)
    st = path.stat()
    seen = _verified.get(path.resolve())
    if seen is not None and seen[:2] == (st.st_size, st.st_mtime_ns):
        return seen[2]
    return file_digest(path)


def digest_files(directory: str | Path, names: Iterable[str], threads: int = HASH_THREADS) -> dict[str, dict]:
    """{name: {"sha256": hex, "size": bytes}} for files of `directory`, hashed by `threads` threads."""
    d = Path(directory)
    names = sorted(names)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = list(pool.map(lambda n: file_digest(d / n), names))
    return {n: {ALGORITHM: h, "size": (d / n).stat().st_size} for n, h in zip(names, digests, strict=True)}


def checkpoint_files(directory: str | Path) -> list[str]:
    """Names of the regular files of a (flat) checkpoint directory, the manifest excluded."""
    return sorted(p.name for p in Path(directory).iterdir() if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(directory: str | Path, entries: dict[str, dict]) -> Path:
    """Write `checksums.json` atomically (temp file, fsync, rename) and return its path."""
    manifest = {"format": MANIFEST_FORMAT, "algorithm": ALGORITHM, "files": entries}
    return atomic_write(Path(directory) / MANIFEST_FILE, json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(directory: str | Path) -> dict[str, dict] | None:
    """The recorded {name: {"sha256", "size"}}, or None for a checkpoint saved without a manifest."""
    path = Path(directory) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ChecksumError(f"{path} is unreadable ({type(e).__name__}); pass --skip-checksum to load anyway") from None
    files = data.get("files") if isinstance(data, dict) else None
    if data.get("algorithm") != ALGORITHM or not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get(ALGORITHM), str) and isinstance(v.get("size"), int)
        for v in files.values()
    ):
        raise ChecksumError(f"{path} is not a {MANIFEST_FORMAT} manifest; pass --skip-checksum to load anyway")
    return files


def verify_files(directory: str | Path, names: Iterable[str] | None = None) -> bool:
    """Check `names` (default: every file in the manifest) against the manifest.

    Returns False when the directory has no manifest (saved before checksums were recorded);
    raises ChecksumError naming the first missing, resized or altered file.
    """
    d = Path(directory)
    manifest = read_manifest(d)
    if manifest is None:
        return False
    wanted = sorted(manifest) if names is None else sorted(set(names))
    todo = []
    for n in wanted:
        rec = manifest.get(n)
        path = d / n
        if rec is None:
            raise ChecksumError(f"{path} is not listed in {d / MANIFEST_FILE}; pass --skip-checksum to load anyway")
        try:
            st = path.stat()
        except FileNotFoundError:
            raise ChecksumError(f"{path} is missing (listed in {MANIFEST_FILE})") from None
        if st.st_size != rec["size"]:
            raise ChecksumError(f"{path} is corrupt: {st.st_size} bytes, {rec['size']} when saved "
                                "(truncated or overwritten); pass --skip-checksum to load anyway")
        if _verified.get(path.resolve()) != (st.st_size, st.st_mtime_ns, rec[ALGORITHM]):
            todo.append((n, st))
    got = digest_files(d, [n for n, _ in todo])
    for n, st in todo:
        if got[n][ALGORITHM] != manifest[n][ALGORITHM]:
            raise ChecksumError(f"{d / n} is corrupt: its {ALGORITHM} differs from the one recorded at save "
                                f"({MANIFEST_FILE}); pass --skip-checksum to load anyway")
        _verified[(d / n).resolve()] = (st.st_size, st.st_mtime_ns, manifest[n][ALGORITHM])
    return True
