"""The planner and the FP8 step model: memory figures are the memory plan's, step times the roofline of the counted
step, FP8 the counted block-linear GEMMs at the FP8 peak plus their casts; the CLI answers from any directory and
refuses bad flags in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from train_helpers import subprocess_env

import jit_fast
from jit_fast import memory_plan as mp
from jit_fast import plan
from jit_fast.model import fp8 as model_fp8
from jit_fast.perf.float8 import RECIPES, fp8_count
from jit_fast.perf.roofline import A100, H100, PURE_ROOFLINE, op_time, project
from jit_fast.perf.traffic import Count, count_train_step

SMALL = dict(model="JiT-B/16", img_size=64, epochs=2, dataset_size=4096)


def seconds(count: Count, phases: tuple[str, ...] | None = None) -> float:
    """Roofline seconds of `count` on an H100 (only `phases` when given)."""
    if phases is not None:
        count = Count(meta=count.meta, records=[r for r in count.records if r.phase in phases])
    return project(count, H100)["seconds"]


def test_memory_figures_are_the_memory_plans():
    p = plan.plan_run(gpus=4, global_batch=32, compiled=False, **SMALL)
    mem = mp.plan("JiT-B/16", 8, 64, "bf16", "triton", False, 4)
    budget = H100.memory_bytes
    assert (p.peak_bytes, p.largest_batch, p.largest_batch_checkpointed) == (
        mem.peak(), mem.largest_batch(budget), mem.largest_batch(budget, True))
    assert p.fits and (p.grad_accum, p.micro_batch) == (1, 8)


def test_one_gpu_step_is_the_roofline_of_the_counted_train_step():
    """One GPU, no FSDP: the step is the roofline of the whole counted step (loss, backward, AdamW, two EMAs)."""
    p = plan.plan_run(gpus=1, global_batch=8, compiled=False, **SMALL)
    assert p.steps == 2 * (4096 // 8)
    for path in ("eager", "fused"):
        whole = count_train_step("JiT-B/16", path, 8, 64)
        t = p.path(path)
        assert t.step_s == pytest.approx(seconds(whole), rel=1e-9)
        assert t.img_per_s_per_gpu == pytest.approx(8 / t.step_s, rel=1e-12)
        assert t.days == pytest.approx(p.steps * t.step_s / 86400, rel=1e-12)
        flops = sum(r.model_flops for r in whole.records)
        assert t.mfu == pytest.approx(flops / (t.step_s * H100.peak_bf16_flops), rel=1e-9)
    assert p.path("fused").step_s < p.path("eager").step_s


@pytest.mark.slow
def test_fsdp_steps_computes_with_bf16_weights_and_shards_the_optimizer():
    one = plan.plan_run(gpus=1, global_batch=8, compiled=False, **SMALL)
    eight = plan.plan_run(gpus=8, global_batch=64, compiled=False, **SMALL)
    for path in ("eager", "fused"):
        fwd_bwd = seconds(count_train_step("JiT-B/16", path, 8, 64, optimizer=False, param_dtype=torch.bfloat16))
        fwd_bwd_fp32 = seconds(count_train_step("JiT-B/16", path, 8, 64, optimizer=False))
        opt_one, opt_eight = one.path(path).step_s - fwd_bwd_fp32, eight.path(path).step_s - fwd_bwd
        assert 0 < opt_eight < opt_one, (path, opt_eight, opt_one)


def test_a_batch_that_does_not_fit_is_accumulated_over_micro_batches_that_do():
    mem = mp.plan("JiT-B/16", 24, 64, "bf16", "triton", False, 1)
    base = mem.activations[False] - mem.per_sample[False] * 24
    budget_gb = (mem.fixed_bytes + base + 5.5 * mem.per_sample[False]) / 2**30  # fits 5, not 6
    p = plan.plan_run(gpus=1, global_batch=24, memory_gb=budget_gb, compiled=False, **SMALL)
    assert not p.fits and p.largest_batch == 5
    assert (p.grad_accum, p.micro_batch) == (6, 4)  # the fewest micro-steps whose micro-batch divides 24 and fits
    whole = count_train_step("JiT-B/16", "fused", 4, 64)
    expected = 6 * seconds(whole, ("fwd", "bwd")) + seconds(whole, ("opt",))
    assert p.path("fused").step_s == pytest.approx(expected, rel=1e-9)
    assert p.path("fused").img_per_s_per_gpu == pytest.approx(24 / expected, rel=1e-9)


def block_linears(model: str, img_size: int) -> list[tuple[int, int, int]]:
    """(tokens, in features, out features) of every block linear FP8 converts (model.fp8's definition)."""
    net = jit_fast.build_model(model, img_size=img_size)
    cfg = net.cfg
    out = []
    for name, m in net.named_modules():
        if model_fp8.is_block_linear(name):
            in_context = int(name.split(".")[1]) >= cfg.in_context_start
            out.append((cfg.grid_size**2 + in_context * cfg.in_context_len, m.in_features, m.out_features))
    return out


@pytest.mark.parametrize("path", ["eager", "fused"])
def test_the_counter_finds_every_block_linear_gemm_and_nothing_else(path):
    """Forward: one GEMM per block linear with 2*B*T*in*out FLOPs; backward: its two gradient GEMMs, twice that.
    The adaLN, embedder and final-layer GEMMs stay untagged (they stay bf16 under --fp8)."""
    batch = 2
    linears = block_linears("JiT-B/16", 64)
    c = count_train_step("JiT-B/16", path, batch, 64)
    tagged = [r for r in c.records if r.block_linear]
    fwd = [r for r in tagged if r.phase == "fwd"]
    bwd = [r for r in tagged if r.phase == "bwd"]
    expected = sum(2 * batch * t * i * o for t, i, o in linears)
    assert (len(fwd), len(bwd)) == (len(linears), 2 * len(linears)) == (48, 96)
    assert sum(r.flops for r in fwd) == expected and sum(r.flops for r in bwd) == 2 * expected
    untagged = {r.region for r in c.records if r.category == "gemm" and r.phase == "fwd" and not r.block_linear}
    assert {"final_layer.linear", "blocks.0.adaLN_modulation.1", "t_embedder.mlp.0"} <= untagged


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_count_reads_operands_in_one_byte_and_adds_each_linears_casts(recipe):
    """Per linear with input x (B*T x in), weight w (in x out) and output gradient g (B*T x out), in elements:
    forward casts x and w (amax 2 + cast 3 bytes each), backward casts g once into both layouts (2 + 4) and
    casts x and w again (3 each; rowwise also takes their amax, 2 each)."""
    batch = 2
    c = count_train_step("JiT-B/16", "fused", batch, 64, param_dtype=torch.bfloat16)
    f = fp8_count(c, recipe)
    extra = 2 if recipe == "rowwise" else 0
    expected_bytes = 0
    for t, i, o in block_linears("JiT-B/16", 64):
        ex, ew, eg = batch * t * i, i * o, batch * t * o
        expected_bytes += (5 + 3 + extra) * (ex + ew) + 6 * eg
    casts = [r for r in f.records if r.op.startswith("fp8::")]
    assert sum(r.bytes for r in casts) == expected_bytes
    assert sum(r.launches for r in casts) == (10 if recipe == "rowwise" else 8) * 48
    gemms = [r for r in f.records if r.fp8]
    originals = [r for r in c.records if r.block_linear]
    assert len(gemms) == len(originals) and all(g.flops == o.flops for g, o in zip(gemms, originals, strict=True))
    assert all(o.bytes_read - g.bytes_read == g.gemm_mnk[0] * g.gemm_mnk[1] + g.gemm_mnk[1] * g.gemm_mnk[2]
               for g, o in zip(gemms, originals, strict=True))
    assert [r for r in f.records if not r.fp8 and not r.op.startswith("fp8::")] == \
        [r for r in c.records if not r.block_linear]


def test_fp8_gemms_take_the_fp8_peak_and_the_a100_has_none():
    c = count_train_step("JiT-B/16", "fused", 2, 64, param_dtype=torch.bfloat16)
    f = fp8_count(c)
    r = next(r for r in f.records if r.fp8)
    assert op_time(r, H100, PURE_ROOFLINE) == max(r.flops / 1979e12, r.bytes / 3.35e12)
    with pytest.raises(ValueError, match="no FP8 tensor cores"):
        project(f, A100)


def test_cli_prints_json_from_outside_the_checkout(tmp_path):
    args = ["--model", "JiT-B/16", "--img-size", "64", "--gpus", "2", "--global-batch", "16", "--epochs", "3",
            "--dataset-size", "1024", "--fp8", "rowwise", "--no-compiled", "--json"]
    p = subprocess.run([sys.executable, "-m", "jit_fast.plan", *args], cwd=tmp_path, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["modeled"] is True and set(out["plan"]["paths"]) == {"eager", "fused", "fused+fp8"}
    ref = plan.plan_run("JiT-B/16", 2, "H100", 16, 3, 64, "rowwise", dataset_size=1024, compiled=False)
    for t in ref.paths:
        assert out["plan"]["paths"][t.path]["step_s"] == pytest.approx(t.step_s, rel=1e-12)
    calib = out["calibration"]
    assert calib["model"] == "JiT-G/32" and calib["days"] == 20.0
    assert calib["measured_over_modeled"] == pytest.approx(20.0 / calib["modeled_eager_days"], rel=1e-12)


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "4", "--global-batch", "10"], "--global-batch 10 does not split over --gpus 4"),
    (["--gpu", "A100", "--fp8", "rowwise"], "--fp8 needs FP8 tensor cores; the A100 has none"),
    (["--model", "JiT-X/16"], "--model 'JiT-X/16': it is not a preset; choose one of JiT-B/16, JiT-B/32,"),
    (["--model", "JiT-B/16-Text"], "--model 'JiT-B/16-Text': text-conditioned presets are not modeled"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--global-batch", "4096", "--dataset-size", "1000"], "--global-batch 4096 exceeds --dataset-size 1000"),
])
def test_cli_refuses_bad_flags_in_one_line(argv, message, capsys):
    assert plan.main([*argv, "--no-compiled", "--no-calibration"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plan: error: ") and message in err[0], err


@pytest.mark.slow
def test_every_official_preset_plans_on_8_h100s():
    for model in plan.OFFICIAL_PRESETS:
        p = plan.plan_run(model, 8, "H100", 128, 1, fp8="tensorwise", compiled=False)
        assert p.fits and p.path("fused").step_s < p.path("eager").step_s, model
        text = plan.format_plan(p, None)
        assert text.startswith("MODELED (not measured): " + model) and "fused+fp8 tensorwise" in text
