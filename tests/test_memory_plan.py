"""The memory plan: its activation term is the saved-activation counter's, its other terms follow from the parameter
count by hand, its largest batch is the last one its own model fits; the CLI prints it and rejects bad flags."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import jit_fast
from jit_fast import memory_plan as mp
from jit_fast.perf.traffic import count_train_step

GIB = 2**30
TINY = dict(depth=3, hidden_size=64, num_heads=4, bottleneck_dim=16, in_context_len=4, in_context_start=1)


def hand_params(model: str, **kw) -> tuple[int, int, int]:
    """(all parameters, trainable, elements of the GEMM weights autograd keeps a cast of) of a freshly built model.

    Every Linear / Conv2d weight but the first timestep linear's: its input, the sinusoid of t, needs no gradient,
    so autograd saves only that input for its weight gradient."""
    net = jit_fast.build_model(model, **kw)
    params = list(net.parameters())
    gemm = sum(m.weight.numel() for m in net.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    gemm -= net.t_embedder.mlp[0].weight.numel()
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), gemm


def check_terms(p: mp.MemoryPlan, model: str, path: str, **kw) -> None:
    """The plan's activation term is what the traffic counter (flash-attention stand-in, its own op stream, bf16
    autocast: the same element sizes as fp16) measures as saved for backward; the weight terms are 4, 4, 8 and 8 bytes
    per parameter, the autocast copies 2 bytes per GEMM weight element."""
    counted = count_train_step(model, path, batch=p.batch, img_size=p.img_size, optimizer=False, **kw)
    assert p.activations[False] == counted.saved_activation_bytes > 0
    total, trainable, gemm = hand_params(model, img_size=p.img_size, **kw)
    terms = {name: b for name, _, b in p.fixed}
    assert terms["parameters"] == 4 * total and terms["gradients"] == 4 * trainable
    assert terms["AdamW state"] == 8 * trainable and terms["EMAs"] == 8 * total
    assert terms["weight copies"] == 2 * gemm and terms["reserve"] == mp.RESERVE_BYTES
    assert p.peak() == sum(terms.values()) + counted.saved_activation_bytes


@pytest.mark.slow
def test_jit_b16_batch12_activations_are_the_counters():
    """The acceptance case: JiT-B/16, batch 12, 256 px, fp16, fused kernels."""
    p = mp.plan("JiT-B/16", batch=12, img_size=256, precision="fp16", kernels="triton")
    check_terms(p, "JiT-B/16", "fused")
    assert p.activations[True] < p.activations[False] / 3  # checkpointing keeps block inputs and one block


@pytest.fixture(scope="module")
def tiny_plan() -> mp.MemoryPlan:
    return mp.plan("JiT-T/4", batch=5, img_size=32, precision="fp16", kernels="triton", num_classes=10, **TINY)


def test_tiny_activations_are_the_counters(tiny_plan):
    """`check_terms` on a 3-block model with the fused kernels (fast; JiT-B/16 at batch 12 is the slow test)."""
    check_terms(tiny_plan, "JiT-T/4", "fused", num_classes=10, **TINY)


def test_activations_are_affine_in_the_batch_and_largest_batch_fits(tiny_plan):
    """The per-sample slope predicts the count at another batch exactly; the largest batch is the last that fits."""
    p = tiny_plan
    cfg = jit_fast.configs.model_config("JiT-T/4", img_size=32, num_classes=10, kernels="triton", **TINY)
    at9 = mp.count_activations(cfg, 9, torch.float16)
    for ac in (False, True):
        assert at9.activations(ac) == p.activations[ac] + 4 * p.per_sample[ac]
        budget = p.peak(ac) + 10 * p.per_sample[ac] + 1
        n = p.largest_batch(budget, ac)
        assert n == p.batch + 10
        assert p.peak(ac) + (n - p.batch) * p.per_sample[ac] <= budget
        assert p.peak(ac) + (n + 1 - p.batch) * p.per_sample[ac] > budget
    assert p.largest_batch(p.fixed_bytes) == 0


def test_really_checkpointed_run_saves_the_outside_term_and_the_streams(tiny_plan):
    """With the blocks really checkpointed (`distributed.checkpoint_block_forward`, torch's non-reentrant checkpoint)
    autograd saves exactly the plan's outside-the-blocks term plus each block's residual-stream input, which
    torch's checkpoint saves (by hand: fp32 (B, N, D) with N = 64 patches for block 0, 64 + 4 in-context tokens for
    blocks 1 and 2); the plan's held inputs also count what the checkpoints keep by reference (c is saved outside)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from jit_fast.model.denoiser import flow_matching_loss
    from jit_fast.model.network import JiT
    from jit_fast.shared.distributed import checkpoint_block_forward
    from jit_fast.shared.saved_bytes import SavedBytes, count_saved

    cfg = jit_fast.configs.model_config("JiT-T/4", img_size=32, num_classes=10, kernels="triton", **TINY)
    b, d = tiny_plan.batch, cfg.hidden_size
    with FakeTensorMode(), mp.flash_like_attention():
        net = JiT(cfg).train()
        for block in net.blocks:
            checkpoint_block_forward(block)
        saved = SavedBytes([*net.parameters(), *net.buffers()])
        with count_saved(saved), torch.autocast("cpu", dtype=torch.float16):
            flow_matching_loss(net, torch.randn(b, 3, 32, 32), torch.randint(0, 10, (b,)), t=torch.rand(b),
                               num_classes=10)
    count = mp.count_activations(cfg, b, torch.float16)
    streams = 4 * b * d * (64 + 2 * (64 + 4))
    assert saved.activation_bytes == count.outside_blocks + streams
    assert streams < count.block_inputs


def test_check_fits_says_what_to_change(tiny_plan):
    p = tiny_plan
    mp.check_fits(p, p.peak())
    with pytest.raises(mp.MemoryPlanError, match=r"batch 5 needs .* GiB per rank \(modeled\) .*--batch-size 4"):
        mp.check_fits(p, p.peak() - 1)


def test_fsdp_shards_the_states_and_adds_the_working_set():
    """World size 4: fp32 states are a quarter each; the unsharded working set is the root in fp32, two blocks in the
    autocast dtype and one block's gradients (fp16 + fp32); block parameters are fp16, so only root weights are cast."""
    kw = dict(img_size=32, num_classes=10, **TINY)
    p = mp.plan("JiT-T/4", batch=4, precision="fp16", kernels="torch", world_size=4, **kw)
    total, trainable, _ = hand_params("JiT-T/4", **kw)
    net = jit_fast.build_model("JiT-T/4", **kw)
    block = sum(q.numel() for q in net.blocks[0].parameters())
    root = total - sum(q.numel() for q in net.blocks.parameters())
    terms = {name: b for name, _, b in p.fixed}
    assert terms["parameters"] == 4 * math.ceil(total / 4) and terms["EMAs"] == 8 * math.ceil(total / 4)
    assert terms["gradients"] == 4 * math.ceil(trainable / 4)
    assert terms["FSDP2 unsharded"] == 2 * 2 * block + 4 * root + (2 + 4) * block
    root_gemm = sum(m.weight.numel() for name, m in net.named_modules()
                    if isinstance(m, nn.Linear | nn.Conv2d) and not name.startswith("blocks."))
    root_gemm -= net.t_embedder.mlp[0].weight.numel()  # see `hand_params`
    assert terms["weight copies"] == 2 * root_gemm


def test_cli_prints_the_plan(capsys):
    args = ["--model", "JiT-T/4", "--batch", "3", "--img-size", "32", "--num-classes", "10", "--precision", "fp32",
            "--kernels", "torch", "--activation-checkpointing", "--max-memory-gb", "1"]
    assert mp.main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan (modeled, per rank): JiT-T/4 at 32px, batch 3 per rank, fp32")
    assert "* activations, checkpointed" in out and "largest batch per rank within 1 GiB" in out
    assert "weight copies" not in out  # fp32: no autocast casts


def test_cli_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        mp.main(["--batch", "0"])
    assert e.value.code == 2 and "--batch: must be an integer >= 1" in capsys.readouterr().err
    assert mp.main(["--model", "JiT-T/4", "--img-size", "30"]) == 2
    assert "img_size 30 is not a multiple of patch_size 4" in capsys.readouterr().err


def test_imagenette_preset_is_the_small_data_recipe():
    from jit_fast.train.cli import parse_config, validate_config

    cfg, _ = parse_config(["--preset", "imagenette"])
    validate_config(cfg)
    assert (cfg.model, cfg.img_size, cfg.num_classes, cfg.precision) == ("JiT-B/16", 256, 10, "auto")
    assert cfg.data_path == "data/imagenette" and cfg.batch_size * cfg.grad_accum == 128
    cfg, _ = parse_config(["--preset", "imagenette", "--data-path", "/elsewhere", "--batch-size", "8"])
    assert cfg.data_path == "/elsewhere" and cfg.batch_size == 8


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_imagenette_preset_fits_a_t4(kernels):
    """The preset's batch fits a T4's 15 GiB (modeled) in fp16 without checkpointing, with the fused kernels and with
    the torch ops the model falls back to; the plan is what the trainer checks before its first step."""
    from jit_fast.configs import RUN_PRESETS, TrainConfig

    cfg = TrainConfig(**{**RUN_PRESETS["imagenette"], "kernels": kernels})
    p = mp.plan_training(cfg, "fp16", world_size=1, num_classes=10)
    assert p.batch == 32 and not p.checkpointing
    mp.check_fits(p, 15 * GIB)
    assert p.largest_batch(15 * GIB) > p.batch


def test_training_plan_takes_the_runs_world_size_and_class_count():
    """plan_training passes world size and class count through to the plan in their own places (a swap of the two
    positional arguments would plan 10 ranks and 2 classes)."""
    from jit_fast.configs import TrainConfig

    cfg = TrainConfig(model="JiT-T/4", img_size=32, batch_size=4)
    p = mp.plan_training(cfg, "fp32", 2, 10)
    assert p.world_size == 2
    expected = mp.parameter_counts(jit_fast.model_config("JiT-T/4", img_size=32, num_classes=10))
    assert p.params.total == expected.total


def test_checkpointed_peak_holds_the_largest_recomputed_block():
    """With checkpointing the peak holds the outside term, the block inputs and the LARGEST block being recomputed
    (one block at a time, but any of them)."""
    count = mp.ActivationCount(total=1000, outside_blocks=100, block_inputs=40, recompute=(3, 9, 5), weight_copies=0)
    assert count.activations(False) == 1000 and count.activations(True) == 100 + 40 + 9
