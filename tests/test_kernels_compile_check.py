"""Ahead-of-time compilation of the kernels for sm_90a / sm_80 (`python -m kernels.compile_check`).

Runs in subprocesses without TRITON_INTERPRET: with the interpreter on, @triton.jit builds
interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "kernels.compile_check", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)


def test_compile_check_small_subset():
    res = run("--kernel", "sum_rows")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "sm_90a" in res.stdout and "sm_80" in res.stdout
    assert "8 compiles, 8 ok, 0 failed" in res.stdout  # 4 output variants x 2 archs


def test_reexecs_without_interpreter():
    """Started with TRITON_INTERPRET=1 it re-runs itself compiled instead of failing or interpreting."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--kernel", "sum_rows", "--arch", "80"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 compiles, 4 ok" in res.stdout


def test_spilling_config_is_reported_as_failure():
    """A deliberately oversized tile spills; the checker must flag it (the check can fail)."""
    code = (
        "import triton\n"
        "from kernels.compile_check import compile_one, format_table\n"
        "from kernels import swiglu\n"
        "spec = next(s for s in swiglu.compile_specs() if s.name == 'swiglu_bwd')\n"
        "big = triton.Config({'BLOCK_M': 16, 'BLOCK_H': 512, 'ROWS_PER_PROG': 64}, num_warps=1, num_stages=1)\n"
        "r = compile_one(type(spec)(spec.name, spec.fn, spec.signature, spec.constexprs, big, spec.int_args), 80)\n"
        "print(format_table([r]))\n"
        "assert r.spill_stores > 0 and not r.ok, r\n"
    )
    res = run(code=code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SPILL" in res.stdout


@pytest.mark.slow
def test_compile_check_every_kernel_and_config():
    res = run()
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert " 0 failed" in res.stdout
    for kernel in ("rmsnorm_modulate_fwd", "rmsnorm_modulate_bwd", "qk_norm_rope_fwd", "qk_norm_rope_bwd",
                   "swiglu_fwd", "swiglu_bwd", "sum_rows"):
        assert kernel in res.stdout
