"""Demo evaluation: a faithful generator passes; wrong classes, one image per class, copies of training digits
and a judge that cannot read digits each fail."""

from __future__ import annotations

import json

import pytest
import torch

from jit_fast.data.demo import demo_arrays
from jit_fast.sampling import demo_eval
from jit_fast.sampling.demo_eval import evaluate_demo, summary


class DigitNet(torch.nn.Module):
    """x-prediction 'generator' built from the real digits of class (y + shift), chosen by the noise z.

    With an exact x-prediction the last Euler step lands on the prediction, so the samples are
    - "copy": the real digit nearest to z (different per noise draw: a memorising but diverse generator);
    - "blend": the mean of two digits of the class picked at random (seeded by z): a new digit of the class
      that is no training image;
    - "single": the class's first digit, whatever z;
    - "partial": copies for classes 0 and 1 (20% of the samples), blends for the others.
    """

    def __init__(self, mode: str = "blend", shift: int = 0) -> None:
        super().__init__()
        self.real, self.labels = demo_arrays(32)
        self.mode, self.shift = mode, shift
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(z)
        for i in range(z.shape[0]):
            c = (int(y[i]) + self.shift) % 10 if int(y[i]) < 10 else 0
            pool = self.real[self.labels == c]
            mode = self.mode if self.mode != "partial" else ("copy" if c < 2 else "blend")
            if mode == "single":
                out[i] = pool[0]
            elif mode == "copy":
                out[i] = pool[int(torch.cdist(z[i].flatten()[None], pool.flatten(1)).argmin())]
            else:
                g = torch.Generator().manual_seed(int(z[i].double().abs().sum() * 1e6))
                a, b = torch.randint(len(pool), (2,), generator=g).tolist()
                out[i] = (pool[a] + pool[b]) / 2
        return out


def run(net: torch.nn.Module, tmp_path) -> dict:
    return evaluate_demo(net, tmp_path, steps=2, cfg=1.0, num_images=60, batch_size=30)


def failed(result: dict) -> set[str]:
    return {k for k, ok in result["checks"].items() if not ok}


def test_faithful_generator_passes(tmp_path) -> None:
    result = run(DigitNet(), tmp_path)
    assert result["passed"] and not failed(result), summary(result)
    assert result["accuracy"] >= 0.95 and result["diversity_ratio"] >= 0.5
    assert result["memorisation"]["nn_ratio"] >= 0.5 and result["memorisation"]["copy_fraction"] <= 0.05
    assert json.loads((tmp_path / "demo_eval.json").read_text()) == result
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert summary(result).startswith("PASS")


def test_wrong_class_fails_on_accuracy(tmp_path) -> None:
    result = run(DigitNet(shift=1), tmp_path)
    assert not result["passed"] and result["accuracy"] < 0.2 and "accuracy" in failed(result)
    assert summary(result).startswith("FAIL")


def test_one_image_per_class_fails_on_diversity(tmp_path) -> None:
    result = run(DigitNet("single"), tmp_path)
    assert result["accuracy"] >= 0.9 and result["diversity_ratio"] < 0.05 and not result["passed"]
    assert "diversity" in failed(result)


def test_copies_of_training_digits_fail_on_memorisation(tmp_path) -> None:
    """Nearest-training-digit copies pass accuracy and diversity; only the memorisation check stops them."""
    result = run(DigitNet("copy"), tmp_path)
    assert failed(result) == {"memorisation"}, summary(result)
    memo = result["memorisation"]
    assert memo["sample_nn_median"] < 1e-3 * memo["real_nn_median"] and memo["copy_fraction"] == 1
    assert not result["passed"]
    assert "failed: memorisation" in summary(result)


def test_partial_copying_fails_on_near_copies(tmp_path) -> None:
    """20% copies keep the median distance near the real one; the near-copy fraction catches them."""
    result = run(DigitNet("partial"), tmp_path)
    memo = result["memorisation"]
    assert memo["nn_ratio"] >= memo["nn_ratio_target"] and memo["copy_fraction"] >= 0.2
    assert failed(result) == {"memorisation"}, summary(result)


def test_a_judge_that_cannot_read_digits_passes_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Features reduced to mean brightness: the classifier fails its own held-out target, so even the faithful
    generator fails, whatever the samples score."""
    features = demo_eval.digit_features
    monkeypatch.setattr(demo_eval, "digit_features", lambda images: features(images).mean(1, keepdims=True))
    result = run(DigitNet(), tmp_path)
    assert result["classifier_accuracy_on_real_heldout"] < demo_eval.CLASSIFIER_TARGET
    assert "judge" in failed(result) and not result["passed"]
