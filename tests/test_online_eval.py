"""`--online-eval` and `--evaluate-gen`: FID/IS during training, from the same machinery as sample.py.

Inception runs with random weights (torch-fidelity's architecture; no download); the reference is a
folder of images. What matters here is that the numbers are the ones sample.py computes for the same
weights and settings, on 1 or 2 ranks, and that evaluating changes nothing about training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sampling_utils import random_inception_weights
from train_helpers import (
    describe,
    make_image_folder,
    read_losses,
    run_cli,
    run_worker,
    subprocess_env,
    tiny_argv,
    torchrun,
)

from jit_fast.checkpoint import latest_checkpoint
from jit_fast.sampling.generate import main as sample_main
from jit_fast.train.cli import parse_config
from jit_fast.train.trainer import main

pytestmark = pytest.mark.slow

# 8 steps per epoch (64 images, batch 8); 3 epochs; evaluations after epochs 0, 2 (--eval-freq 2) and the last
EVAL = ["--num-images", "12", "--gen-bsz", "5", "--num-sampling-steps", "2", "--cfg", "1.5", "--interval-min", "0.1",
        "--epochs", "3"]


@pytest.fixture(scope="module")
def inception(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "weights.pth")


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("fid_ref"), classes=2, per_class=6, size=16, seed=3)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _evals(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _rows(run) if r.get("kind") == "eval"}


def test_evaluation_preempted_resumed_and_training_untouched(data: Path, tmp_path: Path, inception: Path,
                                                            ref: Path) -> None:
    """Evaluations at the official epochs (FID, IS, grid, TensorBoard); SIGTERM inside the first one leaves the
    step-8 checkpoint, the resumed run evaluates step 8 first, and every loss equals a run without evaluation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, run = tmp_path / "plain", tmp_path / "run"
    online = [*EVAL, "--online-eval", "--eval-freq", "2", "--fid-ref", str(ref), "--inception-weights", str(inception),
              "--tensorboard"]
    p = run_cli(tiny_argv(data, plain, *EVAL), env=subprocess_env(cache=tmp_path / "cache"))  # same threads
    assert p.returncode == 0, describe(p)
    p = run_worker(["sigterm-eval", *tiny_argv(data, run, *online)], env=subprocess_env(cache=tmp_path / "cache"))
    assert p.returncode == 0 and "preempted" in p.stdout + p.stderr, describe(p)
    assert latest_checkpoint(run).name.endswith("000000008") and not _evals(run), describe(p)
    p = run_cli(tiny_argv(data, run, *online, "--resume", str(run)), env=subprocess_env(cache=tmp_path / "cache"))
    assert p.returncode == 0, describe(p)
    evals = _evals(run)
    assert sorted(evals) == [8, 24], describe(p)  # after epoch 0 (resumed), epoch 2 (the last); not after epoch 1
    for step, r in evals.items():
        assert r["epoch"] == step // 8 and r["fid"] > 0 and r["inception_score"] >= 1.0 and r["eval_seconds"] > 0
        assert (run / "eval" / f"grid_step_{step:08d}.png").is_file()
        assert json.loads((run / "eval" / f"step_{step:08d}.json").read_text())["fid"] == r["fid"]
    assert read_losses(run) == read_losses(plain)  # evaluation touches neither RNG nor data order
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("eval/fid")] == [8, 24] and len(ea.Images("eval/grid")) == 2
    p = run_cli(tiny_argv(data, run, *online, "--resume", str(run)), env=subprocess_env(cache=tmp_path / "cache"))
    assert p.returncode == 0 and sorted(_evals(run)) == [8, 24], describe(p)  # a finished run: nothing repeated


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step run (checkpoint at step 6) to evaluate."""
    out = tmp_path_factory.mktemp("finished")
    assert main(tiny_argv(data, out, "--max-steps", "6")) == 0
    return out


def test_two_ranks_give_the_fid_of_one(data: Path, finished: Path, tmp_path: Path, inception: Path,
                                       ref: Path) -> None:
    """The same checkpoint evaluated by 1 process and by 2 FSDP2 ranks (gloo): FID and IS agree to 1e-6."""
    flags = [*EVAL, "--max-steps", "6", "--online-eval", "--fid-ref", str(ref), "--inception-weights", str(inception)]
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(finished, d)
    env = subprocess_env(cache=tmp_path / "cache")
    p = run_cli(tiny_argv(data, one, *flags, "--resume", str(one)), env=env)
    assert p.returncode == 0, describe(p)
    p = torchrun(["train.py", *tiny_argv(data, two, *flags, "--resume", str(two), "--batch-size", "4")], env=env)
    assert p.returncode == 0, describe(p)
    a, b = _evals(one)[6], _evals(two)[6]
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-6, abs=1e-6)
    assert a["inception_score"] == pytest.approx(b["inception_score"], rel=1e-6)


def test_evaluate_gen_equals_sample_py(data: Path, finished: Path, tmp_path: Path, inception: Path,
                                       ref: Path) -> None:
    """`train.py --evaluate-gen --resume RUN` writes the metrics `sample.py --ckpt RUN` computes."""
    out = tmp_path / "evalgen"
    argv = ["--evaluate_gen", "--resume", str(finished), "--output_dir", str(out), "--num_images", "12",
            "--gen_bsz", "5", "--num_sampling_steps", "2", "--cfg", "1.5", "--interval_min", "0.1",
            "--fid-ref", str(ref), "--inception-weights", str(inception), "--device", "cpu"]
    assert main(argv) == 0
    assert sample_main(["--ckpt", str(finished), "--out", str(tmp_path / "sample"), "--num-images", "12",
                        "--batch-size", "5", "--steps", "2", "--cfg", "1.5", "--interval", "0.1", "1.0",
                        "--fid-ref", str(ref), "--inception-weights", str(inception), "--device", "cpu"]) == 0
    got = json.loads((out / "evaluate_gen" / "metrics.json").read_text())
    want = json.loads((tmp_path / "sample" / "metrics.json").read_text())
    assert got["metrics"] == want["metrics"] and "fid" in got["metrics"]
    assert got["config"] == want["config"]


def test_official_command_parses_and_starts(tmp_path: Path, inception: Path) -> None:
    """The official README's JiT-B/16 command (paths replaced) parses to the official settings and, with a tiny
    model override and one step, trains and evaluates on CPU."""
    data = make_image_folder(tmp_path / "imagenet" / "train", classes=2, per_class=4, size=40)
    official = ["--model", "JiT-B/16", "--proj_dropout", "0.0", "--P_mean", "-0.8", "--P_std", "0.8",
                "--img_size", "256", "--noise_scale", "1.0", "--batch_size", "128", "--blr", "5e-5",
                "--epochs", "600", "--warmup_epochs", "5", "--gen_bsz", "128", "--num_images", "50000",
                "--cfg", "2.9", "--interval_min", "0.1", "--interval_max", "1.0",
                "--output_dir", str(tmp_path / "out"), "--resume", str(tmp_path / "out"),
                "--data_path", str(data.parent), "--online_eval"]
    cfg, _ = parse_config(official)
    assert (cfg.model, cfg.img_size, cfg.batch_size, cfg.blr, cfg.epochs, cfg.gen_bsz, cfg.eval_num_images,
            cfg.cfg, cfg.interval_min, cfg.online_eval, cfg.eval_freq) == (
        "JiT-B/16", 256, 128, 5e-5, 600, 128, 50000, 2.9, 0.1, True, 40)
    tiny = ["--model-arg", "depth=1", "--model-arg", "hidden_size=64", "--model-arg", "num_heads=2",
            "--model-arg", "bottleneck_dim=16", "--model-arg", "in_context_start=0", "--batch_size", "2",
            "--max-steps", "1", "--num_images", "2", "--gen_bsz", "2", "--num_sampling_steps", "1",
            "--inception-weights", str(inception), "--num-workers", "0", "--data-backend", "torch"]
    (tmp_path / "out").mkdir()
    assert main([*official, *tiny]) == 0
    assert sorted(_evals(tmp_path / "out")) == [1]
