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
                       capture_output=True, text=True, timeout=900)
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
