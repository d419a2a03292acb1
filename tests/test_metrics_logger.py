"""MetricsLogger: metrics.jsonl rows, TensorBoard scalars and images, the optional W&B sink (a recording fake)."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from jit_fast.shared.errors import UserError
from jit_fast.train.metrics import MetricsLogger


class _FakeRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module recording init arguments and logged values."""
    mod = types.ModuleType("wandb")
    mod.inits = []
    mod.runs = []

    def init(**kw):
        mod.inits.append(kw)
        run = _FakeRun()
        mod.runs.append(run)
        return run

    mod.init = init
    mod.Image = lambda a: ("image", a.shape)
    mod.util = types.SimpleNamespace(generate_id=lambda: "abc123")
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setenv("WANDB_MODE", "offline")
    return mod


def test_groups_rows_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = MetricsLogger(tmp_path, enabled=True)
    m.log(5, {"loss": 0.5, "mfu": None})
    m.log(5, {"fid": 12.5, "inception_score": 3.0}, group="eval")
    m.log_image(5, "eval/grid", np.zeros((10, 12, 3), np.uint8))
    m.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 5, "loss": 0.5, "mfu": None},
                    {"step": 5, "kind": "eval", "fid": 12.5, "inception_score": 3.0}]
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {"train/loss", "eval/fid", "eval/inception_score"}
    assert ea.Tags()["images"] == ["eval/grid"]
    assert ea.Scalars("eval/fid")[0].value == pytest.approx(12.5)


def test_off_rank_writes_nothing(tmp_path):
    m = MetricsLogger(tmp_path / "run", enabled=False, wandb_project="p")
    m.log(1, {"loss": 1.0})
    m.close()
    assert not (tmp_path / "run").exists()


def test_wandb_run_kept_across_resume(tmp_path, fake_wandb):
    for step in (1, 2):
        m = MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb_project="proj", config={"lr": 1.0})
        m.log(step, {"loss": 0.25})
        m.log_image(step, "eval/grid", np.zeros((4, 4, 3), np.uint8))
        m.close()
    assert [kw["id"] for kw in fake_wandb.inits] == ["abc123", "abc123"]  # one run id per output dir
    assert all(kw["mode"] == "offline" and kw["project"] == "proj" for kw in fake_wandb.inits)
    run = fake_wandb.runs[1]
    assert run.logged[0] == ({"train/loss": 0.25}, 2)
    assert run.logged[1] == ({"eval/grid": ("image", (4, 4, 3))}, 2)
    assert run.finished


def test_wandb_missing_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(UserError, match="pip install wandb"):
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb_project="proj")
