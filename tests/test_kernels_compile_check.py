"""Ahead-of-time compilation of the kernels for every target, sm_75 to sm_90a (`python -m jit_kernels.compile_check`).

Compiles run in subprocesses without TRITON_INTERPRET: with the interpreter on, @triton.jit builds
interpreter objects that cannot be compiled. The coverage tests need no compiler: they run the real model
on fake tensors in every dtype regime with each custom op routed to its CUDA kernel (`jit_kernels.spec.LaunchHelpers`),
record the signature of every Triton launch (`compile_check.launch_key`) and require each to be among the
compile jobs of its dtype class.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.runtime.jit import KernelInterface

import jit_fast
from jit_kernels.compile_check import all_specs, launch_key, spec_key
from jit_kernels.spec import LaunchHelpers

ROOT = Path(__file__).resolve().parents[1]

# How the model can run the kernels (autocast dtype, block parameter dtype, backward), named as the dtype
# classes of `jit_kernels.compile_check.DTYPE_CLASSES`. Written from the training / sampling code, not from the specs:
# training autocasts bf16 or fp16 (or runs fp32), FSDP2 gathers block parameters in the autocast dtype
# (`distributed.prepare_model`, root parameters stay fp32), sampling runs the forward of the same regimes.
REGIMES = {
    "fp32": (None, None, True),
    "bf16-act+fp32-param": (torch.bfloat16, None, True),
    "bf16-param": (torch.bfloat16, torch.bfloat16, True),
    "fp16-act+fp32-param": (torch.float16, None, True),
    "fp16-param": (torch.float16, torch.float16, True),
}


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "jit_kernels.compile_check", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


class Recorder:
    """Signatures of the Triton launches made while running each regime."""

    def __init__(self) -> None:
        self.regime = ""
        self.keys: dict[str, set] = defaultdict(set)

    def launch(self, kernel, args: tuple, kwargs: dict) -> None:
        self.keys[self.regime].add(launch_key(kernel, args, kwargs))


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    """Every `kernel[grid](...)` records its signature instead of launching."""
    rec = Recorder()
    monkeypatch.setattr(KernelInterface, "__getitem__", lambda kernel, grid: lambda *a, **kw: rec.launch(kernel, a, kw))
    return rec


def run_model(preset: str, regime: str, bias: bool) -> None:
    """One forward (and backward) of a 4-block `preset` on fake tensors through the CUDA kernels: block 0 without
    a pending residual, dropout blocks 1-2 (fused dropout in training, in norm2's residual op and SwiGLU), in-context
    tokens at block 2, the final layer; `bias=False` removes the qkv, proj and w12 biases (the fused ops then run
    without folded biases). Training regimes run in train mode, the sampling regime in eval mode (no dropout)."""
    amp, param_dtype, backward = REGIMES[regime]
    with FakeTensorMode():
        net = jit_fast.build_model(preset, kernels="triton", depth=4, in_context_start=2, proj_drop=0.2)
        net.train(backward)
        if not bias:
            for block in net.blocks:
                block.attn.qkv.bias = block.attn.proj.bias = block.mlp.w12.bias = None
        if param_dtype is not None:
            for p in net.blocks.parameters():
                p.data = p.data.to(param_dtype)
        x, t, y = torch.randn(2, 3, 256, 256), torch.rand(2), torch.randint(0, 1000, (2,))
        with LaunchHelpers(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            with torch.set_grad_enabled(backward):
                out = net(x, t, y)
            if backward:
                out.float().sum().backward()


def launched(record: Recorder, presets: tuple[str, ...]) -> Iterator[tuple[str, set]]:
    """(regime, recorded launch signatures) for every regime, over `presets` with and without biases."""
    for regime in REGIMES:
        record.regime = regime
        for preset in presets:
            for bias in (True, False):
                run_model(preset, regime, bias)
        yield regime, record.keys[regime]


def assert_covered(record: Recorder, presets: tuple[str, ...]) -> None:
    specs = list(all_specs())
    assert {s.dtype_class for s in specs} == set(REGIMES)
    for regime, keys in launched(record, presets):
        assert keys, regime
        compiled = {spec_key(s) for s in specs if s.dtype_class == regime}
        missing = sorted(keys - compiled, key=str)
        assert not missing, f"{regime}: {len(missing)} launch signatures have no compile job, e.g. {missing[:3]}"


def test_launch_signatures_are_compiled(record):
    """JiT-B/16 (D 768, Dh 64 x 12 heads, h 2048) and JiT-G/16 (D 1664, Dh 104, h 4437): both rmsnorm size
    classes, both qk size classes, both SwiGLU width divisibilities, in every dtype regime."""
    assert_covered(record, ("JiT-B/16", "JiT-G/16"))


@pytest.mark.slow
def test_launch_signatures_are_compiled_every_preset(record):
    assert_covered(record, ("JiT-B/16", "JiT-L/16", "JiT-H/16", "JiT-G/16"))


def test_coverage_check_can_fail(record):
    """Without the FSDP2 class's jobs, its launches (bf16 norm weights and biases) are not covered."""
    specs = list(all_specs(["fp32", "bf16-act+fp32-param"]))
    record.regime = "bf16-param"
    run_model("JiT-B/16", "bf16-param", True)
    keys = record.keys["bf16-param"]
    assert keys - {spec_key(s) for s in specs}
    assert keys <= {spec_key(s) for s in all_specs(["bf16-param"])}


def test_compile_check_small_subset():
    res = run("--kernel", "sum_rows", "--dtype-class", "bf16-act+fp32-param", "--arch", "90", "80")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sm_90a" in res.stdout and "sm_80" in res.stdout
    assert "6 distinct binaries" in res.stdout  # 8 launch signatures, 2 pairs share a binary
    assert "12 compiles, 12 ok, 0 failed" in res.stdout
    assert "spilled bytes 0" in res.stdout


def test_turing_target_runs_no_bf16():
    """sm_75 (no bf16) compiles the fp16 and fp32 classes only: a bf16-only job list has nothing for it."""
    res = run("--kernel", "sum_rows", "--dtype-class", "bf16-act+fp32-param", "fp16-param", "--arch", "75",
              "--sample")
    assert res.returncode == 0, res.stdout + res.stderr
    table = res.stdout.split("signature classes")[0]
    assert "fp16-param" in table and "bf16" not in table
    assert target_rows(res.stdout)["sm_75"][:2] == ["sm_75", "fp16"]


def test_compile_check_representative_sample():
    """One launched config per kernel and dtype class, sm_90a: every class compiles with 0 spills (all: slow test)."""
    res = run("--sample", "--arch", "90")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    table = res.stdout.split("signature classes\n")[1].split("\n\n")[0].splitlines()
    rows = {line.split()[0]: line.split() for line in table[1:] if line[0] != "-"}
    # columns: kernel, fp32, bf16-act+fp32-param, bf16-param, fp16-act+fp32-param, fp16-param, bias, no-bias,
    # compiles, max regs, spilled B, max smem B
    for kernel, row in rows.items():
        if kernel != "total":
            assert min(int(v) for v in row[1:6]) >= 1, row  # every kernel compiled in every class
    assert len(rows) == 9 and rows["total"][10] == "0", table  # 8 kernels + total; 0 spilled bytes


def test_reexecs_without_interpreter():
    """Started with TRITON_INTERPRET=1 it re-runs itself compiled instead of failing or interpreting."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "jit_kernels.compile_check", "--kernel", "sum_rows", "--arch", "80",
                          "--dtype-class", "fp32"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "6 compiles, 6 ok" in res.stdout


def test_spilling_config_is_reported_as_failure():
    """A deliberately oversized tile spills; the checker must flag it (the check can fail)."""
    code = (
        "import triton\n"
        "from jit_kernels.compile_check import compile_one, format_table\n"
        "from jit_kernels.spec import DTYPE_CLASSES\n"
        "from jit_kernels.swiglu import compile_jobs\n"
        "import dataclasses\n"
        "spec = next(s for s in compile_jobs(DTYPE_CLASSES) if s.name == 'swiglu_bwd')\n"
        "big = triton.Config({'BLOCK_M': 16, 'BLOCK_H': 512, 'ROWS_PER_PROG': 64}, num_warps=1, num_stages=1)\n"
        "r = compile_one(dataclasses.replace(spec, config=big), 80)\n"
        "print(format_table([r]))\n"
        "assert r.spill_stores > 0 and not r.ok, r\n"
    )
    res = run(code=code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SPILL" in res.stdout


def target_rows(stdout: str) -> dict[str, list[str]]:
    """The per-target summary of a compile_check report: {target: [target, precisions, compiles, ok, failed, ...]}."""
    targets = stdout.split("\ntargets\n")[1].split("\n\n")[0].splitlines()
    return {line.split()[0]: line.split() for line in targets[2:] if line.startswith("sm_")}


@pytest.mark.slow
def test_compile_check_every_kernel_and_config():
    """Every binary for sm_90a, one launched config per kernel and class for sm_80, sm_89, sm_86 and sm_75 (the
    full matrix for all five targets, 1928 compiles, is the manual `python -m jit_kernels.compile_check`: too slow for
    the suite's budget)."""
    res = run("--arch", "90")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert " 0 failed" in res.stdout and "spilled bytes 0" in res.stdout
    summary = res.stdout.split("signature classes\n")[1].split("\n\n")[0]
    for kernel in ("rmsnorm_modulate_fwd", "rmsnorm_modulate_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd", "qk_sum",
                   "swiglu_fwd", "swiglu_bwd", "sum_rows"):
        row = next(line for line in summary.splitlines() if line.startswith(kernel + " ")).split()
        assert all(int(v) > 0 for v in row[1:6]), row  # every class compiled for every kernel
    res = run("--sample", "--arch", "80", "89", "86", "75")
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = target_rows(res.stdout)
    assert set(rows) == {"sm_80", "sm_89", "sm_86", "sm_75"}, rows
    assert rows["sm_75"][1] == "fp32,fp16" and all(r[4] == r[6] == "0" for r in rows.values()), rows


def test_per_target_overrides_reach_launches_and_compiles(monkeypatch):
    """A config's per-target options (a register cap ptxas needs on sm_75 only) are what the launch helpers pass on
    such a GPU and what compile_check compiles for that target; other targets keep the config's own."""
    from jit_kernels import _common
    from jit_kernels import compile_check as cc
    from jit_kernels import rmsnorm_modulate as rm

    cfg = rm.BWD_CONFIGS[1024][0]
    assert cfg.maxnreg == 40 and cc._compile_options(cfg, 80)["maxnreg"] == 40
    assert cc._compile_options(cfg, 75)["maxnreg"] == 64 and cc._compile_options(cfg)["maxnreg"] == 40
    assert _common.launch_options(cfg)["maxnreg"] == 40  # interpreter: no device
    monkeypatch.setattr(_common, "triton_on_cpu", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for capability, want in (((7, 5), 64), ((8, 0), 40)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        _common._capability.cache_clear()
        try:
            assert _common.launch_options(cfg)["maxnreg"] == want
        finally:
            _common._capability.cache_clear()
