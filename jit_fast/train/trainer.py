"""JiT training: one process or torchrun (FSDP2), dual EMA, exact resume, preemption-safe DCP checkpoints.

`python train.py --preset demo` trains the CPU demo; `torchrun --nproc_per_node=8 train.py
--model JiT-B/16 --data-path DIR ...` trains on ImageNet with the official recipe (the flags keep
the official names and meanings; underscores and dashes are interchangeable).

Randomness is counter-based: the time, noise and label-drop draws of the sample at position p of
the global batch of step s come from generators seeded by (seed, s, p), and the loader's order
depends only on (seed, epoch) and the global batch. A run therefore continues bit-for-bit after a
resume, and runs that split the same global batch differently over ranks and accumulation
micro-steps see exactly the same samples and draws (only reduction rounding differs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jit_fast.checkpoint.dcp import CheckpointManager, ResolvedCheckpoint
from jit_fast.checkpoint.meta import ModelMeta
from jit_fast.configs import LEARNING_RATE, ModelConfig, TrainConfig, model_config
from jit_fast.memory_plan import check_training_run
from jit_fast.model import fp8
from jit_fast.model.denoiser import flow_matching_loss, sample_t
from jit_fast.model.network import JiT
from jit_fast.sampling import generate
from jit_fast.sampling.demo_eval import score_demo_run
from jit_fast.shared import distributed as D
from jit_fast.shared.conditioning import Condition
from jit_fast.shared.errors import UserError
from jit_fast.shared.run_lock import hold_for_run
from jit_fast.shared.seeds import dropout_seed, mix_seed
from jit_fast.train.cli import ConfigError, parse_config
from jit_fast.train.condition import ConditionSource, describe_rows, is_text_run
from jit_fast.train.divergence import LossWatch, divergence_reason, logged_losses
from jit_fast.train.metrics import (
    MetricsLogger,
    drop_rows_after,
    peak_flops,
    peak_memory_gb,
    train_flops_per_image,
)
from jit_fast.train.online_eval import RunEvaluations, evaluate_gen_config
from jit_fast.train.preemption import Preemption
from jit_fast.train.profiling import StepProfiler, parse_step_range
from jit_fast.train.resume import (
    Progress,
    StartPoint,
    check_architecture,
    checkpoint_meta,
    is_own_checkpoint,
    merge_model_meta,
    model_meta,
    rank_state,
    read_start,
    resolve_resume,
    restore,
)
from jit_fast.train.state import TrainState, base_learning_rate, lr_at
from jit_kernels import select_ops

EXIT_USAGE = 2
EXIT_DIVERGED = 3
_TAG_T_DROP, _TAG_NOISE, _TAG_DROPOUT = 1, 2, 3


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/Inf."""


def resolve_data_root(path: str) -> Path:
    """The ImageFolder root: DIR/train when it exists (the official layout), else DIR."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"--data-path {p} is not a directory")
    return p / "train" if (p / "train").is_dir() else p


def build_train_loader(cfg: TrainConfig, env: D.DistEnv):
    """The training loader, built on rank 0 first (it may write the demo set or the index cache)."""
    from jit_fast.data import build_loader

    def make():
        if cfg.demo_data:
            from jit_fast.data import prepare_demo, prepare_demo_text

            root = (prepare_demo_text if is_text_run(cfg) else prepare_demo)(size=cfg.img_size)
        else:
            root = resolve_data_root(cfg.data_path)
        return build_loader(
            root, img_size=cfg.img_size, batch_size=cfg.batch_size,
            backend=None if cfg.data_backend == "auto" else cfg.data_backend,
            rank=env.rank, world_size=env.world_size, seed=cfg.seed, epoch=0, shuffle=True, flip=cfg.flip,
            output="float", device=env.device, num_workers=cfg.num_workers, dali_filter=cfg.dali_filter,
            captions=is_text_run(cfg),
        )

    def attempt():
        try:
            return make(), None
        except (OSError, ValueError, RuntimeError) as e:
            return None, e

    loader, err = D.leader_first(attempt, env.is_main, env)
    if D.any_rank(env, err is not None):
        raise ConfigError(f"data: {err}" if err is not None else "data: failed on another rank")
    return loader


def fit_num_classes(cfg: TrainConfig, n_data: int) -> TrainConfig:
    """The config with num_classes taken from the data when unset; refuses data with more classes."""
    if cfg.num_classes == 0:
        return dataclasses.replace(cfg, num_classes=n_data)
    if n_data > cfg.num_classes:
        raise ConfigError(f"the data has {n_data} classes but the model has num_classes={cfg.num_classes}")
    return cfg


def checked_base_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The base learning rate, refused when outside the sane range (a --blr scaled by a huge batch)."""
    lr = base_learning_rate(cfg, global_batch)
    if not LEARNING_RATE.contains(lr):
        raise ConfigError(f"--blr {cfg.blr:g} x global batch {global_batch} / 256 = {lr:g} is not "
                          f"{LEARNING_RATE.describe()}; lower --blr or pass --lr")
    return lr


def count_steps_per_epoch(cfg: TrainConfig, n_batches: int) -> int:
    """Optimizer steps per epoch: loader batches per rank over grad_accum micro-steps (at least one)."""
    steps = n_batches // cfg.grad_accum
    if steps == 0:
        raise ConfigError(f"{n_batches} batches per epoch cannot fill one step of {cfg.grad_accum} micro-steps")
    return steps


def train_model_config(cfg: TrainConfig, meta: ModelMeta, start: StartPoint | None) -> ModelConfig:
    """The network's config; it must have the shapes of the checkpoint being continued."""
    try:
        mc = model_config(cfg.model, img_size=cfg.img_size, num_classes=cfg.num_classes, kernels=cfg.kernels,
                          **meta.overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if start is not None:
        check_architecture(start, meta)
    return mc


@dataclass
class Meters:
    """Loss and grad-norm sums on the device since the last host sync, and when that was."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    steps: int
    t0: float
    step0: int

    @classmethod
    def start(cls, device: torch.device, step: int) -> Meters:
        """Empty meters counting from `step` and now."""
        return cls(torch.zeros((), device=device), torch.zeros((), device=device), 0, time.perf_counter(), step)


class BatchDraws:
    """Counter-based draws of a step: t and label drop for the global batch, noise for this rank's samples.

    The draws of the sample at global-batch position p of step s depend only on (seed, s, p), so any
    split of the global batch over ranks and micro-steps sees the same ones.
    """

    def __init__(self, cfg: TrainConfig, env: D.DistEnv, in_channels: int) -> None:
        self.cfg = cfg
        self.device = env.device
        self.global_batch = cfg.batch_size * env.world_size * cfg.grad_accum
        # global-batch position of every local sample, per micro-step (loader deals round-robin)
        b, w, r = cfg.batch_size, env.world_size, env.rank
        self.positions = [[m * w * b + i * w + r for i in range(b)] for m in range(cfg.grad_accum)]
        self.positions_dev = [torch.tensor(p, device=self.device) for p in self.positions]
        self.noise_shape = (cfg.batch_size, in_channels, cfg.img_size, cfg.img_size)
        self.noise_gen = torch.Generator(device=self.device)

    def t_and_drop(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t and label-drop mask for the whole global batch of `step` (same on every rank)."""
        g = torch.Generator(device=self.device)
        g.manual_seed(mix_seed(self.cfg.seed, step, _TAG_T_DROP))
        t = sample_t(self.global_batch, self.cfg.P_mean, self.cfg.P_std, device=self.device, generator=g)
        drop = torch.rand(self.global_batch, device=self.device, generator=g) < self.cfg.label_drop_prob
        return t, drop

    def noise(self, step: int, micro: int) -> torch.Tensor:
        """Standard-normal noise of this rank's samples, each seeded by (seed, step, global position)."""
        out = torch.empty(self.noise_shape, device=self.device)
        g = self.noise_gen
        for i, pos in enumerate(self.positions[micro]):
            g.manual_seed(mix_seed(self.cfg.seed, step, pos, _TAG_NOISE))
            out[i].normal_(generator=g)
        return out


@dataclass(frozen=True)
class ResolvedRun:
    """A run decided before anything is built: the final, frozen config (resume metadata, the data's classes and
    the conditioning applied), where it starts, its data and the numbers derived from them."""

    cfg: TrainConfig
    explicit: frozenset[str]
    resume: ResolvedCheckpoint | None
    start: StartPoint | None
    loader: Any
    cond: ConditionSource
    global_batch: int
    base_lr: float
    steps_per_epoch: int
    total_steps: int
    model_meta: ModelMeta
    model_cfg: ModelConfig
    precision: str
    amp_dtype: torch.dtype | None
    use_fsdp: bool


def resolve_run(cfg: TrainConfig, env: D.DistEnv, explicit: set[str] | None = None) -> ResolvedRun:
    """Parse-to-build step: the start point, resume metadata, data, classes, conditioning, lr and steps, then the
    memory plan (printed; refused over --max-memory-gb). Errors of a run continued by --auto-resume say so."""
    explicit = frozenset(explicit if explicit is not None else {f.name for f in dataclasses.fields(cfg)})
    log = D.rank0_print(env)
    precision, amp_dtype = D.resolve_precision(cfg.precision, env.device)
    use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and env.world_size > 1)
    refused = fp8.refusal(cfg.fp8, cfg.fp8_emulate, env.device)
    if refused:
        raise ConfigError(refused)
    resume = resolve_resume(cfg, set(explicit), env, log)
    given = cfg
    try:
        start = read_start(resume) if resume is not None else None
        if start is not None:
            cfg = merge_model_meta(cfg, set(explicit), start)
        loader = build_train_loader(cfg, env)
        cond = ConditionSource.build(cfg, loader, env, start and start.model_meta.text_encoder)
        cfg = cond.fit_config(fit_num_classes(cfg, loader.num_classes))
        global_batch = cfg.batch_size * env.world_size * cfg.grad_accum
        base_lr = checked_base_lr(cfg, global_batch)
        steps_per_epoch = count_steps_per_epoch(cfg, len(loader))
        total = cfg.epochs * steps_per_epoch
        meta = cond.record(model_meta(cfg))
        run = ResolvedRun(cfg, explicit, resume, start, loader, cond, global_batch, base_lr, steps_per_epoch,
                          min(total, cfg.max_steps) if cfg.max_steps else total, meta,
                          train_model_config(cfg, meta, start), precision, amp_dtype, use_fsdp)
    except ConfigError as e:  # say which run is being continued when the user did not name it
        if resume is None or given.resume:
            raise
        raise ConfigError(f"{e} (continuing {resume.path} by --auto-resume; pass --overwrite to start "
                          "over or choose another --output-dir)") from None
    check_training_run(cfg, precision, env.world_size if use_fsdp else 1, cfg.num_classes, env.device, log)
    return run


class Trainer:
    """Builds the model (FSDP2 when distributed), optimizer, EMAs and checkpointer of a resolved run; `run()` trains.

    Every attribute is created here. `run` is start_run, steps with after_step's periodic work (log, preempt,
    save, evaluate), finish, close, report. Seams for new features: `build_model` (the network), `train_step` /
    `micro_step` (one optimizer step / one micro-batch's loss and backward) and `end_epoch` (after an epoch's
    last step, before its checkpoint).
    """

    def __init__(self, run: ResolvedRun, env: D.DistEnv) -> None:
        self.cfg = run.cfg
        self.env = env
        self.device = env.device
        self.out = Path(run.cfg.output_dir)
        self.resume, self.loader, self.cond = run.resume, run.loader, run.cond
        self.precision, self.amp_dtype, self.use_fsdp = run.precision, run.amp_dtype, run.use_fsdp
        self.global_batch, self.base_lr = run.global_batch, run.base_lr
        self.steps_per_epoch, self.total_steps = run.steps_per_epoch, run.total_steps
        self.model_meta, self.model_cfg = run.model_meta, run.model_cfg
        self.preemption = Preemption(self.cfg.preempt_grace, lambda: self.ckpt.last_saved)
        self.pbar = None
        self.own_start = False  # the run continues a checkpoint of its own output directory
        self.t_start = 0.0
        net = self.build_model()
        self.has_dropout = self.model_cfg.attn_drop > 0 or self.model_cfg.proj_drop > 0
        self.n_params = sum(p.numel() for p in net.parameters())
        self.flops_per_image = train_flops_per_image(self.model_cfg)
        net = D.prepare_model(
            net, env, fsdp=self.use_fsdp, param_dtype=self.amp_dtype if self.use_fsdp else None,
            compile_blocks=self.cfg.compile, activation_checkpointing=self.cfg.activation_checkpointing,
            reshard_after_forward=self.cfg.reshard_after_forward,
        )
        net.train()
        self.state = TrainState(net, self.cfg, self.base_lr, self.device, loss_scaling=self.precision == "fp16")
        self.draws = BatchDraws(self.cfg, env, self.model_cfg.in_channels)
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        if run.start is not None:
            self._restore(run.start)
        self.metrics = MetricsLogger(self.out, env.is_main, self.cfg.tensorboard, self.cfg.wandb or None,
                                     dataclasses.asdict(self.cfg))
        self.evals = RunEvaluations(
            self.cfg, self.state.ema1, self.state.local_params(), net, self.model_cfg, env, self.amp_dtype,
            self.use_fsdp, self.out, self.metrics, self.log) if self.cfg.online_eval else None
        self.profiler = StepProfiler(parse_step_range(self.cfg.profile_steps) if self.cfg.profile_steps else None,
                                     self.out, env.rank, self.device)
        self.ckpt = CheckpointManager(self.out, env, keep_last=self.cfg.keep_last, async_save=self.cfg.async_save)
        self.meters = Meters.start(self.device, self.step)
        self.lr = 0.0  # the learning rate of the latest step
        self.last_save_step = -1
        self.last_loss = float("nan")
        past = logged_losses(self.out / "metrics.jsonl") if env.is_main and run.start is not None else []
        self.loss_watch = LossWatch.of(self.cfg, D.broadcast_object(env, past))  # the same on every rank

    # -- setup -------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        """Print on rank 0 (through the progress bar while it is shown)."""
        if not self.env.is_main:
            return
        if self.pbar is not None:
            self.pbar.write(msg)
        else:
            print(msg, flush=True)

    def build_model(self) -> JiT:
        """The network to train, with identical initial weights on every rank and at every world size."""
        torch.manual_seed(self.cfg.seed)
        ops = select_ops(self.model_cfg.kernels, self.device, self.precision)
        if self.cfg.fp8 == "off":
            return self.cond.prepare(JiT(self.model_cfg, ops))
        config = fp8.float8_config(self.cfg.fp8, self.cfg.fp8_emulate, fsdp_all_gather=self.use_fsdp)
        return self.cond.prepare(fp8.convert_block_linears(JiT(self.model_cfg, fp8.float8_ops(ops, config)), config))

    def _restore(self, start: StartPoint) -> None:
        """Continue from `start`: weights, optimizer, EMAs and progress (no RNG state: see jit_fast.train.resume)."""
        p = restore(start, self.state, self.cfg, self.model_cfg, self.env, self.global_batch, self.steps_per_epoch,
                    self.log)
        self.step, self.epoch, self.step_in_epoch = p.step, p.epoch, p.step_in_epoch
        self.log(f"resumed from {start.source.path} at step {self.step} (epoch {self.epoch}, "
                 f"{self.step_in_epoch}/{self.steps_per_epoch})")
        if self.env.is_main:  # rows of steps this run will redo (or a discarded history) leave metrics.jsonl
            drop_rows_after(self.out / "metrics.jsonl", self.step, self.log)

    # -- the step ----------------------------------------------------------------------------

    def train_step(self, batches: Iterator) -> None:
        """One optimizer step over grad_accum micro-batches: lr, losses and backward, clip, AdamW, EMAs."""
        cfg, step = self.cfg, self.step
        self.lr = lr_at(cfg, self.base_lr, self.epoch + self.step_in_epoch / self.steps_per_epoch)
        for g in self.state.opt.param_groups:
            g["lr"] = self.lr
        t_all, drop_all = self.draws.t_and_drop(step)
        for m in range(cfg.grad_accum):
            x, y = next(batches)
            idx = self.draws.positions_dev[m]
            loss = self.micro_step(m, x, self.cond(y), t_all[idx], drop_all[idx])
            self.meters.loss += loss.detach().float() / cfg.grad_accum
        self.meters.grad_norm += self.state.optimizer_step(cfg.grad_clip, self.use_fsdp and self.env.world_size > 1)
        self.meters.steps += 1

    def micro_step(self, m: int, x: torch.Tensor, y: Condition, t: torch.Tensor, drop: torch.Tensor
                   ) -> torch.Tensor:
        """Loss of micro-batch `m` of this step and its backward (gradients sync on the last one)."""
        cfg, n_micro = self.cfg, self.cfg.grad_accum
        if self.has_dropout:
            torch.manual_seed(mix_seed(cfg.seed, self.step, self.env.rank, m, _TAG_DROPOUT))  # torch path
            self.state.net.set_dropout_seed(dropout_seed(cfg.seed, self.step, self.env.rank, m))  # fused path
        D.set_gradient_sync(self.state.net, m == n_micro - 1)
        with autocast(self.device, self.amp_dtype):
            loss = flow_matching_loss(
                self.state.net, x, y, t=t, noise=self.draws.noise(self.step, m), drop=drop,
                P_mean=cfg.P_mean, P_std=cfg.P_std, noise_scale=cfg.noise_scale, t_eps=cfg.t_eps,
                label_drop_prob=cfg.label_drop_prob, num_classes=cfg.num_classes,
            )
        self.state.scaling.scale(loss / n_micro).backward()
        return loss

    def flush_metrics(self) -> None:
        """Host sync: pull the accumulated loss / grad norm, stop on NaN/Inf or exploded weights, log.

        Runs every log_freq steps and before every save, so a saved checkpoint always passed it.
        """
        mt = self.meters
        if mt.steps == 0:
            return
        vals = torch.stack([mt.loss / mt.steps, mt.grad_norm / mt.steps, self.state.weights_exploded()])
        loss, gnorm, exploded = D.all_reduce_mean(self.env, vals).tolist()
        gnorm, scaling = self.state.scaling.window(gnorm, mt.steps)  # fp16: skipped steps, loss scale
        now = time.perf_counter()
        reason = divergence_reason(loss, gnorm, exploded > 0) or self.loss_watch.observe(loss)
        if reason:
            self.metrics.log(self.step, {"reason": reason, "first_step": mt.step0 + 1}, group="diverged")
            good = self.ckpt.last_saved or (self.resume.path if self.resume else None)
            when = f"step {self.step}" if mt.step0 + 1 == self.step else f"steps {mt.step0 + 1}-{self.step}"
            raise TrainingDiverged(f"{reason} ({when}); stopping without saving. Last good checkpoint: "
                                   f"{good or 'none'}")
        img_s = (self.step - mt.step0) * self.global_batch / max(now - mt.t0, 1e-9)
        peak = peak_flops(self.device, self.precision, self.cfg.peak_tflops)
        mfu = img_s * self.flops_per_image / (peak * self.env.world_size) if peak else None
        scalars = {"loss": loss, "lr": self.lr, "grad_norm": gnorm, "img_per_s": img_s,
                   "epoch": self.epoch + self.step_in_epoch / self.steps_per_epoch,
                   "peak_mem_gb": peak_memory_gb(self.device), **scaling}
        if mfu is not None:
            scalars["mfu"] = mfu
        self.metrics.log(self.step, scalars)
        self.last_loss = loss
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}", refresh=False)
        self.meters = Meters.start(self.device, self.step)

    def save(self) -> None:
        """Checkpoint the current step (collective); refuses to save diverged weights."""
        self.flush_metrics()
        cfg = self.cfg
        loader_state = self.loader.state_dict()
        meta = checkpoint_meta(cfg, Progress(self.step, self.epoch, self.step_in_epoch),
                               steps_per_epoch=self.steps_per_epoch, world_size=self.env.world_size,
                               global_batch=self.global_batch, lr=self.lr, loader_state=loader_state,
                               meta=self.model_meta, precision=self.precision, fsdp=self.use_fsdp)
        self.ckpt.save(self.step, self.state.state_dict(), meta, rank_state(loader_state))
        self.last_save_step = self.step
        if not cfg.async_save:
            self.log(f"saved checkpoint {self.ckpt.last_saved}")

    # -- loop --------------------------------------------------------------------------------

    def _epoch_batches(self) -> Iterator:
        if self.step_in_epoch:
            self.loader.load_state_dict({"epoch": self.epoch, "batch": self.step_in_epoch * self.cfg.grad_accum,
                                         "seed": self.cfg.seed, "batch_size": self.cfg.batch_size,
                                         "world_size": self.env.world_size})
        else:
            self.loader.set_epoch(self.epoch)
        return iter(self.loader)

    def end_epoch(self) -> None:
        """After the last step of an epoch (before its checkpoint): move on to the next epoch."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def run(self, step_callback: Callable[[Trainer], None] | None = None) -> int:
        """Train to `total_steps`: after every step the callback (tests inject faults there), then the periodic
        work. Returns 0 (also after a preemption checkpoint), or the demo evaluation's code."""
        self.start_run()
        try:
            stopped = self.evaluate_pending()
            self.meters = Meters.start(self.device, self.step)
            for epoch_done in () if stopped else self.steps():
                if step_callback is not None:
                    step_callback(self)
                stopped = self.after_step(epoch_done)
                if stopped:
                    break
            stopped = self.finish(stopped)
        finally:
            self.close()
        return self.report(stopped)

    def steps(self) -> Iterator[bool]:
        """Take optimizer steps epoch by epoch up to `total_steps`; yields after each whether it ended an epoch."""
        while self.step < self.total_steps:
            batches = self._epoch_batches()
            while self.step_in_epoch < self.steps_per_epoch and self.step < self.total_steps:
                self.profiler.before_step(self.step)
                self.train_step(batches)
                self.step += 1
                self.profiler.after_step(self.step)
                self.step_in_epoch += 1
                self.pbar.update(1)
                epoch_done = self.step_in_epoch == self.steps_per_epoch
                yield epoch_done
                if epoch_done:
                    break

    def evaluate_pending(self) -> bool:
        """An online evaluation the previous run did not finish, first. True: a signal stopped it."""
        pending = self.evals is not None and self.evals.pending(self.step, self.epoch, self.step_in_epoch)
        return pending and not self.evaluate()

    def after_step(self, epoch_done: bool) -> bool:
        """The periodic work of a step: log, agree on a preemption, save and evaluate when due. True: stop."""
        if self.step % self.cfg.log_freq == 0:
            self.flush_metrics()
        preempted = self.preempted()
        self.ckpt.poll()
        save = checkpoint_due(self.cfg, self.step, self.epoch, epoch_done)
        evaluate = epoch_done and self.evals is not None and self.evals.due_after_epoch(self.epoch)
        if epoch_done:
            self.end_epoch()
        if preempted or save or evaluate:  # an evaluation starts from a checkpoint
            self.save()
        if evaluate and not preempted:
            preempted = not self.evaluate()
        return preempted

    def preempted(self) -> bool:
        """Every signal_check_freq steps: did a rank receive SIGTERM / SIGUSR1 (all ranks agree)?"""
        due = self.step % self.cfg.signal_check_freq == 0
        return due and D.any_rank(self.env, self.preemption.received is not None)

    def start_run(self) -> None:
        """Before the first step: signal handlers, the run's first line, the progress bar."""
        self.preemption.install()
        # a checkpoint we resumed from counts as this run's save only if it lives in this run's directory
        self.own_start = self.resume is not None and self.resume.kind == "dcp" and is_own_checkpoint(self.resume,
                                                                                                      self.out)
        self.last_save_step = self.step if self.own_start else -1
        self.log(describe_run(self))
        if self.resume is not None and self.step >= self.total_steps:
            self.log(f"{self.out} is already trained to step {self.step}: nothing to train"
                     f"{', re-running the demo evaluation' if self.cfg.demo_eval else ''} (a larger --max-steps "
                     "continues it, --overwrite starts over)")
        from tqdm import tqdm

        self.pbar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                         disable=not self.env.is_main, dynamic_ncols=True, smoothing=0.05)
        self.t_start = time.perf_counter()

    def finish(self, stopped: bool) -> bool:
        """After the loop: the final checkpoint, the end-of-run evaluation, the last metrics. True: preempted."""
        if self.last_save_step != self.step:
            self.save()
        if self.evals is not None and not stopped and not self.evals.done(self.step):
            stopped = not self.evaluate()  # a run stopped mid-epoch (--max-steps) is evaluated at its end
        self.flush_metrics()
        self.ckpt.wait()
        return stopped

    def close(self) -> None:
        """Always, also on an error: close the profiler, the loggers and the bar; restore the signal handlers."""
        self.profiler.close()
        self.metrics.close()
        self.pbar.close()
        self.pbar = None
        self.preemption.restore()

    def report(self, preempted: bool) -> int:
        """The run's last line; the demo evaluation after a finished demo run (its exit code)."""
        where = self.ckpt.last_saved or (self.resume.path if self.own_start else None)
        if preempted:
            self.log(f"preempted ({self.preemption.received or 'signal on another rank'}) at step {self.step}: "
                     f"checkpoint {where}; continue with --resume {self.out}")
            return 0
        loss = f", loss {self.last_loss:.4f}" if math.isfinite(self.last_loss) else ""
        self.log(f"done: step {self.step} in {time.perf_counter() - self.t_start:.0f}s{loss}, checkpoint {where}")
        return self.demo_eval() if self.cfg.demo_eval else 0

    def evaluate(self) -> bool:
        """Online evaluation of EMA1 at this step (not counted in img/s); False when a signal interrupted it."""
        ok = self.evals.evaluate(self.step, self.epoch, lambda: self.preemption.received is not None)
        self.meters = Meters.start(self.device, self.step)
        return ok

    def demo_eval(self) -> int:
        """Score EMA1 on the demo (grid, accuracy, diversity); 1 if the full schedule missed a target."""
        net = self.cond.prepare(self.state.ema_model("ema1", self.model_cfg, self.device, self.env.is_main))
        full = self.total_steps == self.cfg.epochs * self.steps_per_epoch
        code = score_demo_run(net, self.cfg, self.out / "demo_eval", full, self.log,
                              self.cond.demo_condition(self.model_cfg)) if self.env.is_main else 0
        return D.broadcast_object(self.env, code)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to the run's mixed-precision dtype (None: fp32, no autocast)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def checkpoint_due(cfg: TrainConfig, step: int, epoch: int, epoch_done: bool) -> bool:
    """A checkpoint is due every save_freq_steps steps, and after every save_last_freq-th and the last epoch."""
    return bool((cfg.save_freq_steps and step % cfg.save_freq_steps == 0) or (
        epoch_done and cfg.save_last_freq and (epoch % cfg.save_last_freq == 0 or epoch + 1 == cfg.epochs)))


def describe_run(tr: Trainer) -> str:
    """The run's first log line: model, data, parallelism, batch, lr, steps, output."""
    cfg, env = tr.cfg, tr.env
    mode = f"FSDP2 x{env.world_size}" if tr.use_fsdp else ("single process" if env.world_size == 1 else "")
    return (f"{cfg.model} ({tr.n_params / 1e6:.2f}M params) {cfg.img_size}px, {describe_rows(cfg, tr.cond)} | "
            f"{mode}, {tr.precision}, {tr.device} | global batch {tr.global_batch} = {cfg.batch_size} x "
            f"{env.world_size} ranks x {cfg.grad_accum} | lr {tr.base_lr:.3g} | steps {tr.step}->"
            f"{tr.total_steps} ({tr.steps_per_epoch}/epoch) | {tr.out}")


# ----------------------------------------------------------------------------------------------
# entry points


def run_training(cfg: TrainConfig, explicit: set[str] | None = None,
                 step_callback: Callable[[Trainer], None] | None = None) -> int:
    """Initialize the process group (torchrun or single process), train, tear down (--evaluate-gen: sample.py)."""
    if cfg.evaluate_gen:
        generate.run(evaluate_gen_config(cfg, explicit if explicit is not None else set()))
        return 0
    env = D.init_distributed(cfg.device, force_group=cfg.fsdp == "on")
    lock = None
    try:
        lock = hold_for_run(cfg.output_dir, "train.py", env, D.rank0_print(env), cfg.data_path or None)
        return Trainer(resolve_run(cfg, env, explicit), env).run(step_callback)
    finally:
        gc.collect()  # free the Trainer (held by a reference cycle) while the process group still exists
        if lock is not None:
            lock.release()
        D.shutdown(env)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: one-line errors (exit 2) for bad flags, data or checkpoints; exit 3 on NaN/Inf."""
    rank = int(os.environ.get("RANK", "0"))
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        cfg, explicit = parse_config(argv)
        return run_training(cfg, explicit)
    except (UserError, OSError) as e:  # user errors: bad flags, data, checkpoints, files, permissions
        print(f"{prefix}error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingDiverged as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"{prefix}interrupted", file=sys.stderr)
        return 130
