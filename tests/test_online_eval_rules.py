"""`--online-eval`'s rules without Inception: when a run evaluates, how chunks are shared over ranks, that the
result does not depend on the generation batch, and which settings an evaluation takes. The end-to-end runs (real
random-weight Inception, torchrun) are the slow tests of test_online_eval.py; here the extractor is a fixed linear
map, so each case takes a fraction of a second."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import jit_fast
from jit_fast.configs import TrainConfig
from jit_fast.sampling.fid import FEATURE_DIM
from jit_fast.shared.distributed import DistEnv
from jit_fast.train import online_eval
from jit_fast.train.ema import EMA

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(img_size=16, num_classes=4, depth=2, hidden_size=32, num_heads=2, bottleneck_dim=8, patch_size=4,
            in_context_len=2, in_context_start=1)


class LinearFeatures(torch.nn.Module):
    """A stand-in for Inception: pool features and logits a fixed linear map of the uint8 pixels."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.pool = torch.nn.Parameter(torch.randn(3 * 16 * 16, FEATURE_DIM, generator=g) / 256)
        self.logits = torch.nn.Parameter(torch.randn(3 * 16 * 16, 1008, generator=g) / 256)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.float().flatten(1) / 255
        return flat @ self.pool, flat @ self.logits


@pytest.fixture
def no_inception(monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluator's metric models: the linear stand-in, no FID reference."""
    monkeypatch.setattr(online_eval, "load_metric_models", lambda *a: (LinearFeatures(), None, "linear"))


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = jit_fast.build_model("JiT-B/16", **TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)  # zero-initialised gates would make every image the same
    return net


def settings(**kw) -> online_eval.OnlineEvalSettings:
    base = dict(num_images=12, gen_bsz=5, cfg=1.5, interval=(0.1, 1.0), steps=2, solver="heun", seed=3,
                noise_scale=1.0, t_eps=5e-2)
    return online_eval.OnlineEvalSettings(**{**base, **kw})


def evaluator(s: online_eval.OnlineEvalSettings, env: DistEnv | None = None) -> online_eval.OnlineEvaluator:
    net = tiny_net().eval()
    return online_eval.OnlineEvaluator(s, net, net.cfg, env or DistEnv(), None, False, print)


def test_evaluations_follow_the_official_epoch_rule_and_are_owed_after_a_resume(no_inception, tmp_path: Path) -> None:
    """After epoch e (from 0) when e % eval_freq == 0 or e is the last; a run resumed at the start of an epoch owes
    the evaluation of the epoch before it unless that one's record exists."""
    cfg = TrainConfig(epochs=6, eval_freq=2, eval_num_images=12, gen_bsz=5, eval_steps=2)
    net = tiny_net()
    params = [p.detach() for p in net.parameters()]
    evals = online_eval.RunEvaluations(cfg, EMA(params, 0.9), params, net, net.cfg, DistEnv(), None, False, tmp_path,
                                       None, print)
    assert [e for e in range(6) if evals.due_after_epoch(e)] == [0, 2, 4, 5]
    owed = [e for e in range(1, 6) if evals.pending(step=8 * e, epoch=e, step_in_epoch=0)]
    assert owed == [1, 3, 5]
    assert not evals.pending(step=9, epoch=1, step_in_epoch=1)  # mid-epoch: evaluated before that step
    evals.dir.mkdir()
    evals.record(24).write_text("{}")
    assert not evals.pending(step=24, epoch=3, step_in_epoch=0)


@pytest.mark.parametrize(("num_images", "gen_bsz"), [(12, 5), (10, 5), (3, 5), (13, 2)])
def test_every_rank_runs_as_many_chunks_and_each_image_is_made_once(no_inception, num_images: int,
                                                                     gen_bsz: int) -> None:
    """Under FSDP2 every rank must run the same number of sampler batches (each one gathers the shards); padding
    chunks (None) make up the difference, and the real chunks cover every image exactly once."""
    s = settings(num_images=num_images, gen_bsz=gen_bsz)
    plans = [evaluator(s, DistEnv(rank=r, world_size=2)).schedule() for r in range(2)]
    assert len(plans[0]) == len(plans[1]) == max(sum(c is not None for c in plan) for plan in plans)
    made = sorted(i for plan in plans for c in plan if c is not None for i in range(c[1], c[2]))
    assert made == list(range(num_images))


def test_metrics_do_not_depend_on_the_generation_batch(no_inception) -> None:
    """Image i has its own noise and label whatever the chunking: 12 images in chunks of 5 (3 chunks) score what one
    chunk of 12 scores, and the grid is the first chunk's first images."""
    results = {b: evaluator(settings(gen_bsz=b)).evaluate(lambda: False) for b in (5, 12)}
    for key in ("inception_score", "inception_score_std"):
        assert results[5].metrics[key] == pytest.approx(results[12].metrics[key], rel=1e-5)
    assert results[5].grid.shape == (5, 16, 16, 3)
    assert (abs(results[5].grid.astype(int) - results[12].grid[:5].astype(int)) <= 1).all()


def test_evaluation_settings_are_the_flags(tmp_path: Path) -> None:
    """settings_from_train passes every sampling flag through; --evaluate-gen takes the noise scale and t_eps from
    the command line only when given there (else sample.py reads the checkpoint's)."""
    cfg = TrainConfig(eval_num_images=7, gen_bsz=3, cfg=2.5, interval_min=0.2, interval_max=0.9, eval_steps=4,
                      solver="euler", seed=5, noise_scale=2.0, t_eps=0.01, output_dir=str(tmp_path), resume="run")
    s = online_eval.settings_from_train(cfg)
    assert (s.num_images, s.gen_bsz, s.cfg, s.interval, s.steps, s.solver, s.seed, s.noise_scale, s.t_eps) == (
        7, 3, 2.5, (0.2, 0.9), 4, "euler", 5, 2.0, 0.01)
    gen = online_eval.evaluate_gen_config(cfg, set())
    assert (gen.num_images, gen.batch_size, gen.cfg, gen.interval, gen.steps, gen.solver, gen.seed) == (
        7, 3, (2.5,), (0.2, 0.9), 4, "euler", 5)
    assert (gen.noise_scale, gen.t_eps) == (None, None)
    gen = online_eval.evaluate_gen_config(cfg, {"noise_scale", "t_eps"})
    assert (gen.noise_scale, gen.t_eps) == (2.0, 0.01)
