"""sample.py: outputs, NFE print, sweeps, resume, bad input (tiny model; a cheap stand-in Inception)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sampling_utils import CLASSES, IMG, FakeInception, run_cli, tiny_checkpoint, tiny_net

import jit_fast.sampling.generate as sample_mod
from jit_fast.checkpoint import ModelMeta
from jit_fast.configs import SampleConfig
from jit_fast.model.network import JiT
from jit_fast.sampling import fid
from jit_fast.sampling.sampler import StaticSampler, image_noise, nfe_per_image
from jit_fast.shared import integrity


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-last.pth")


@pytest.fixture
def fake_inception(monkeypatch):
    ext = FakeInception()
    monkeypatch.setattr(fid, "build_inception", lambda weights=None, device="cpu": ext.to(device))
    return ext


def base_args(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--num-images", "10", "--batch-size", "4", "--steps", "3", "--out", str(out),
            *extra]


def load_npz(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def test_outputs_match_library_and_nfe_is_printed(ckpt, tmp_path, fake_inception, capsys, monkeypatch):
    calls = []
    forward = JiT.forward
    monkeypatch.setattr(JiT, "forward", lambda self, *a: calls.append(a[0].shape[0]) or forward(self, *a))
    assert sample_mod.main(base_args(ckpt, tmp_path, "--png")) == 0
    out = capsys.readouterr().out
    nfe = int(re.search(r"NFE per image: (\d+) = 2\*\(3-1\)\+1", out).group(1))
    assert nfe == nfe_per_image(3, "heun") == 5
    assert len(calls) == nfe * 3  # three chunks of the static batch 4 (last one padded)

    npz = load_npz(tmp_path / "samples.npz")
    assert set(npz) == {"images", "labels", "arr_0", "arr_1"}
    assert npz["images"].shape == (10, IMG, IMG, 3) and npz["images"].dtype == np.uint8
    assert np.array_equal(npz["images"], npz["arr_0"]) and np.array_equal(npz["labels"], npz["arr_1"])
    assert np.array_equal(npz["labels"], np.arange(10) % CLASSES)

    # equal to the library: chunk k = images [4k, 4k+4) through a static sampler of batch 4
    sd = torch.load(ckpt, weights_only=False)["model_ema1"]
    net = sample_mod.build_net(ModelMeta(model="JiT-T/4", img_size=IMG, num_classes=CLASSES),
                               SampleConfig(ckpt="x"), torch.device("cpu"))
    net.load_state_dict({k.removeprefix("net."): v for k, v in sd.items()})
    s = StaticSampler(net, 4, steps=3, num_classes=CLASSES)
    for st in (0, 4, 8):
        en = min(st + 4, 10)
        x = s.run(image_noise(0, range(st, en), (3, IMG, IMG)), torch.arange(st, en) % CLASSES, 2.9)
        assert np.array_equal(sample_mod.to_uint8(x).numpy(), npz["images"][st:en])

    for i in (0, 9):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / f"{i:06d}.png")), npz["images"][i])
    assert (tmp_path / "grid.png").is_file() and not (tmp_path / "parts").exists()
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["checkpoint"]["sha256"] == integrity.file_digest(ckpt)
    assert m["config"]["cfg"] == 2.9 and m["config"]["interval"] == [0.1, 1.0] and m["config"]["steps"] == 3
    assert m["config"]["labels"] == "i % num_classes" and m["config"]["model"]["depth"] == 4
    assert m["nfe_per_image"] == 5 and m["timing"]["generated"] == 10
    # IS is reported; 10 images in 10 splits make it 1 by definition, so its value is checked where it can
    # differ: against torch-fidelity in test_sampling_dist, and distinct per setting in the sweep test below
    assert "inception_score_mean" in m["metrics"] and "fid" not in m["metrics"]


def test_sweep_loads_model_once_and_names_best(ckpt, tmp_path, fake_inception, capsys, monkeypatch):
    builds = []
    real_build = sample_mod.build_net
    monkeypatch.setattr(sample_mod, "build_net", lambda *a: builds.append(1) or real_build(*a))
    argv = base_args(ckpt, tmp_path / "sweep", "--cfg", "1.5,3", "--ema", "ema1,ema2", "--num-images", "20")
    assert sample_mod.main(argv) == 0
    assert len(builds) == 1
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "sweep.jsonl").read_text().splitlines()]
    assert [(r["setting"]["ema"], r["setting"]["cfg"]) for r in rows] == [
        ("ema1", 1.5), ("ema1", 3.0), ("ema2", 1.5), ("ema2", 3.0)]
    summary = json.loads((tmp_path / "sweep" / "metrics.json").read_text())
    scores = [r["metrics"]["inception_score_mean"] for r in rows]
    assert len(set(scores)) == 4
    best = rows[int(np.argmax(scores))]  # no FID reference: the best is the highest IS
    assert summary["best"]["setting"] == best["setting"]
    assert f"best: ema {best['setting']['ema']} cfg {best['setting']['cfg']:g}" in capsys.readouterr().out
    images = {t: load_npz(tmp_path / "sweep" / t / "samples.npz")["images"]
              for t in ("ema1_cfg1.5", "ema1_cfg3", "ema2_cfg1.5", "ema2_cfg3")}
    assert not np.array_equal(images["ema1_cfg1.5"], images["ema2_cfg1.5"])
    assert not np.array_equal(images["ema1_cfg1.5"], images["ema1_cfg3"])
    # a sweep row equals the same setting run alone (weights swapped and cfg buffer reset correctly)
    assert sample_mod.main(base_args(ckpt, tmp_path / "one", "--cfg", "1.5", "--ema", "ema2", "--num-images", "20")) \
        == 0
    assert np.array_equal(load_npz(tmp_path / "one" / "samples.npz")["images"], images["ema2_cfg1.5"])


def test_interrupted_run_resumes_from_finished_chunks(ckpt, tmp_path, monkeypatch):
    assert sample_mod.main(base_args(ckpt, tmp_path / "full", "--no-metrics")) == 0
    full = load_npz(tmp_path / "full" / "samples.npz")

    runs = []
    real_run = StaticSampler.run

    def flaky(self, *a, **k):
        runs.append(1)
        if len(runs) == 3:
            raise KeyboardInterrupt  # killed while sampling the third chunk
        return real_run(self, *a, **k)

    monkeypatch.setattr(StaticSampler, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        sample_mod.main(base_args(ckpt, tmp_path / "cut", "--no-metrics"))
    assert sorted(p.name for p in (tmp_path / "cut" / "parts").glob("chunk_*.npz")) == [
        "chunk_0000000.npz", "chunk_0000001.npz"]

    # another setting cannot reuse these chunks
    assert sample_mod.main(base_args(ckpt, tmp_path / "cut", "--no-metrics", "--seed", "1")) == 2

    runs.clear()
    assert sample_mod.main(base_args(ckpt, tmp_path / "cut", "--no-metrics")) == 0
    assert len(runs) == 1  # only the missing chunk is generated
    resumed = load_npz(tmp_path / "cut" / "samples.npz")
    assert all(np.array_equal(full[k], resumed[k]) for k in full)
    m = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert m["timing"]["resumed"] == 8 and m["timing"]["generated"] == 2


def test_overwrite_discards_chunks_of_another_run(ckpt, tmp_path):
    out = tmp_path / "o"
    assert sample_mod.main(base_args(ckpt, out, "--no-metrics", "--keep-parts")) == 0
    assert sample_mod.main(base_args(ckpt, out, "--no-metrics", "--cfg", "2")) == 2
    assert sample_mod.main(base_args(ckpt, out, "--no-metrics", "--cfg", "2", "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["cfg"] == 2.0


def test_recipe_comes_from_the_checkpoint_unless_given(tmp_path):
    ck = tiny_checkpoint(tmp_path / "ns.pth", noise_scale=2.5)
    assert sample_mod.main(base_args(ck, tmp_path / "a", "--no-metrics", "--num-images", "2")) == 0
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["config"]["noise_scale"] == 2.5
    assert sample_mod.main(base_args(ck, tmp_path / "b", "--no-metrics", "--num-images", "2",
                                     "--noise-scale", "1.25", "--t-eps", "0.1")) == 0
    config = json.loads((tmp_path / "b" / "metrics.json").read_text())["config"]
    assert config["noise_scale"] == 1.25 and config["t_eps"] == 0.1


def test_bad_fid_reference_fails_before_sampling(ckpt, tmp_path, fake_inception, capsys, monkeypatch):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    monkeypatch.setattr(StaticSampler, "run", lambda *a, **k: pytest.fail("sampled despite a bad reference"))
    assert sample_mod.main(base_args(ckpt, tmp_path / "o", "--fid-ref", str(tmp_path / "ref.npz"))) == 2
    assert "do not fit the 2048-d Inception pool features" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--ckpt", "/nonexistent/ckpt.pth"], "checkpoint not found"),
        (["--inception-weights", "/nonexistent/inception.pth"], "Inception weights file not found"),
        (["--interval", "0.5", "0.2"], "--interval needs 0 <= LO < HI"),
        (["--num-classes", "7"], "does not fit the model"),
    ],
)
def test_bad_input_is_one_line_error(ckpt, tmp_path, extra, message, capsys):
    assert sample_mod.main(base_args(ckpt, tmp_path / "o") + extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_bad_files_are_one_line_errors(ckpt, tmp_path, fake_inception, capsys, monkeypatch):
    """--out on a file, a garbage parts/run.json, an --fid-ref .npz of object arrays, a text file as --ckpt."""
    monkeypatch.setattr(StaticSampler, "run", lambda *a, **k: pytest.fail("sampled despite a bad input"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "o" / "parts").mkdir(parents=True)
    (tmp_path / "o" / "parts" / "run.json").write_bytes(b"\xff\x00 not json")
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(2))
    (tmp_path / "notes.txt").write_text("hello\n")
    cases = [
        (base_args(ckpt, tmp_path / "file"), f"--out {tmp_path / 'file'} exists and is not a directory"),
        (base_args(ckpt, tmp_path / "o", "--no-metrics"), "unreadable run.json"),
        (base_args(ckpt, tmp_path / "o2", "--fid-ref", str(tmp_path / "obj.npz")), f"--fid-ref {tmp_path}"),
        (base_args(ckpt, tmp_path / "o3", "--ckpt", str(tmp_path / "notes.txt")), "cannot read checkpoint"),
    ]
    for argv, message in cases:
        assert sample_mod.main(argv) == 2, message
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("sample.py: error:") and message in lines[0], lines
    assert (tmp_path / "file").read_text() == "x"


def test_overwrite_replaces_a_garbage_run_file(ckpt, tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "run.json").write_text("[1, 2]")
    assert sample_mod.main(base_args(ckpt, tmp_path, "--no-metrics", "--overwrite")) == 0
    assert (tmp_path / "samples.npz").is_file()


def test_cli_errors_without_traceback(ckpt, tmp_path):
    r = run_cli(base_args(ckpt, tmp_path / "o", "--ckpt", str(tmp_path / "missing.pth")))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"sample.py: error: checkpoint not found: {tmp_path / 'missing.pth'}"]
    r = run_cli(base_args(ckpt, tmp_path / "o", "--ema", "ema3"))
    assert r.returncode == 2 and "--ema takes a comma-separated subset" in r.stderr


def test_demo_preset_calls_the_demo_evaluation(ckpt, tmp_path, monkeypatch, capsys):
    """`--preset demo` hands the net and the demo run's sampling settings to jit_fast.sampling.demo_eval."""
    from jit_fast.configs import RUN_PRESETS

    seen = {}

    def evaluate_demo(net, out_dir, cfg, interval, steps, solver, num_classes, seed, **_):
        seen.update(net=net, out_dir=out_dir, cfg=cfg, interval=interval, steps=steps, solver=solver,
                    num_classes=num_classes, seed=seed)
        return {"accuracy": 1.0, "accuracy_target": 0.95, "classifier_accuracy_on_real_heldout": 0.97,
                "diversity_ratio": 0.9, "diversity_target": 0.5, "passed": True, "grid": "g.png"}

    monkeypatch.setattr(sample_mod, "evaluate_demo", evaluate_demo)
    assert sample_mod.main(["--preset", "demo", "--ckpt", str(ckpt), "--out", str(tmp_path / "d")]) == 0
    demo = RUN_PRESETS["demo"]
    assert seen["cfg"] == demo["cfg"] and seen["steps"] == demo["eval_steps"]
    assert seen["interval"] == (demo["interval_min"], demo["interval_max"]) and seen["solver"] == "heun"
    assert seen["num_classes"] == CLASSES and seen["out_dir"] == tmp_path / "d"
    assert isinstance(seen["net"], JiT) and not seen["net"].training
    assert "demo evaluation: PASS: class-conditional accuracy 100.0%" in capsys.readouterr().out
    # explicit flags win over the demo defaults
    assert sample_mod.main(["--preset", "demo", "--ckpt", str(ckpt), "--out", str(tmp_path / "d"), "--cfg", "3",
                            "--steps", "4"]) == 0
    assert seen["cfg"] == 3.0 and seen["steps"] == 4


@pytest.mark.slow
def test_compiled_network_gives_the_eager_samples(ckpt, tmp_path):
    """--compile (inductor on CPU here; inside the CUDA graphs on a GPU) keeps the uint8 samples."""
    extra = ["--no-metrics", "--num-images", "6", "--batch-size", "3", "--steps", "2"]
    assert sample_mod.main(base_args(ckpt, tmp_path / "eager", *extra)) == 0
    assert sample_mod.main(base_args(ckpt, tmp_path / "compiled", *extra, "--compile")) == 0
    eager = load_npz(tmp_path / "eager" / "samples.npz")["images"].astype(int)
    compiled = load_npz(tmp_path / "compiled" / "samples.npz")["images"].astype(int)
    assert np.abs(eager - compiled).max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_cli_equals_eager_cli_on_gpu(ckpt, tmp_path):
    extra = ["--no-metrics", "--device", "cuda", "--num-images", "20"]
    assert sample_mod.main(base_args(ckpt, tmp_path / "graph", *extra)) == 0
    assert sample_mod.main(base_args(ckpt, tmp_path / "eager", *extra, "--no-cuda-graph")) == 0
    graph, eager = (load_npz(tmp_path / d / "samples.npz") for d in ("graph", "eager"))
    assert json.loads((tmp_path / "graph" / "metrics.json").read_text())["timing"]["cuda_graph"] is True
    assert np.array_equal(graph["images"], eager["images"])


def test_sweep_over_a_missing_weight_set_fails_before_sampling(tmp_path, monkeypatch, capsys):
    from jit_fast.checkpoint.weights import export_safetensors

    export_safetensors(tmp_path / "ema1.safetensors", tiny_net().state_dict(),
                       ModelMeta(model="JiT-T/4", img_size=IMG, num_classes=CLASSES), which="ema1")
    monkeypatch.setattr(StaticSampler, "run", lambda *a, **k: pytest.fail("sampled before checking the sets"))
    argv = base_args(tmp_path / "ema1.safetensors", tmp_path / "o", "--no-metrics", "--ema", "ema1,ema2")
    assert sample_mod.main(argv) == 2
    assert "holds the ema1 weights, not ema2" in capsys.readouterr().err
