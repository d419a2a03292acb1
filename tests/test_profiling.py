"""`--profile-steps A:B`: a Chrome/Perfetto trace of exactly those training steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import tiny_argv

from jit_fast.train.cli import ConfigError, parse_config
from jit_fast.train.profiling import parse_step_range
from jit_fast.train.trainer import main


def test_trace_of_the_requested_steps(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(tiny_argv(data, out, "--max-steps", "4", "--profile-steps", "1:3")) == 0
    trace = json.loads((out / "profile" / "trace_rank0.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    # two optimizer steps recorded: AdamW's step runs once per training step
    assert sum(n.startswith("Optimizer.step#AdamW.step") for n in names) == 2
    assert any(n.startswith("aten::") for n in names)


def test_bad_ranges_are_refused() -> None:
    assert parse_step_range("20:25") == (20, 25)
    for bad in ("5", "5:5", "7:3", "-1:2", "a:b"):
        with pytest.raises(ConfigError, match="--profile-steps"):
            parse_config(["--preset", "demo", f"--profile-steps={bad}"])
