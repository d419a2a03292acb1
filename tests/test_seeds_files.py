"""The shared seed mixers (pinned to values the pre-refactor code produced) and `atomic_write`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from jit_fast.files import atomic_write
from jit_fast.sampler import image_seed as sampler_image_seed
from jit_fast.seeds import image_seed, mix_seed
from jit_fast.train import mix_seed as train_mix_seed


def test_mix_seed_matches_the_old_training_formula() -> None:
    # computed by jit_fast.train.mix_seed before it moved to jit_fast.seeds (exact resumes depend on them)
    assert [mix_seed(0), mix_seed(1, 2, 3), mix_seed(7, 123456, 5, 2), mix_seed(2**40 + 3, 99, 1), mix_seed(-1, 0)] \
        == [3980143261097177850, 2623250113353451629, 1421130376740681028, 7547449383109027090, 5961565333936754605]
    assert train_mix_seed is mix_seed


def test_image_seed_matches_the_old_sampler_formula() -> None:
    # computed by jit_fast.sampler.image_seed before it moved (samples.npz of a seed depends on them)
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
