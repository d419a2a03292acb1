"""Run directories through the real CLIs (issue 26): one writer per directory, a diverging run exits non-zero
with its reason in the metrics, and sample.py's demo checks its image count when the flags are read."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sampling_utils import tiny_checkpoint
from train_helpers import REPO, describe, make_image_folder, run_cli, run_worker, subprocess_env, tiny_argv

from jit_fast.checkpoint import list_checkpoints
from jit_fast.sampling.generate import main as sample_main
from jit_fast.shared.run_lock import LOCK_NAME


def _wait_for_holder(lock: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until the lock file names a holder (the first run is past its start), failing if the process ended."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if lock.is_file() and lock.stat().st_size:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    raise AssertionError(f"{lock} was never written")


def test_a_second_writer_of_a_run_directory_stops_and_a_dead_holder_is_taken_over(data: Path, tmp_path: Path):
    """Two real train.py processes on one --output-dir: the second (and a sample.py into it) stops at once with one
    line naming the first; after the first is killed (kill -9) the next run takes its lock over and says so."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *tiny_argv(data, out, "--max-steps", "100000")],
                             cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        _wait_for_holder(out / LOCK_NAME, first)
        second = run_cli(tiny_argv(data, out, "--max-steps", "2", "--auto-resume"), timeout=120)
        err = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(err) == 1, describe(second)
        assert f"is being written by pid {first.pid} on host " in err[0] and "train.py" in err[0], err
        sample = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", str(out), "--out", str(out),
                                 "--num-images", "2", "--no-metrics"], cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=120)
        assert sample.returncode == 2 and f"pid {first.pid}" in sample.stderr, describe(sample)
    finally:
        first.kill()
        first.communicate()
    third = run_cli(tiny_argv(data, out, "--max-steps", "2", "--overwrite"), timeout=300)
    assert third.returncode == 0, describe(third)
    assert f"took over the lock left by pid {first.pid}" in third.stdout, describe(third)
    assert not (out / LOCK_NAME).exists()  # released at the end


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(directory).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_a_diverging_run_exits_non_zero_and_keeps_its_last_checkpoint(data: Path, tmp_path: Path):
    """A healthy run continued with --lr 1 (the largest lr the range allows) blows the loss up: the run stops with
    one line and exit 3, writes the reason to metrics.jsonl, and its last (healthy) checkpoint is untouched. The
    resumed run's watch starts from the losses metrics.jsonl already holds."""
    out = tmp_path / "run"
    good = run_cli(tiny_argv(data, out, "--max-steps", "16", "--save-freq-steps", "16"))
    assert good.returncode == 0, describe(good)
    saved = list_checkpoints(out)[-1][1]
    before = _digest(saved)
    bad = run_cli(tiny_argv(data, out, "--auto-resume", "--lr", "1", "--max-steps", "400", "--save-freq-steps", "4"))
    err = [line for line in bad.stderr.strip().splitlines() if line.strip() and not line.startswith("train:")]
    assert bad.returncode == 3 and err[-1].startswith("error: ") and "Traceback" not in bad.stderr, describe(bad)
    assert "stayed above 10 x its lowest running average" in err[-1] and saved.name in err[-1], err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diverged = [r for r in rows if r.get("kind") == "diverged"]
    assert len(diverged) == 1 and diverged[0]["reason"] in err[-1], rows[-3:]
    assert max(r["step"] for r in rows) < 16 + 4 * 2  # stopped within a few log points, before a second save
    assert _digest(saved) == before


def test_a_run_stuck_after_sigterm_ends_when_its_grace_period_does(data: Path, tmp_path: Path):
    """SIGTERM, then a step that never returns: the watchdog ends the process --preempt-grace seconds later (exit
    143, one line naming the last checkpoint), which stays intact. Without the watchdog the worker would sleep for
    ten minutes and the subprocess timeout would fail this test."""
    out = tmp_path / "run"
    p = run_worker(["sigterm-hang", "3", *tiny_argv(data, out, "--max-steps", "50", "--save-freq-steps", "2",
                                                    "--preempt-grace", "1")], timeout=120)
    err = [line for line in p.stderr.strip().splitlines() if line.strip() and not line.startswith("train:")]
    assert p.returncode == 143, describe(p)
    assert err[-1].startswith("error: SIGTERM 1 s ago and the run has not stopped") and "step_000000002" in err[-1], err
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert (out / "checkpoints" / "step_000000002" / ".metadata").is_file()


def test_sample_demo_checks_its_image_count_at_parse_time_and_honours_no_metrics(tmp_path: Path, capsys):
    """`--preset demo --num-images 2` is one line naming the minimum and why (before any checkpoint is read);
    with --no-metrics the demo preset samples the images asked for without the judge."""
    missing = tmp_path / "no_such_checkpoint"
    assert sample_main(["--ckpt", str(missing), "--preset", "demo", "--num-images", "2", "--out",
                        str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 20" in err[0] and "two per digit" in err[0] and "--no-metrics" in err[0], err
    assert "no_such_checkpoint" not in err[0]
    ckpt = tiny_checkpoint(tmp_path / "checkpoint-last.pth")
    out = tmp_path / "plain"
    assert sample_main(["--ckpt", str(ckpt), "--preset", "demo", "--num-images", "3", "--no-metrics", "--steps", "2",
                        "--batch-size", "2", "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as npz:
        assert npz["images"].shape[0] == 3
    assert not (out / "demo_eval.json").exists()


def test_output_dir_problems_through_the_cli(data: Path, tmp_path: Path, capsys):
    """Issue 26 item 7 through train.py's main: a dangling symlink as --output-dir is one line (was `[Errno 17]
    File exists`); the temp file a kill -9 left is removed by the next run; an output inside the data is warned
    about."""
    from jit_fast.train.trainer import main as train_main

    dangling = tmp_path / "out"
    dangling.symlink_to(tmp_path / "missing")
    assert train_main(tiny_argv(data, dangling, "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: output directory {dangling} is a symbolic link to {tmp_path / 'missing'}, which does "
                   "not exist: create its target or choose another directory"], err
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run / f".tmp-samples.npz.{dead.pid}.0123abcd"
    stale.write_bytes(b"x" * 1000)
    assert train_main(tiny_argv(data, run, "--max-steps", "1")) == 0
    assert not stale.exists() and "removed 1 temporary file(s) a killed writer left" in capsys.readouterr().out
    own = make_image_folder(tmp_path / "own_data")  # not the shared fixture: the run would land inside it
    inside = own / "runs" / "r1"
    assert train_main(tiny_argv(own, inside, "--max-steps", "1")) == 0
    assert f"warning: output directory {inside} is inside the data directory {own}" in capsys.readouterr().out
