"""The README's demo: `python train.py --preset demo` passes the demo judge (wall time is printed, not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_and_passes(tmp_path: Path) -> None:
    env = {**os.environ, "JIT_FAST_CACHE": str(tmp_path / "cache")}  # also rebuilds the digits ImageFolder
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "train.py", "--preset", "demo", "--output-dir", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=2400)  # a hang guard, not a time limit
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((out / "demo_eval" / "demo_eval.json").read_text())
    print(f"demo trained and judged in {wall:.0f}s: {result}")
    assert result["passed"] and all(result["checks"].values()), result
    assert result["accuracy"] >= 0.95 and result["diversity_ratio"] >= 0.5, result
    assert "demo evaluation: PASS" in p.stdout + p.stderr
    # sample.py re-scores the same EMA weights with the same seeds: the same numbers
    q = subprocess.run([sys.executable, "sample.py", "--preset", "demo", "--ckpt", str(out), "--out",
                        str(tmp_path / "rescore")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    again = json.loads((tmp_path / "rescore" / "demo_eval.json").read_text())
    assert again["accuracy"] == result["accuracy"] and again["diversity_ratio"] == result["diversity_ratio"]
    assert again["memorisation"] == result["memorisation"]


@pytest.mark.parametrize(("flags", "code"), [(("--max-steps", "30"), 0), (("--epochs", "1"), 1)])
def test_quality_gate_applies_to_the_full_schedule_only(flags: tuple[str, ...], code: int, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """About 30 steps miss the targets either way: cut short by --max-steps the run is scored and reported but
    exits 0; as its full schedule (--epochs 1, 28 steps) the same miss exits 1."""
    from jit_fast.train.trainer import main

    out = tmp_path / "demo"
    assert main(["--preset", "demo", "--num-images", "60", "--output-dir", str(out), *flags]) == code
    printed = capsys.readouterr().out
    result = json.loads((out / "demo_eval" / "demo_eval.json").read_text())
    assert not result["passed"] and "demo evaluation: FAIL" in printed, printed[-2000:]
    assert ("the quality gate applies to the full schedule" in printed) == (code == 0)
