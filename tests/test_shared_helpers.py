"""Helpers shared across the package: seeds (pinned to the pre-refactor values), atomic_write, precision, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import jit_fast.sampling.generate as sample_mod
from jit_fast.checkpoint import CheckpointError
from jit_fast.checkpoint.safe_dcp import UnsafeCheckpointError
from jit_fast.configs import SampleConfig
from jit_fast.data.prepare import PrepareError
from jit_fast.sampling import fid
from jit_fast.sampling.sampler import image_seed as sampler_image_seed
from jit_fast.shared.distributed import resolve_precision
from jit_fast.shared.errors import UsageError, UserError
from jit_fast.shared.files import atomic_write
from jit_fast.shared.integrity import ChecksumError
from jit_fast.shared.seeds import image_seed, mix_seed
from jit_fast.train.cli import ConfigError
from jit_fast.train.trainer import mix_seed as train_mix_seed


def test_mix_seed_matches_the_old_training_formula() -> None:
    # computed by the training module's mix_seed before it moved to the seeds module (exact resumes depend on them)
    assert [mix_seed(0), mix_seed(1, 2, 3), mix_seed(7, 123456, 5, 2), mix_seed(2**40 + 3, 99, 1), mix_seed(-1, 0)] \
        == [3980143261097177850, 2623250113353451629, 1421130376740681028, 7547449383109027090, 5961565333936754605]
    assert train_mix_seed is mix_seed


def test_image_seed_matches_the_old_sampler_formula() -> None:
    # computed by jit_fast.sampling.sampler.image_seed before it moved (samples.npz of a seed depends on them)
    got = [image_seed(0, 0), image_seed(0, 1), image_seed(1, 0), image_seed(123, 49999), image_seed(2**31 - 1, 7)]
    assert got == [7896617691693857887, 2918264622725855778, 3717377837946358015, 517498580130663833,
                   5281756285149850524]
    assert sampler_image_seed is image_seed


def test_atomic_write_bytes_text_and_callback(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    atomic_write(p, "one\n")
    assert p.read_text() == "one\n"
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    q = tmp_path / "x.npz"
    atomic_write(q, lambda f: np.savez(f, a=np.arange(3)))
    with np.load(q) as d:
        np.testing.assert_array_equal(d["a"], np.arange(3))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt", "x.npz"]


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "keep.json"
    p.write_text("old")

    def torn(f) -> None:
        f.write(b"half of the new conte")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(p, torn)
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["keep.json"]


def test_precision_is_resolved_one_way_for_training_and_sampling(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_precision("auto", cpu) == ("fp32", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert resolve_precision("auto", cuda) == ("bf16", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: no bf16
    assert resolve_precision("auto", cuda) == ("fp16", torch.float16)
    assert resolve_precision("fp16", cpu) == ("fp16", torch.float16)
    assert resolve_precision("fp32", cuda) == ("fp32", None)


def test_user_errors_share_one_base_and_keep_their_old_bases() -> None:
    assert ConfigError is UsageError and issubclass(UsageError, ValueError)
    for cls, old in ((CheckpointError, RuntimeError), (ChecksumError, RuntimeError),
                     (UnsafeCheckpointError, RuntimeError), (fid.InceptionWeightsError, RuntimeError),
                     (fid.StatsError, ValueError), (PrepareError, ValueError)):
        assert issubclass(cls, UserError) and issubclass(cls, old), cls


def test_sample_config_is_built_once_from_the_flags() -> None:
    c = SampleConfig.from_args(sample_mod.build_parser().parse_args(["--ckpt", "x", "--cfg", "1.5,3"]))
    assert (c.cfg, c.interval, c.steps, c.solver, c.num_images, c.num_images_given) == \
        ((1.5, 3.0), (0.1, 1.0), 50, "heun", 50000, False)
    demo = SampleConfig.from_args(sample_mod.build_parser().parse_args(["--ckpt", "x", "--preset", "demo",
                                                                        "--num-images", "20"]))
    assert (demo.cfg, demo.interval, demo.steps, demo.num_images, demo.num_images_given) == \
        ((2.0,), (0.0, 1.0), 10, 20, True)
    with pytest.raises(UsageError, match="--interval needs"):
        SampleConfig(ckpt="x", interval=(0.5, 0.5)).validate()
