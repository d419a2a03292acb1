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
