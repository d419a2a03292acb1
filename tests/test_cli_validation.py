"""Command-line safety: every numeric flag is checked at parse time, user errors are one line (exit 2), and
a fresh run never deletes or clobbers a previous run in its output directory."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import REPO, describe, run_cli, subprocess_env, tiny_argv

import jit_fast.sampling.generate as sample_mod
from jit_fast.checkpoint import list_checkpoints
from jit_fast.configs import RUN_PRESETS, TrainConfig
from jit_fast.options import flags
from jit_fast.train.cli import ConfigError, build_parser, parse_config, validate_config
from jit_fast.train.state import base_learning_rate
from jit_fast.train.trainer import main


def _refused_by_argparse(entry, argv: list[str], capsys) -> str:
    """Run a CLI `main(argv)`, expect argparse's exit 2, return the stderr's error line."""
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines), lines
    return lines[-1]


# ----------------------------------------------------------------------------------------------
# train.py: numeric flags


TRAIN_BAD = [
    ("--lr", "nan"), ("--lr", "-0.001"), ("--lr", "0"), ("--lr", "1e300"), ("--lr", "inf"),
    ("--blr", "nan"), ("--blr", "-1"), ("--blr", "0"),
    ("--ema-decay1", "1.5"), ("--ema-decay1", "1"), ("--ema-decay2", "-0.1"),
    ("--P-std", "0"), ("--P-mean", "nan"), ("--noise-scale", "0"), ("--noise-scale", "-2"),
    ("--t-eps", "0"), ("--t-eps", "1"), ("--label-drop-prob", "1.5"), ("--label-drop-prob", "-0.1"),
    ("--interval-min", "-0.1"), ("--interval-max", "1.5"), ("--cfg", "-1"), ("--cfg", "nan"),
    ("--batch-size", "0"), ("--batch-size", "abc"), ("--batch-size", "2.5"), ("--epochs", "0"),
    ("--grad-accum", "0"), ("--img-size", "-16"), ("--max-steps", "-1"), ("--num-workers", "-1"),
    ("--log-freq", "0"), ("--keep-last", "-1"), ("--warmup-epochs", "-1"), ("--weight-decay", "nan"),
    ("--grad-clip", "-1"), ("--min-lr", "-1e-6"), ("--seed", "-1"), ("--seed", str(2**64)),
    ("--attn-dropout", "1"), ("--num-sampling-steps", "0"), ("--num-images", "-1"), ("--peak-tflops", "-1"),
    ("--signal-check-freq", "0"), ("--save-freq-steps", "-1"), ("--save-last-freq", "-1"),
    ("--num-classes", "-1"),
]


def _no_run(tmp_path: Path) -> list[str]:
    """Arguments that cannot start training if a bad value slipped through (missing data, scratch output)."""
    return ["--model", "JiT-T/4", "--data-path", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "o")]


@pytest.mark.parametrize("flag,value", TRAIN_BAD)
def test_train_refuses_a_bad_number_naming_the_flag(flag: str, value: str, tmp_path: Path, capsys) -> None:
    line = _refused_by_argparse(main, [*_no_run(tmp_path), f"{flag}={value}"], capsys)
    assert f"argument {flag}" in line and repr(value) in line, line


def test_every_numeric_train_flag_refuses_nan(tmp_path: Path, capsys) -> None:
    """No numeric flag escapes its field's range: each one refuses 'nan' at parse time."""
    numeric = [flags(f)[0] for f in dataclasses.fields(TrainConfig) if f.metadata["range"] is not None]
    assert len(numeric) >= 30
    for flag in numeric:
        line = _refused_by_argparse(main, [*_no_run(tmp_path), flag, "nan"], capsys)
        assert f"argument {flag}" in line, line


def test_train_help_lists_every_run_preset_and_groups_the_flags() -> None:
    text = build_parser().format_help()
    assert all(name in text for name in RUN_PRESETS), text
    assert "Optimizer and EMA:" in text and "(default: 0.9999)" in text


def test_train_accepts_the_edges_of_each_range() -> None:
    cfg, _ = parse_config(["--preset", "demo", "--lr", "1", "--ema-decay1", "0", "--t-eps", "0.999",
                           "--label-drop-prob", "1", "--cfg", "0", "--interval-min", "0", "--interval-max", "1",
                           "--seed", str(2**63 - 1), "--max-steps", "0", "--P-mean", "-3"])
    assert (cfg.lr, cfg.ema_decay1, cfg.label_drop_prob, cfg.cfg, cfg.seed) == (1.0, 0.0, 1.0, 0.0, 2**63 - 1)


def test_interval_order_and_preset_or_api_values_are_checked(capsys) -> None:
    assert main(["--preset", "demo", "--interval-min", "0.5", "--interval-max", "0.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: --interval-min 0.5 must be < --interval-max 0.5"
    for field, value, flag in (("ema_decay1", 1.5, "--ema-decay1"), ("lr", float("nan"), "--lr"),
                               ("beta2", 1.0, "--beta2"), ("batch_size", 8.0, "--batch-size")):
        with pytest.raises(ConfigError, match=f"^{flag} must be"):
            validate_config(dataclasses.replace(TrainConfig(data_path="x"), **{field: value}))


@pytest.mark.parametrize("arg,expected", [("depth=abc", "depth must be an integer >= 1, got 'abc'"),
                                          ("num_heads=0", "num_heads must be an integer >= 1, got 0"),
                                          ("mlp_ratio=-1", "mlp_ratio must be a finite number > 0, got -1")])
def test_model_arg_values_are_checked(arg: str, expected: str, data: Path, tmp_path: Path, capsys) -> None:
    assert main(tiny_argv(data, tmp_path / "o", "--model-arg", arg)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(expected), err


def test_lr_overrides_blr_and_blr_overrides_a_presets_lr() -> None:
    """Official rule: lr = blr x global_batch / 256 unless --lr is given; an explicit --blr beats a preset's lr."""
    cfg, _ = parse_config(["--model", "JiT-T/4", "--data-path", "x", "--blr", "1e-4"])
    assert cfg.lr is None and base_learning_rate(cfg, 1024) == pytest.approx(4e-4)
    cfg, _ = parse_config(["--model", "JiT-T/4", "--data-path", "x", "--blr", "1e-4", "--lr", "2e-3"])
    assert base_learning_rate(cfg, 1024) == 2e-3
    assert base_learning_rate(parse_config(["--preset", "demo"])[0], 64) == RUN_PRESETS["demo"]["lr"]
    cfg, _ = parse_config(["--preset", "demo", "--blr", "1e-4"])
    assert base_learning_rate(cfg, 64) == pytest.approx(1e-4 * 64 / 256)


def test_a_derived_lr_out_of_range_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    argv = tiny_argv(data, tmp_path / "o", "--blr", "0.5", "--batch-size", "8", "--grad-accum", "128")
    i = argv.index("--lr")
    assert main(argv[:i] + argv[i + 2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --blr 0.5 x global batch 1024 / 256 = 2"), err
    assert not (tmp_path / "o").exists() or not list_checkpoints(tmp_path / "o")


# ----------------------------------------------------------------------------------------------
# sample.py: numeric flags


SAMPLE_BAD = [
    ("--cfg", "nan"), ("--cfg", "-1"), ("--cfg", "2.9,inf"), ("--interval", "0.1 nan"), ("--interval", "-0.1 1"),
    ("--interval", "0 1.5"), ("--steps", "0"), ("--num-images", "0"), ("--batch-size", "-4"), ("--seed", "-1"),
    ("--noise-scale", "0"), ("--noise-scale", "nan"), ("--t-eps", "0"), ("--t-eps", "1"), ("--img-size", "0"),
    ("--num-classes", "0"), ("--fid-batch-size", "0"), ("--fid-workers", "-1"), ("--fid-ref-crop", "0"),
]


@pytest.mark.parametrize("flag,value", SAMPLE_BAD)
def test_sample_refuses_a_bad_number_naming_the_flag(flag: str, value: str, capsys) -> None:
    line = _refused_by_argparse(sample_mod.main, ["--ckpt", "x", flag, *value.split()], capsys)
    assert f"argument {flag}" in line, line


def test_sample_interval_order_is_checked(tmp_path: Path, capsys) -> None:
    assert sample_mod.main(["--ckpt", "x", "--interval", "0.5", "0.2", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "sample.py: error: --interval needs 0 <= LO < HI <= 1, got 0.5 0.2"


# ----------------------------------------------------------------------------------------------
# the real CLIs: no traceback


def test_real_clis_print_one_line_without_traceback(tmp_path: Path) -> None:
    env = subprocess_env(cache=tmp_path / "cache")
    p = run_cli(["--preset", "demo", "--lr", "nan"], env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, describe(p)
    assert p.stderr.strip().splitlines()[-1] == "train.py: error: argument --lr: must be a finite number in (0, 1], " \
                                                "got 'nan'", describe(p)
    (tmp_path / "file").write_text("x")
    p = subprocess.run([sys.executable, str(REPO / "sample.py"), "--ckpt", "x", "--out", str(tmp_path / "file")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, describe(p)
    assert p.stderr.strip().splitlines() == [f"sample.py: error: --out {tmp_path / 'file'} exists and is not a "
                                             "directory"], describe(p)


# ----------------------------------------------------------------------------------------------
# output directories: nothing is deleted unasked


def _snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run directory (relative path -> bytes)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture
def prior_run(data: Path, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A finished 2-step run in tmp/run and a snapshot of its files."""
    out = tmp_path / "run"
    assert main(tiny_argv(data, out, "--max-steps", "2")) == 0
    snap = _snapshot(out)
    assert any(k.startswith("checkpoints/") for k in snap) and snap["metrics.jsonl"]
    return out, snap


def test_no_preset_may_overwrite() -> None:
    assert not any(p.get("overwrite") for p in RUN_PRESETS.values())


def test_fresh_run_over_a_run_is_refused_and_changes_nothing(data: Path, prior_run, capsys) -> None:
    out, snap = prior_run
    capsys.readouterr()
    assert main(tiny_argv(data, out, "--max-steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "--overwrite" in err[0] and "--auto-resume" in err[0], err
    assert _snapshot(out) == snap


def test_a_preset_cannot_turn_overwrite_on(data: Path, prior_run, capsys, monkeypatch) -> None:
    """Only an explicit --overwrite replaces a run, whatever a preset says."""
    out, snap = prior_run
    argv = tiny_argv(data, out, "--max-steps", "3")
    monkeypatch.setitem(RUN_PRESETS, "clobber", dict(overwrite=True))
    assert main(["--preset", "clobber", *argv]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert _snapshot(out) == snap


def test_metrics_alone_mark_a_run(data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(tiny_argv(data, out, "--max-steps", "1")) == 2
    assert "already holds metrics.jsonl" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_overwrite_moves_the_old_run_aside(data: Path, prior_run, capsys) -> None:
    out, snap = prior_run
    capsys.readouterr()
    assert main(tiny_argv(data, out, "--max-steps", "1", "--overwrite")) == 0
    assert "moved the previous run (checkpoints, metrics.jsonl) to" in capsys.readouterr().out
    aside = list(out.glob("replaced-*"))
    assert len(aside) == 1
    assert _snapshot(aside[0]) == snap  # byte for byte
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_overwrite_and_auto_resume_together_are_refused(data: Path, prior_run, capsys) -> None:
    out, snap = prior_run
    assert main(tiny_argv(data, out, "--overwrite", "--auto-resume")) == 2
    assert "contradict" in capsys.readouterr().err
    assert _snapshot(out) == snap


def test_demo_twice_continues_and_overwrite_starts_over(tmp_path: Path, capsys) -> None:
    """`make demo` run twice: the second continues output/demo (here: already done, nothing lost); --overwrite
    starts over and keeps the old run aside."""
    out = tmp_path / "demo"
    argv = ["--preset", "demo", "--output-dir", str(out), "--max-steps", "1", "--no-demo-eval", "--no-tensorboard"]
    assert main(argv) == 0
    snap = _snapshot(out)
    capsys.readouterr()
    assert main(argv) == 0
    assert f"{out} is already trained to step 1: nothing to train" in capsys.readouterr().out
    assert _snapshot(out) == snap
    assert main([*argv, "--overwrite"]) == 0
    (aside,) = out.glob("replaced-*")
    assert _snapshot(aside) == snap and [s for s, _ in list_checkpoints(out)] == [1]


def test_demo_over_another_run_keeps_it(data: Path, prior_run, capsys) -> None:
    """The issue's case: `--preset demo` over a directory holding a 2-step run of another model."""
    out, snap = prior_run
    capsys.readouterr()
    assert main(["--preset", "demo", "--output-dir", str(out), "--no-demo-eval"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "continuing" in err[0] and "--overwrite" in err[0], err
    assert _snapshot(out) == snap
