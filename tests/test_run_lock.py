"""One writer per run directory (`jit_fast.shared.run_lock`): a second writer stops with one line naming the
holder, a lock left by a killed process is taken over with a message, a clean end leaves nothing to take over."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jit_fast.shared import run_lock
from jit_fast.shared.errors import UserError
from jit_fast.shared.run_lock import LOCK_NAME, RunDirBusy, hold_run_dir, takeover_message

ROOT = Path(__file__).resolve().parents[1]


def holder_process(directory: Path) -> subprocess.Popen:
    """Another process that takes the lock, says so on stdout, then waits to be killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from jit_fast.shared.run_lock import hold_run_dir
        lock = hold_run_dir({str(directory)!r}, "train.py")
        print("held", flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_stops_with_one_line_naming_the_holder(tmp_path):
    proc = holder_process(tmp_path / "run")
    try:
        start = time.monotonic()
        with pytest.raises(RunDirBusy) as err:
            hold_run_dir(tmp_path / "run", "sample.py")
        msg = str(err.value)
        assert time.monotonic() - start < 5 and "\n" not in msg
        assert f"pid {proc.pid} on host {socket.gethostname()} since " in msg and "train.py" in msg
        assert "choose another --output-dir" in msg
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_process_is_taken_over_with_a_message(tmp_path):
    proc = holder_process(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with hold_run_dir(tmp_path / "run", "train.py") as lock:
        msg = takeover_message(lock)
        assert msg is not None and f"pid {proc.pid}" in msg and "ended without releasing it" in msg
        assert lock.holder.pid == os.getpid()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released cleanly: removed while still held


def test_clean_release_leaves_nothing_to_take_over(tmp_path):
    hold_run_dir(tmp_path, "train.py").release()
    with hold_run_dir(tmp_path, "train.py") as again:
        assert takeover_message(again) is None


def test_a_filesystem_that_ignores_locks_still_keeps_one_hosts_processes_apart(tmp_path, monkeypatch):
    """With flock a no-op, the recorded holder (alive, same host) still refuses the second writer."""
    proc = holder_process(tmp_path)
    try:
        monkeypatch.setattr(run_lock.fcntl, "flock", lambda fd, op: None)
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid} .*does not enforce locks"):
            hold_run_dir(tmp_path, "train.py")
    finally:
        proc.kill()
        proc.wait()


def test_output_dir_that_cannot_be_a_directory_is_one_line(tmp_path):
    dangling = tmp_path / "out"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(UserError, match=r"symbolic link to .*missing, which does not exist"):
        hold_run_dir(dangling, "train.py")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        hold_run_dir(tmp_path / "file", "train.py")


def test_temps_of_a_killed_writer_are_removed_and_live_ones_kept(tmp_path):
    """`kill -9` during an atomic write leaves `.tmp-samples.npz.<pid>.<hex>`; the next owner removes it (and one in
    parts/), never a file of another name or a temp whose writer still runs."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / "parts").mkdir()
    dead = [tmp_path / f".tmp-samples.npz.{proc.pid}.0123abcd",
            tmp_path / "parts" / f".tmp-chunk_0000001.npz.{proc.pid}.deadbeef"]
    live = tmp_path / f".tmp-grid.png.{os.getpid()}.0123abcd"
    keep = [live, tmp_path / "samples.npz", tmp_path / ".tmp-notes.txt"]
    for p in dead + keep:
        p.write_bytes(b"x" * 10)
    assert sorted(run_lock.remove_stale_temps(tmp_path)) == sorted(dead)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in dead)


def test_output_inside_the_data_directory_is_warned_about(tmp_path):
    data = tmp_path / "imagenet"
    (data / "train").mkdir(parents=True)
    assert "is inside the data directory" in run_lock.inside_data_message(data / "train" / "run", data)
    assert run_lock.inside_data_message(data, data) is not None
    assert run_lock.inside_data_message(tmp_path / "runs", data) is None
    assert run_lock.inside_data_message(tmp_path / "imagenet-runs", data) is None  # a sibling with a common prefix
    assert run_lock.inside_data_message(tmp_path / "runs", None) is None
