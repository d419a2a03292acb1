"""Demo evaluation: the accuracy and diversity checks pass a faithful generator and fail bad ones."""

from __future__ import annotations

import json

import torch

from jit_fast.data.demo import demo_arrays
from jit_fast.demo_eval import evaluate_demo, summary


class NearestDigitNet(torch.nn.Module):
    """x-prediction 'generator' that returns the real digit of class (y + shift) nearest to z.

    With an exact x-prediction the last Euler step lands on that digit, so the samples are real
    digits of the chosen class, different per noise draw (a memorizing but diverse generator).
    """

    def __init__(self, shift: int = 0, single: bool = False) -> None:
        super().__init__()
        self.real, self.labels = demo_arrays(32)
        self.shift, self.single = shift, single
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(z)
        for i in range(z.shape[0]):
            c = (int(y[i]) + self.shift) % 10 if int(y[i]) < 10 else 0
            pool = self.real[self.labels == c]
            j = 0 if self.single else int(torch.cdist(z[i].flatten()[None], pool.flatten(1)).argmin())
            out[i] = pool[j]
        return out


def run(net: torch.nn.Module, tmp_path) -> dict:
    return evaluate_demo(net, tmp_path, steps=2, cfg=1.0, num_images=60, batch_size=30)


def test_faithful_generator_passes(tmp_path) -> None:
    result = run(NearestDigitNet(), tmp_path)
    assert result["passed"] and result["accuracy"] >= 0.95 and result["diversity_ratio"] >= 0.5
    assert json.loads((tmp_path / "demo_eval.json").read_text())["accuracy"] == result["accuracy"]
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert summary(result).startswith("PASS")


def test_wrong_class_fails_on_accuracy(tmp_path) -> None:
    result = run(NearestDigitNet(shift=1), tmp_path)
    assert not result["passed"] and result["accuracy"] < 0.2
    assert summary(result).startswith("FAIL")


def test_copies_fail_on_diversity(tmp_path) -> None:
    result = run(NearestDigitNet(single=True), tmp_path)
    assert result["accuracy"] >= 0.9 and result["diversity_ratio"] < 0.05 and not result["passed"]
