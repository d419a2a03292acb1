"""examples/toy_manifold.py: the quick run's outputs, and the metrics it reports."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toy_manifold.py"


@pytest.fixture(scope="module")
def toy():
    """The example loaded as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("toy_manifold", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["toy_manifold"] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("toy_manifold", None)


def test_quick_run_writes_figure_and_results(toy, tmp_path: Path) -> None:
    out = tmp_path / "toy"
    assert toy.main(["--out", str(out), "--quick", "--dims", "2", "8"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["x", "eps", "v"]
    for by_dim in results.values():
        assert list(by_dim) == ["2", "8"]
        for metrics in by_dim.values():
            assert set(metrics) == {"nearest_distance", "off_manifold"}
            assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in metrics.values())
        assert by_dim["2"]["off_manifold"] < 1e-5  # P is square at D = 2: nothing is off the plane
    with Image.open(out / "toy_manifold.png") as img:
        assert img.format == "PNG"
        cols, rows = 2, 3
        assert img.size == (toy.LEFT + cols * (toy.PANEL + toy.MARGIN), toy.TOP + rows * (toy.PANEL + toy.MARGIN))


def test_results_do_not_depend_on_workers(toy, tmp_path: Path) -> None:
    """Each run seeds itself from (seed, D): two worker processes give the single process's results exactly."""
    for workers in ("1", "2"):
        toy.main(["--out", str(tmp_path / workers), "--quick", "--dims", "2", "8", "--workers", workers])
    assert (tmp_path / "1" / "results.json").read_bytes() == (tmp_path / "2" / "results.json").read_bytes()


def test_metrics_of_known_point_sets(toy) -> None:
    """Clean roll points score ~0; a shift off the plane by c scores off_manifold c and leaves the 2-D distance."""
    P = toy.projection(16, torch.Generator().manual_seed(0))
    assert torch.allclose(P.T @ P, torch.eye(2), atol=1e-6)
    curve = toy.roll_curve()
    flat = toy.swiss_roll(500, torch.Generator().manual_seed(1))
    normal = torch.randn(16, generator=torch.Generator().manual_seed(2))
    normal -= P @ (P.T @ normal)
    normal /= normal.norm()
    _, clean = toy.measure(flat @ P.T, P, curve)
    assert clean["nearest_distance"] < 1e-3 and clean["off_manifold"] < 1e-5
    _, shifted = toy.measure(flat @ P.T + 0.5 * normal, P, curve)
    assert shifted["nearest_distance"] < 1e-3 and math.isclose(shifted["off_manifold"], 0.5, rel_tol=1e-4)
    _, moved = toy.measure((flat + torch.tensor([3.0, 0.0])) @ P.T, P, curve)
    assert moved["nearest_distance"] > 0.5  # moved off the roll within the plane


def test_bad_flags_are_rejected(toy, tmp_path: Path) -> None:
    for flags in (["--dims", "1"], ["--steps", "0"], ["--predictions", "noise"], ["--ema", "1"]):
        with pytest.raises(SystemExit) as e:
            toy.main(["--out", str(tmp_path), *flags])
        assert e.value.code == 2


def test_earlier_outputs_are_kept_unless_overwrite(toy, tmp_path: Path, capsys) -> None:
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        toy.main(["--out", str(tmp_path), "--quick"])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == "{}"
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        toy.main(["--out", str(tmp_path / "file"), "--quick"])


def test_sampling_integrates_the_velocity_of_each_prediction(toy) -> None:
    """For data at one point x0, the exact x, v and eps predictions all imply the straight flow to x0: Euler (which
    follows a straight flow exactly once t > 0; eps-prediction's velocity is clamped to 0 at t = 0) ends on x0."""
    x0 = torch.tensor([0.5, -1.0, 2.0])
    exact = {
        "x": lambda z, t: x0.expand_as(z),
        "v": lambda z, t: (x0 - z) / (1 - t[:, None]),
        "eps": lambda z, t: (z - t[:, None] * x0) / (1 - t[:, None]),
    }
    cfg = toy.ToyConfig(**{**toy.QUICK, "samples": 8, "sample_steps": 3, "solver": "euler"})
    for prediction, net in exact.items():
        out = toy.generate(net, 3, prediction, cfg, torch.Generator().manual_seed(0), lambda n: None)
        torch.testing.assert_close(out, x0.expand(8, 3), rtol=0, atol=1e-5, msg=prediction)


def test_training_draws_its_times_from_the_configured_logit_normal(toy, monkeypatch) -> None:
    """Every step's times come from sample_t with the run's --p-mean and --p-std."""
    from jit_fast.model.denoiser import sample_t

    seen = []

    def spy(n, P_mean, P_std, **kw):
        seen.append((n, P_mean, P_std))
        return sample_t(n, P_mean, P_std, **kw)

    monkeypatch.setattr(toy, "sample_t", spy)
    cfg = toy.ToyConfig(**{**toy.QUICK, "steps": 2, "p_mean": 0.3, "p_std": 1.7})
    g = torch.Generator().manual_seed(0)
    toy.train(toy.ToyMLP(2, cfg.hidden, cfg.layers), toy.projection(2, g), "v", cfg, g, lambda n: None)
    assert seen == [(cfg.batch_size, 0.3, 1.7)] * 2


def test_training_returns_the_ema_of_the_trained_weights(toy) -> None:
    """Decay 0: the returned EMA is the final weights exactly (and they moved from the initial ones)."""
    cfg = toy.ToyConfig(**{**toy.QUICK, "steps": 3, "ema": 0.0})
    g = torch.Generator().manual_seed(0)
    net = toy.ToyMLP(2, cfg.hidden, cfg.layers)
    init = [p.detach().clone() for p in net.parameters()]
    ema = toy.train(net, toy.projection(2, g), "v", cfg, g, lambda n: None)
    for shadow, p, p0 in zip(ema.shadow, net.parameters(), init, strict=True):
        assert torch.equal(shadow, p.detach()) and not torch.equal(p.detach(), p0)


def test_mlp_is_linear_layers_with_relu_between(toy) -> None:
    """`layers` Linear maps, ReLU between them but not after the last: predictions of x, eps or v take any sign."""
    net = toy.ToyMLP(4, hidden=16, layers=3)
    kinds = [type(m).__name__ for m in net.net]
    assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    out = net(torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.rand(64))
    assert (out < 0).any() and (out > 0).any()
