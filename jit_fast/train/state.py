"""What a training checkpoint holds: the (FSDP2-sharded) net, AdamW on the official groups and both EMAs.

The official optimizer recipe lives here too: the learning-rate rule (blr x global batch / 256),
its schedule (linear warmup, then constant or cosine) and the two AdamW parameter groups.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from jit_fast.configs import ModelConfig, TrainConfig
from jit_fast.model.network import JiT
from jit_fast.shared import distributed as D
from jit_fast.train.ema import EMA
from jit_fast.train.loss_scale import LossScaler

# |x| beyond this in a parameter or EMA weight means the run has exploded even while the loss is finite
MAX_WEIGHT_ABS = 1e6


def lr_at(cfg: TrainConfig, base_lr: float, epoch: float) -> float:
    """Official schedule on a fractional epoch: linear warmup, then constant or cosine to min_lr."""
    if epoch < cfg.warmup_epochs:
        return base_lr * epoch / cfg.warmup_epochs
    if cfg.lr_schedule == "constant":
        return base_lr
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return cfg.min_lr + (base_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def base_learning_rate(cfg: TrainConfig, global_batch: int) -> float:
    """The official rule: the absolute --lr when given, else blr x global_batch / 256."""
    return cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 256


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Official AdamW groups: [no decay (1-D params and biases), decay], frozen parameters skipped."""
    no_decay, decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class TrainState:
    """The net (plain or FSDP2), its AdamW, two EMAs (all in `named_parameters` order) and the fp16 loss scaler."""

    def __init__(self, net: torch.nn.Module, cfg: TrainConfig, base_lr: float, device: torch.device,
                 loss_scaling: bool = False) -> None:
        self.net = net
        self.names = [n for n, _ in net.named_parameters()]
        self.params = [p for _, p in net.named_parameters()]
        self.trainable = [p for p in self.params if p.requires_grad]
        kw: dict[str, bool] = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.opt = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=base_lr, betas=(cfg.beta1, cfg.beta2),
                                     **kw)
        locals_ = self.local_params()
        self.ema1 = EMA(locals_, cfg.ema_decay1)
        self.ema2 = EMA(locals_, cfg.ema_decay2)
        self.scaling = LossScaler(loss_scaling, device, self.opt)

    def local_params(self) -> list[torch.Tensor]:
        """This rank's shards of all parameters (storage shared with the model)."""
        return [D.local(p).detach() for p in self.params]

    def ema_state(self, ema: EMA) -> dict[str, torch.Tensor]:
        """EMA shards keyed by parameter name, wrapped as DTensors like the parameters (shared storage)."""
        out = {}
        for name, p, s in zip(self.names, self.params, ema.shadow, strict=True):
            if D.is_dtensor(p):
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = s
        return out

    def state_dict(self, template: bool = False) -> dict:
        """Everything DCP saves: sharded model, optimizer, both EMAs and (fp16) the loss scaler.

        A `template` (what a checkpoint is loaded into) has an AdamW state for every parameter; a saved one only
        after a step was applied (get_state_dict initializes a fresh AdamW by a zero-lr step; fp16 loss scaling can
        skip every step before a save)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        fresh = not self.opt.state and not template
        msd, osd = get_state_dict(self.net, self.opt)
        if fresh:
            self.opt.state.clear()
            osd["state"] = {}
        sd = {"model": msd, "optim": osd, "ema1": self.ema_state(self.ema1), "ema2": self.ema_state(self.ema2)}
        if self.scaling.enabled:
            sd["loss_scale"] = self.scaling.state_dict()
        return sd

    def drop_optimizer_state(self, keep: set[str]) -> None:
        """Forget the AdamW state of the parameters not named in `keep`: loading a checkpoint initializes every
        state (by a zero-lr step), also of parameters whose state was not saved (no step applied a gradient yet)."""
        for name, p in zip(self.names, self.params, strict=True):
            if name not in keep:
                self.opt.state.pop(p, None)

    def reapply_hparams(self, cfg: TrainConfig) -> None:
        """This run's weight decay and betas on a loaded optimizer state (a checkpoint's must not win)."""
        for g, wd in zip(self.opt.param_groups, (0.0, cfg.weight_decay), strict=True):
            g["weight_decay"] = wd
            g["betas"] = (cfg.beta1, cfg.beta2)

    def update_emas(self) -> None:
        """Both EMAs take one step towards the current parameters (none on a step the loss scaler skipped)."""
        locals_ = self.local_params()
        skip = self.scaling.found_inf if self.scaling.enabled else None
        self.ema1.update(locals_, skip)
        self.ema2.update(locals_, skip)

    def optimizer_step(self, clip: float, sharded: bool) -> torch.Tensor:
        """Unscale (fp16), clip, AdamW (skipped on an fp16 overflow), zero grads, EMAs; the grad norm (0 if skipped)."""
        self.scaling.unscale()
        gnorm = self.grad_norm_and_clip(clip, sharded)
        self.scaling.step()
        self.opt.zero_grad(set_to_none=True)
        self.update_emas()
        return self.scaling.applied(gnorm)

    def grad_norm_and_clip(self, clip: float, sharded: bool) -> torch.Tensor:
        """Global L2 grad norm on device (all-reduced over shards when `sharded`); clip in place if `clip` > 0."""
        grads = [D.local(p.grad) for p in self.trainable if p.grad is not None]
        norms = torch._foreach_norm(grads)
        sq = torch.stack([n.float() for n in norms]).square().sum()
        if sharded:
            import torch.distributed as dist

            dist.all_reduce(sq)
        norm = sq.sqrt()
        if clip > 0:
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef)
        return norm

    def weights_exploded(self) -> torch.Tensor:
        """1.0 (on the device, no sync) if a local parameter or EMA shard is non-finite or beyond MAX_WEIGHT_ABS."""
        tensors = [t for t in (*self.local_params(), *self.ema1.shadow, *self.ema2.shadow) if t.numel()]
        peak = torch.stack(torch._foreach_norm(tensors, math.inf)).max().float()
        return (~(peak <= MAX_WEIGHT_ABS)).float()

    def ema_model(self, which: str, model_cfg: ModelConfig, device: torch.device, is_main: bool) -> JiT | None:
        """A plain eval-mode copy of the net holding EMA weights (collective; returned where `is_main`)."""
        state = self.ema_state(self.ema1 if which == "ema1" else self.ema2)
        full = {n: D.full_tensor(state[n]).detach().cpu() for n in self.names}
        if not is_main:
            return None
        net = JiT(dataclasses.replace(model_cfg, attn_drop=0.0, proj_drop=0.0))
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(full[n])
        return net.to(device).eval()
