"""A full disk is one line naming the disk, its free space and the size needed; what was there is kept (issue 26,
item 5). Checkpoint saves (sync and async), atomic writes, sample.py's outputs and export.

Every test runs twice: on a real full file system (a small tmpfs mounted for the test, the CLI in its own
process), and with a fault-injected disk: the raw file writes (`io.FileIO.write`) and `os.statvfs` of one folder
are capped at a capacity, in-process, so the same code paths see ENOSPC on any machine. The first is skipped,
with the reason, only where mounting is impossible (it needs root or CAP_SYS_ADMIN).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from train_helpers import REPO, subprocess_env, tiny_argv

from jit_fast.checkpoint import latest_checkpoint, list_checkpoints
from jit_fast.export import main as export_main
from jit_fast.sampling.generate import main as sample_main
from jit_fast.shared import integrity
from jit_fast.shared.files import DiskFullError, atomic_write
from jit_fast.train.trainer import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")
CAPACITY = 16 * 2**20
BAR = re.compile(r"^\s*(train|ema1_cfg[\d.]+):")  # tqdm progress lines


class InjectedDisk:
    """A folder whose raw writes and statvfs behave as a file system of `capacity` bytes (used: its files)."""

    def __init__(self, root: Path, capacity: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.capacity = root, capacity
        real_open, real_statvfs, real_ismount = io.open, os.statvfs, os.path.ismount
        disk = self

        class CappedFileIO(io.FileIO):
            def write(self, b) -> int:
                room = disk.capacity - disk.used()
                n = memoryview(b).nbytes
                if room <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
                return super().write(memoryview(b).cast("B")[:room] if n > room else b)

        def capped_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None, closefd=True,
                        opener=None):
            if isinstance(file, int) or not set(mode) & set("wxa+") or not disk.holds(file):
                return real_open(file, mode, buffering, encoding, errors, newline, closefd, opener)
            raw = CappedFileIO(file, mode.replace("b", "").replace("t", ""), closefd, opener)
            if buffering == 0:
                return raw
            buf = (io.BufferedRandom if "+" in mode else io.BufferedWriter)(raw)
            if "b" in mode:
                return buf
            return io.TextIOWrapper(buf, encoding, errors, newline, line_buffering=buffering == 1)

        def statvfs(path):
            st = real_statvfs(path)
            if not disk.holds(path):
                return st
            free = max(disk.capacity - disk.used(), 0)
            return os.statvfs_result((1, 1, disk.capacity, free, free, st.f_files, st.f_ffree, st.f_favail,
                                      st.f_flag, st.f_namemax))

        def save_file(tensors, filename, metadata=None):  # safetensors writes from Rust: capped at its entry
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            if disk.holds(filename) and need > disk.capacity - disk.used():
                from safetensors import SafetensorError

                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save_file(tensors, filename, metadata=metadata)

        import safetensors.torch

        real_save_file = safetensors.torch.save_file
        monkeypatch.setattr(builtins, "open", capped_open)
        monkeypatch.setattr(io, "open", capped_open)
        monkeypatch.setattr(os, "statvfs", statvfs)
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == root or real_ismount(p))
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    def holds(self, path) -> bool:
        p = Path(os.path.abspath(path))
        return p == self.root or self.root in p.parents

    def used(self) -> int:
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(self.root) for f in fs
                   if not os.path.islink(os.path.join(d, f)))


class Disk:
    """A full-disk test bed: `root` on a small file system; `fill` leaves N bytes free; `run` runs a CLI on it."""

    def __init__(self, kind: str, root: Path, capsys) -> None:
        self.kind, self.root, self.capsys = kind, root, capsys
        self.ballast = root / "ballast"

    def free(self) -> int:
        import shutil

        return shutil.disk_usage(self.root).free

    def fill(self, leave: int) -> None:
        """Write a ballast file so that about `leave` bytes stay free."""
        self.clear()
        with open(self.ballast, "wb") as f:
            f.write(b"\0" * max(self.free() - leave, 0))

    def clear(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def run(self, cli: str, args: list[str]) -> tuple[int, str]:
        """(exit code, stderr) of train.py / sample.py / export: its own process on tmpfs, in-process injected."""
        if self.kind == "tmpfs":
            cmd = {"train": [str(REPO / "train.py")], "sample": [str(REPO / "sample.py")],
                   "export": ["-m", "jit_fast.export"]}[cli]
            p = subprocess.run([sys.executable, *cmd, *args], cwd=REPO, env=subprocess_env(), capture_output=True,
                               text=True, timeout=600)
            return p.returncode, p.stderr
        self.capsys.readouterr()
        code = {"train": train_main, "sample": sample_main, "export": export_main}[cli](args)
        return code, self.capsys.readouterr().err


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    root = tmp_path / "disk"
    root.mkdir()
    if request.param == "tmpfs":
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={CAPACITY}", "tmpfs", str(root)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {p.stderr.strip()}")
        try:
            yield Disk("tmpfs", root, capsys)
        finally:
            subprocess.run(["umount", "-l", str(root)], check=False)
    else:
        InjectedDisk(root, CAPACITY, monkeypatch)
        yield Disk("injected", root, capsys)


def error_line(err: str) -> str:
    """The one line a user sees (progress bars aside); no traceback."""
    assert "Traceback" not in err, err
    lines = [s for s in re.split(r"[\r\n]", err) if s.strip() and not BAR.match(s)]
    assert len(lines) == 1, lines
    return lines[0]


def size_of(text: str, what: str) -> float:
    """Bytes of the `<n> <unit> <what>` figure in a message."""
    m = re.search(rf"([\d.]+) (B|KB|MB|GB) {what}", text)
    assert m, (what, text)
    return float(m.group(1)) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m.group(2)]


def files_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def run2(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run2")
    assert train_main(tiny_argv(data, out, "--max-steps", "2")) == 0
    return out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_previous(mode: str, disk: Disk, data: Path) -> None:
    """2 steps fit; then about 1 MB stays free and the step-4 checkpoint (4.2 MB) cannot be written: one line with
    the disk, its free space and the checkpoint's size; step 2 stays intact and is resumed once space is freed."""
    run = disk.root / "run"
    extra = ["--async-save"] if mode == "async" else []
    code, err = disk.run("train", tiny_argv(data, run, "--max-steps", "2", *extra))
    assert code == 0, err
    step2 = latest_checkpoint(run)
    before = files_of(step2)
    disk.fill(leave=2**20)
    code, err = disk.run("train", tiny_argv(data, run, "--max-steps", "4", "--auto-resume", *extra))
    line = error_line(err)
    assert code == 2, err
    assert f"the disk at {disk.root} is full" in line and "step_000000004" in line, line
    assert f"the previous checkpoint {step2} is intact" in line, line
    actual = sum(len(b) for b in before.values())
    assert size_of(line, "free") < 1.2 * 2**20 and 0.8 * actual < size_of(line, "needed") < 1.25 * actual, line
    assert files_of(step2) == before and integrity.verify_files(step2)
    assert [d.name for d in (run / "checkpoints").iterdir()] == [step2.name]  # no half-written directory
    disk.clear()
    code, err = disk.run("train", tiny_argv(data, run, "--max-steps", "4", "--auto-resume", *extra))
    assert code == 0, err
    assert [s for s, _ in list_checkpoints(run)] == [2, 4]


@pytest.mark.parametrize("where", ["parts", "npz"])
def test_sample_outputs_on_a_full_disk(where: str, disk: Disk, run2: Path) -> None:
    """A chunk part or samples.npz that does not fit: one line naming the file; an earlier samples.npz is kept."""
    out = disk.root / "samples"
    args = ["--ckpt", str(run2), "--batch-size", "16", "--steps", "1", "--no-metrics", "--out", str(out)]
    code, err = disk.run("sample", [*args, "--num-images", "8"])
    assert code == 0, err
    old = (out / "samples.npz").read_bytes()
    disk.fill(leave=8 * 2**10 if where == "parts" else 80 * 2**10)
    code, err = disk.run("sample", [*args, "--num-images", "64", "--seed", "1"])
    line = error_line(err)
    assert code == 2, err
    target = out / "parts" / "chunk_0000000.npz" if where == "parts" else out / "samples.npz"
    assert f"the disk at {disk.root} is full" in line and f"needed to write {target}" in line, line
    assert size_of(line, "needed") >= (16 if where == "parts" else 2 * 64) * 16 * 16 * 3, line
    assert (out / "samples.npz").read_bytes() == old
    assert not [p for p in out.rglob(".tmp-*")]
    with np.load(out / "samples.npz") as npz:
        assert npz["images"].shape == (8, 16, 16, 3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_on_a_full_disk(suffix: str, disk: Disk, run2: Path) -> None:
    dst = disk.root / f"w{suffix}"
    disk.fill(leave=100 * 2**10)
    code, err = disk.run("export", [str(run2), str(dst)])
    line = error_line(err)
    assert code == 2, err
    assert f"the disk at {disk.root} is full" in line and f"needed to write {dst}" in line, line
    assert not dst.exists() and not [p for p in disk.root.iterdir() if p.name.startswith(".tmp-")]


def test_atomic_write_on_a_full_disk_keeps_the_old_file(disk: Disk) -> None:
    path = disk.root / "metrics.json"
    atomic_write(path, "old\n")
    disk.fill(leave=4096)
    with pytest.raises(DiskFullError, match=rf"the disk at {disk.root} is full: .* free, about 1.0 MB needed "
                                            rf"to write {path}"):
        atomic_write(path, b"x" * 10**6)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in disk.root.iterdir()) == ["ballast", "metrics.json"]
