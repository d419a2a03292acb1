"""Benchmark plumbing on CPU: GPU-suite wiring with a stub timer, the skip path, run -> JSON -> Markdown."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu, ops, report, run
from jit_fast.perf import roofline
from jit_fast.perf.traffic import count_block


def _once(fn) -> float:
    """Stub timer: executes the closure once (proving it runs) and returns a fixed 1 ms; never reported."""
    fn()
    return 1.0


def test_gpu_suite_skips_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.run_gpu_suite("JiT-T/4", 2, 16) == {"skipped": gpu.SKIP_MESSAGE}


def test_gpu_spec_lookup() -> None:
    assert gpu.gpu_spec("NVIDIA H100 80GB HBM3") is roofline.H100
    assert gpu.gpu_spec("NVIDIA A100-SXM4-80GB") is roofline.A100
    assert gpu.gpu_spec("Tesla T4") is None
    assert gpu.gpu_spec("NVIDIA A100-PCIE-40GB") is None and gpu.gpu_spec("NVIDIA H100 PCIe") is None


@pytest.fixture(scope="module")
def stub_gpu_section() -> dict:
    """Every GPU bench function run on CPU with the stub timer (a wiring check, not a measurement)."""
    return dict(
        device="STUB-NOT-A-GPU",
        datasheet=None,
        torch=torch.__version__,
        ops=gpu.bench_ops("JiT-T/4", 2, 16, "cpu", timer=_once, paths=("eager", "fused"), peak_bw=1e12),
        block=gpu.bench_block("JiT-T/4", 2, 16, "cpu", timer=_once, paths=("eager", "fused"), peak_flops=1e12),
        train_step=gpu.bench_train_step("JiT-T/4", 2, 16, "cpu", timer=_once, paths=("eager", "fused"),
                                        peak_flops=1e12),
        sampling=gpu.bench_sampling("JiT-T/4", 2, 16, "cpu", steps=2, configs=(("fused", False),)),
        data=gpu.bench_data(32, 4, images=24, batches=2, workers=1, backends=("torch",)),
    )


def test_gpu_bench_wiring_on_cpu(stub_gpu_section: dict) -> None:
    g = stub_gpu_section
    assert {(r["op"], r["path"]) for r in g["ops"]} == {(o, p) for o in ops.case_entries() for p in ("eager", "fused")}
    assert {(r["op"], r["case"], r["path"]) for r in g["ops"]} == {
        (c.entry, c.label, p) for c in ops.model_cases("JiT-T/4", 2, 16) for p in ("eager", "fused")}
    assert all(r["io_bytes_fwd_bwd"] > r["io_bytes_fwd"] > 0 for r in g["ops"])
    assert [r["path"] for r in g["block"]] == ["eager", "fused"]
    assert all(r["mfu_fwd_bwd"] > 0 for r in g["block"])
    assert [r["img_per_s"] for r in g["train_step"]] == [2000.0, 2000.0]
    assert g["sampling"][0]["img_per_s"] > 0 and g["sampling"][0]["cuda_graph"] is False
    assert g["data"]["torch"]["images_per_s"] > 0


def test_roofline_is_max_of_compute_memory_and_floor() -> None:
    c = count_block("JiT-B/16", "eager", 128)
    a = roofline.DEFAULT_ASSUMPTIONS
    for r in c.records:
        t = roofline.op_time(r, roofline.H100, a)
        assert t >= r.bytes / (roofline.H100.hbm_bytes_per_s * a.bandwidth_efficiency)
        assert t >= a.min_kernel_s * r.launches
        if r.category == "gemm":
            assert t >= r.flops / (roofline.H100.peak_bf16_flops * a.gemm_efficiency)


def test_run_writes_json_and_markdown(tmp_path, stub_gpu_section: dict) -> None:
    assert run.main(["--model", "JiT-T/4", "--batch", "2", "--img-size", "16", "--no-cpu", "--no-inductor",
                     "--block-models", "JiT-H/16", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*.json")
    res = json.loads(js.read_text())
    standard = {"JiT-T/4", "JiT-H/16"}
    expected = standard | {f"{b} (bf16 params)" for b in standard} | {"JiT-H/16 (dropout block)"}
    assert set(res["modeled"]["blocks"]) == expected
    md = js.with_suffix(".md").read_text()
    if not torch.cuda.is_available():
        assert "GPU timings: not taken" in md and "Measured on **" not in md
    assert "Modeled, not measured" in md
    doc = report.build_document(tmp_path)
    assert doc.startswith("# Performance") and md.strip() in doc
    res["gpu"] = stub_gpu_section  # rendering check only; never written to results
    gpu_md = report.render_result(res)
    assert "Measured on **STUB-NOT-A-GPU**" in gpu_md and "Sections that failed" not in gpu_md


@pytest.mark.slow
def test_plans_write_json_and_the_report_renders_them(tmp_path) -> None:
    """benchmarks.plans on a tiny preset: one JSON with every path and the sampling estimate; the report's plan
    section shows its step times and states whether the targets are reached. The compiled block (inductor's fused
    kernels) moves fewer bytes than the eager one but runs the same GEMMs and attention, so the compiled step lies
    between their floor and the eager step."""
    from benchmarks import plans
    from jit_fast.perf.traffic import Count, count_train_step

    out = tmp_path / "plans"
    assert plans.main(["--models", "JiT-T/4", "--img-size", "32", "--gpus", "1", "--global-batch", "8",
                       "--epochs", "1", "--sample-batch", "2", "--out", str(out)]) == 0
    (js,) = out.glob("*.json")
    res = json.loads(js.read_text())
    paths = res["presets"]["JiT-T/4"]["plan"]["paths"]
    assert set(paths) == {"eager", "compiled", "fused", "fused+fp8 tensorwise", "fused+fp8 rowwise"}
    floor = Count(meta={}, records=[r for r in count_train_step("JiT-T/4", "eager", 8, 32).records
                                    if r.category in ("gemm", "attention")])
    assert roofline.project(floor, roofline.H100)["seconds"] < paths["compiled"]["step_s"] < paths["eager"]["step_s"]
    assert res["modeled"] is True and res["calibration"]["model"] == "JiT-G/32"
    doc = report.build_document(tmp_path)
    assert "## Modeled training plans: 1 x H100" in doc and f"{paths['fused']['step_s'] * 1e3:.0f}" in doc
    assert "Targets in the model: a step 1.5x the compiled official release is" in doc


@pytest.mark.slow
def test_inductor_proxy_scales_and_models() -> None:
    """The compiled-block proxy on a tiny preset: both compiles agree, bytes grow with the batch, it projects."""
    from jit_fast.perf.compiled import compiled_block_count, inductor_cpu_proxy

    p = inductor_cpu_proxy("JiT-T/4", img_size=16, batch=8)
    assert all(v["kernels"] > 0 and v["extern_calls"] > 0 for v in p["phases"].values())
    c = compiled_block_count(p)
    assert c.totals()["launches"] > 0 and roofline.project(c, roofline.H100)["seconds"] > 0


def test_command_lines(capsys: pytest.CaptureFixture) -> None:
    from jit_fast.perf import traffic

    assert traffic.main(["--model", "JiT-B/16", "--path", "fused", "--batch", "4", "--top", "40"]) == 0
    assert "jit_fast::" in capsys.readouterr().out
    assert roofline.main(["--model", "JiT-T/4", "--batch", "2", "--img-size", "16", "--block"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("MODELED (not measured)") and "modeled speedup fused vs eager" in out


@pytest.mark.slow
def test_full_cpu_run_completes(tmp_path) -> None:
    """Issue 7: `python -m benchmarks.run --model JiT-B/16 --batch 128` completes on a CPU (its wall time is
    printed, not asserted: a busy CI machine is no fault of the code)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU-only budget applies on CPU-only machines")
    assert run.main(["--model", "JiT-B/16", "--batch", "128", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*.json")
    res = json.loads(js.read_text())
    print(f"benchmarks.run took {res['seconds']:.0f}s")
    assert res["gpu"] == {"skipped": gpu.SKIP_MESSAGE}
    assert "heun_step_null_net" in res["cpu_measured"]["sampler"]["seconds"]


def test_source_fingerprint_tracks_kernels_and_model(tmp_path) -> None:
    """The hash covers jit_kernels/*.py and jit_fast/model/network.py, and any byte change of one of them changes it."""
    for rel in ("jit_kernels/a.py", "jit_kernels/b.py", "jit_fast/model/network.py", "jit_fast/train/trainer.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    assert [p.relative_to(tmp_path).as_posix() for p in report.source_files(tmp_path)] == [
        "jit_kernels/a.py", "jit_kernels/b.py", "jit_fast/model/network.py"]
    before = report.source_fingerprint(tmp_path)["sources_sha256"]
    (tmp_path / "jit_fast/train/trainer.py").write_text("# not a source of the numbers\n")
    assert report.source_fingerprint(tmp_path)["sources_sha256"] == before
    (tmp_path / "jit_kernels/b.py").write_text("# b.py \n")
    assert report.source_fingerprint(tmp_path)["sources_sha256"] != before
    assert len(before) == 64 and report.source_fingerprint()["commit"] == run.git_commit(short=False)


def test_report_warns_on_stale_results(tmp_path, capsys) -> None:
    """benchmarks.report warns on stderr for a result whose kernel/model hash differs or is missing, not otherwise."""
    res = json.loads((report.RESULTS_DIR / "JiT-B-16_b128_256_cpu.json").read_text())
    current = report.source_fingerprint()
    results = tmp_path / "results"
    results.mkdir()
    (results / "fresh.json").write_text(json.dumps(dict(res, source=dict(current, commit="0" * 40))))
    assert report.main(["--results", str(results), "--out", str(tmp_path / "PERF.md")]) == 0
    assert "STALE" not in capsys.readouterr().err  # another commit with identical sources is not stale
    (results / "old.json").write_text(json.dumps(dict(res, source=dict(current, sources_sha256="f" * 64))))
    (results / "unknown.json").write_text(json.dumps({k: v for k, v in res.items() if k != "source"}))
    assert report.main(["--results", str(results), "--out", str(tmp_path / "PERF.md")]) == 0
    err = capsys.readouterr().err
    stale = [line for line in err.splitlines() if line.startswith("WARNING: STALE BENCHMARK RESULT")]
    assert len(stale) == 2 and "old.json" in stale[0] and "unknown.json" in stale[1]
    assert "ffffffffffff" in stale[0] and current["sources_sha256"][:12] in stale[0]
    assert "records no source hash" in stale[1]


def test_refused_paths_from_selfcheck_failures() -> None:
    assert gpu.refused_paths(set()) == {}
    assert gpu.refused_paths({"swiglu"}) == {"swiglu": ("fused",), "aggregate": ("fused",)}
    assert gpu.refused_paths({"sampler"}) == {"aggregate": ("fused",)}


def test_bench_ops_does_not_time_refused_paths() -> None:
    rows = gpu.bench_ops("JiT-T/4", 2, 16, "cpu", timer=_once, paths=("eager", "fused"),
                         refused={"swiglu": ("fused",)})
    assert ("swiglu", "fused") not in {(r["op"], r["path"]) for r in rows}
    assert {(r["op"], r["path"]) for r in rows} >= {("swiglu", "eager"), ("qk_norm_rope", "fused")}


def test_gpu_suite_runs_selfcheck_first_and_refuses_failed_fused_paths(monkeypatch) -> None:
    """With a (stubbed) CUDA device whose selfcheck fails swiglu: nothing fused is timed but the other ops'
    fused rows; the result records the selfcheck and the refusal. Every bench function is a recording stub."""
    calls: list[tuple] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "STUB-NOT-A-GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    failing = dict(passed=False, failed_ops=["swiglu"], seconds=1.0,
                   checks=[dict(name="swiglu bf16 M=2304 h=2048", ops=["swiglu"], passed=False, detail="x")])
    monkeypatch.setattr(gpu, "_selfcheck", lambda: calls.append(("selfcheck",)) or failing)
    for fn in ("bench_ops", "bench_block", "bench_train_step", "bench_sampling", "bench_data"):
        monkeypatch.setattr(gpu, fn, lambda *a, _fn=fn, **kw: calls.append((_fn, kw)) or [])
    out = gpu.run_gpu_suite("JiT-T/4", 2, 16)
    assert calls[0] == ("selfcheck",)
    kw = {c[0]: c[1] for c in calls[1:]}
    assert kw["bench_ops"]["refused"] == {"swiglu": ("fused",), "aggregate": ("fused",)}
    assert kw["bench_block"]["paths"] == kw["bench_train_step"]["paths"] == ("eager", "compiled")
    assert kw["bench_sampling"]["configs"] == (("eager", False),)
    assert out["selfcheck"]["passed"] is False and out["refused"]["swiglu"] == ["fused"]
    out["ops"], out["block"] = [], []
    md = report.render_result(dict(json.loads((report.RESULTS_DIR / "JiT-B-16_b128_256_cpu.json").read_text()),
                                   gpu=out))
    assert "FAILED swiglu bf16 M=2304 h=2048" in md and "swiglu fused" in md


def test_ops_cases_follow_the_registry_at_model_shapes() -> None:
    """benchmarks.ops builds its cases from every registered op's spec, at the block shapes of the model asked for."""
    from jit_kernels import op_specs

    cases, sizes = ops.model_cases("JiT-B/16", 4, 256), ops.model_sizes("JiT-B/16", 4, 256)
    assert {c.entry for c in cases} == {c.entry for s in op_specs() for c in s.cases(sizes)}
    labels = {c.label for c in cases}
    assert "B=4 N=288 D=768 bias" in labels and "B=4 N=288 H=12 Dh=64" in labels and "M=1152 h=2048" in labels


def test_ops_cli_without_cuda_runs_interpreter_numerics(monkeypatch, tmp_path, capsys) -> None:
    """Without CUDA nothing is timed: the cases' numerics run interpreted, one line each, and a failing case makes
    the exit status 1 (here restricted to the fp32 SwiGLU cases to stay fast)."""
    from jit_kernels import selfcheck as sc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    only = [c for c in sc.op_checks("cpu", ops.CPU_SIZES) if c.name.startswith("swiglu fp32")]
    monkeypatch.setattr(ops, "op_checks", lambda device, sizes: only)
    out = tmp_path / "ops.json"
    assert ops.main(["--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nothing was timed" in text and text.count("PASS  swiglu fp32") == 2
    assert [r["passed"] for r in json.loads(out.read_text())] == [True, True]
    monkeypatch.setattr(ops, "op_checks", lambda device, sizes: [sc.Check("broken", ("swiglu",), lambda: 1 / 0)])
    assert ops.main([]) == 1 and "FAIL  broken" in capsys.readouterr().out


def test_attention_bench_times_every_backend_the_gpu_runs(monkeypatch) -> None:
    """Wiring on CPU: on a faked sm_90 with flash-attn-3 'installed' as a stand-in that runs SDPA, the bench
    lists it (at the padded head dim of JiT-H) beside SDPA; on a faked sm_75 only SDPA is timed."""
    from jit_fast.model import attention as A

    fa3 = A.Backend("flash-attn-3", A.HOPPER, False, (64, 96, 128), A._sdpa, lambda: True)
    monkeypatch.setattr(A, "BACKENDS", (fa3,))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    res = gpu.bench_attention("JiT-H/32", 1, 64, "cpu", timer=_once)
    assert res["head_dim"] == 80 and list(res["backends"]) == ["flash-attn-3", "sdpa"]
    assert res["backends"]["flash-attn-3"]["head_dim"] == 96 and res["backends"]["sdpa"]["head_dim"] == 80
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in res["backends"].values())
    lines = "\n".join(report._measured_gpu(dict(command="c", created="t", gpu=dict(device="STUB", torch="x",
                                                                                   attention=res))))
    assert "| flash-attn-3 | 96 | 1.000 | 1.000 |" in lines and "| sdpa | 80 |" in lines
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert list(gpu.bench_attention("JiT-H/32", 1, 64, "cpu", timer=_once)["backends"]) == ["sdpa"]
