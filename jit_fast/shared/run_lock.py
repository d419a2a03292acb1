"""One writer per run directory: an advisory lock that the operating system releases when its holder dies.

`hold_run_dir(directory, what)` takes `directory/.jit_fast.lock` with `flock` and records who holds it (pid, host,
since when, the command); a second writer stops at once with one line naming the holder. A clean release removes
the lock file while still holding it (and a directory the run made and left empty), and a new holder checks that
the file it locked is still the one at the path, so two processes never hold two files. A lock file whose lock is
free was therefore left by a process that died (`kill -9`, a lost node), and is taken over with a message.
Exclusion between hosts holds where the filesystem implements `flock` across clients (local disks; NFSv4 and NFSv3
with lockd, which emulate it with POSIX locks; Lustre mounted with `-o flock`; GPFS); on one that ignores locks,
processes of one host are still kept apart by the recorded pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from jit_fast.shared import distributed as D
from jit_fast.shared.errors import UserError
from jit_fast.shared.files import TMP_PREFIX

LOCK_NAME = ".jit_fast.lock"


class RunDirBusy(UserError):
    """Another live process writes this run directory."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory: what the lock file records."""

    pid: int
    host: str
    since: str
    what: str
    command: str

    def describe(self) -> str:
        """`pid 123 on host h since 2026-12-07 08:00:00 UTC (train.py ...)`."""
        return f"pid {self.pid} on host {self.host} since {self.since} ({self.what}: {self.command})"


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> Holder | None:
    """The holder recorded in an open lock file, None if it is empty or unreadable (never trusted beyond a name)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        rec = json.loads(raw.decode("utf-8"))
        return Holder(int(rec["pid"]), str(rec["host"]), str(rec["since"]), str(rec["what"]), str(rec["command"]))
    except (ValueError, KeyError, TypeError):
        return None


def _check_directory(directory: Path) -> None:
    """Make the run directory, with one line for the ways that fails (a dangling link, a file in the way)."""
    if directory.is_symlink() and not directory.exists():
        raise UserError(f"output directory {directory} is a symbolic link to {os.readlink(directory)}, which does "
                        "not exist: create its target or choose another directory")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"output directory {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {directory}: {e.strerror or e}") from None


class RunDirLock:
    """A held run-directory lock; `release()` (or process exit, however it happens) frees it."""

    def __init__(self, path: Path, fd: int, holder: Holder, took_over: Holder | None, made_dir: bool) -> None:
        self.path, self._fd, self.holder, self.took_over, self.made_dir = path, fd, holder, took_over, made_dir

    def release(self) -> None:
        """A clean end: remove the lock file while still holding it (a later holder checks that the file it locked
        is still the one at the path), unlock, and remove the directory if this run made it and left it empty."""
        if self._fd < 0:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1
        if self.made_dir:
            with contextlib.suppress(OSError):  # not empty (the run wrote something): kept
                self.path.parent.rmdir()

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_file(directory: Path, path: Path) -> int:
    """An open, flock-ed descriptor of the lock file at `path` (retrying if it was replaced while we locked it);
    raises RunDirBusy naming the holder when another process has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = holder.describe() if holder else "another process"
            raise RunDirBusy(f"{directory} is being written by {who}: wait for it to finish, stop it, or choose "
                             "another --output-dir") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it on release between our open and our lock: lock the new one


def hold_run_dir(directory: str | Path, what: str) -> RunDirLock:
    """Take the lock of `directory` for this process (`what`: "train.py", "sample.py") or raise RunDirBusy naming
    its holder and how to proceed. Call it on one rank only, before anything in the directory is written."""
    directory = Path(directory)
    made_dir = not directory.exists() and not directory.is_symlink()
    _check_directory(directory)
    path = directory / LOCK_NAME
    fd = _lock_file(directory, path)
    previous = _read_holder(fd)
    me = Holder(os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), what,
                " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500])
    if previous and previous.host == me.host and previous.pid != me.pid and _alive(previous.pid):
        os.close(fd)  # the lock was free but its recorded holder lives: this filesystem ignores flock
        raise RunDirBusy(f"{directory} is being written by {previous.describe()} (this filesystem does not enforce "
                         f"locks; if that process is not a {previous.what} run, remove {path})")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(asdict(me)).encode())
    os.fsync(fd)
    return RunDirLock(path, fd, me, previous, made_dir)


_TEMP = re.compile(re.escape(TMP_PREFIX) + r".+\.(\d+)\.[0-9a-f]{8}$")


def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temporary files `atomic_write` left in `directory` and its subdirectories (one level) when
    their writer was killed: with the directory's lock held, no live writer of ours can own one (a temp whose pid
    still runs here is kept anyway). Returns what was removed."""
    removed = []
    for parent in [directory, *(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())]:
        for p in parent.iterdir():
            m = _TEMP.match(p.name)
            if m and p.is_file() and not p.is_symlink() and not _alive(int(m.group(1))):
                p.unlink()
                removed.append(p)
    return removed


def inside_data_message(directory: str | Path, data_path: str | Path | None) -> str | None:
    """A warning when the run directory lies inside the training data (the next scan of the data would index the
    run's samples and grids as training images), else None."""
    if not data_path:
        return None
    out, data = Path(directory).resolve(), Path(data_path).resolve()
    if out == data or data in out.parents:
        return (f"output directory {directory} is inside the data directory {data_path}: a later scan of the data "
                "would take its images for training images; choose an --output-dir outside it")
    return None


def takeover_message(lock: RunDirLock) -> str | None:
    """The line to print when the lock was left by a process that ended without releasing it, else None."""
    if lock.took_over is None:
        return None
    return (f"{lock.path.parent}: took over the lock left by {lock.took_over.describe()}, which ended without "
            "releasing it")


def hold_for_run(directory: str | Path, what: str, env: D.DistEnv, log: Callable[[str], None],
                 data_path: str | Path | None = None) -> RunDirLock | None:
    """The one place a run takes its directory: rank 0 holds the lock (every rank raises the same one-line error
    if it cannot), says when it took over a dead holder's lock, warns when the directory lies inside the data and
    removes the temporaries a killed writer left. Returns rank 0's lock (None elsewhere) for the caller to release."""
    lock, err = None, None
    if env.is_main:
        try:
            lock = hold_run_dir(directory, what)
        except UserError as e:
            err = (isinstance(e, RunDirBusy), str(e))
    err = D.broadcast_object(env, err)
    if err is not None:
        raise (RunDirBusy if err[0] else UserError)(err[1])
    if lock is not None:
        for msg in (takeover_message(lock), inside_data_message(directory, data_path)):
            if msg:
                log(f"warning: {msg}")
        removed = remove_stale_temps(Path(directory))
        if removed:
            log(f"removed {len(removed)} temporary file(s) a killed writer left in {directory}: "
                f"{', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''}")
    return lock
