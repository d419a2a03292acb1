"""Benchmark plumbing on CPU: GPU-suite wiring with a stub timer, the skip path, run -> JSON -> Markdown."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gpu, report, roofline, run
from benchmarks.traffic import count_block


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


def test_op_and_block_wiring_on_cpu() -> None:
    ops = gpu.bench_ops("JiT-T/4", 2, 16, "cpu", timer=_once, paths=("eager", "fused"), peak_bw=1e12)
    assert {(r["op"], r["path"]) for r in ops} == {(o, p) for o in run.OP_NAMES for p in ("eager", "fused")}
    assert all(r["io_bytes_fwd_bwd"] > r["io_bytes_fwd"] > 0 for r in ops)
    blocks = gpu.bench_block("JiT-T/4", 2, 16, "cpu", timer=_once, paths=("eager", "fused"), peak_flops=1e12)
    assert [r["path"] for r in blocks] == ["eager", "fused"]
    assert all(r["mfu_fwd_bwd"] > 0 for r in blocks)


def test_train_step_and_sampling_wiring_on_cpu() -> None:
    steps = gpu.bench_train_step("JiT-T/4", 2, 16, "cpu", timer=_once, paths=("eager", "fused"), peak_flops=1e12)
    assert [r["img_per_s"] for r in steps] == [2000.0, 2000.0]
    rows = gpu.bench_sampling("JiT-T/4", 2, 16, "cpu", steps=2, configs=(("fused", False),))
    assert rows[0]["img_per_s"] > 0 and rows[0]["cuda_graph"] is False


def test_roofline_is_max_of_compute_memory_and_floor() -> None:
    c = count_block("JiT-B/16", "eager", 128)
    a = roofline.DEFAULT_ASSUMPTIONS
    for r in c.records:
        t = roofline.op_time(r, roofline.H100, a)
        assert t >= r.bytes / (roofline.H100.hbm_bytes_per_s * a.bandwidth_efficiency)
        assert t >= a.min_kernel_s * r.launches
        if r.category == "gemm":
            assert t >= r.flops / (roofline.H100.peak_bf16_flops * a.gemm_efficiency)


def test_run_writes_json_and_markdown(tmp_path) -> None:
    assert run.main(["--model", "JiT-T/4", "--batch", "2", "--img-size", "16", "--no-cpu", "--no-inductor",
                     "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*.json")
    res = json.loads(js.read_text())
    assert set(res["modeled"]["blocks"]) == {"JiT-T/4", *run.BLOCK_MODELS}
    md = js.with_suffix(".md").read_text()
    if not torch.cuda.is_available():
        assert "GPU timings: not taken" in md and "Measured on **" not in md
    assert "Modeled, not measured" in md
    doc = report.build_document(tmp_path)
    assert doc.startswith("# Performance") and md.strip() in doc
