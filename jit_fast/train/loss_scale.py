"""Dynamic loss scaling for fp16 training: a `torch.amp.GradScaler`, the skipped-step count and its checkpoint state.

fp16 keeps 5 exponent bits: without scaling, small gradients underflow to zero in the fp16 backward. The loss is
multiplied by the scale before backward; `unscale` divides the gradients back (exactly: the scale is a power of
two) and finds inf/NaN before they are clipped; `step` runs AdamW only when every gradient is finite, then halves
the scale after an overflow or doubles it after `growth_interval` clean steps. A skipped step leaves the weights,
the AdamW state (its step count too) and both EMAs unchanged; the run's step counter, learning-rate schedule and
data still advance (the batch is consumed). Under FSDP2 the gradients are DTensors and GradScaler's inf check
all-reduces found-inf over the mesh, so every rank skips the same steps. Disabled (fp32, bf16) it is a no-op.
"""

from __future__ import annotations

import torch

INIT_SCALE = 2.0**16  # GradScaler's default; an overflow on the first steps only halves it


class LossScaler:
    """Owns the GradScaler of one optimizer, the inf flag of the latest step and the count of skipped steps."""

    def __init__(self, enabled: bool, device: torch.device, opt: torch.optim.Optimizer) -> None:
        self.enabled = enabled
        self.opt = opt
        self.scaler = torch.amp.GradScaler(device.type, init_scale=INIT_SCALE, enabled=enabled)
        self.found_inf = torch.zeros((), device=device)  # 1.0 when the latest step was skipped
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)  # steps skipped since the run began
        self.logged = 0  # `skipped` at the last `window` call

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the current scale (the loss itself when disabled)."""
        return self.scaler.scale(loss) if self.enabled else loss

    def unscale(self) -> None:
        """Divide the gradients by the scale and note whether any is inf/NaN (before clipping; no host sync)."""
        if not self.enabled:
            return
        self.scaler.unscale_(self.opt)
        per_device = self.scaler._per_optimizer_states[id(self.opt)]["found_inf_per_device"]
        self.found_inf = sum(v.to(self.found_inf.device) for v in per_device.values()).clamp(max=1.0)

    def step(self) -> None:
        """AdamW step unless the gradients overflowed, then the scale update; counts a skipped step."""
        if not self.enabled:
            self.opt.step()
            return
        self.scaler.step(self.opt)
        self.scaler.update()
        self.skipped += self.found_inf.to(torch.int64)

    def applied(self, value: torch.Tensor) -> torch.Tensor:
        """`value` on a step that was applied, 0 on a skipped one (a skipped step's grad norm is inf)."""
        return torch.where(self.found_inf > 0, torch.zeros_like(value), value) if self.enabled else value

    def window(self, mean_grad_norm: float, steps: int) -> tuple[float, dict[str, float]]:
        """At a metrics flush (host sync): the grad norm averaged over the window's applied steps instead of all
        `steps`, and the scalars to log (total skipped steps, current scale); nothing extra when disabled."""
        if not self.enabled:
            return mean_grad_norm, {}
        skipped = int(self.skipped.item())
        applied = steps - (skipped - self.logged)
        self.logged = skipped
        gnorm = mean_grad_norm * steps / applied if applied else 0.0
        return gnorm, {"skipped_steps": float(skipped), "loss_scale": self.scaler.get_scale()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Scale, growth tracker and skipped count as CPU tensors (a DCP checkpoint entry)."""
        sd = self.scaler.state_dict()
        return {"scale": torch.tensor(sd["scale"], dtype=torch.float64),
                "growth_tracker": torch.tensor(sd["_growth_tracker"], dtype=torch.int64),
                "skipped": self.skipped.detach().cpu().clone()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Continue from a saved `state_dict` (scale, growth tracker, skipped count)."""
        state = self.scaler.state_dict()
        state.update(scale=float(sd["scale"]), _growth_tracker=int(sd["growth_tracker"]))
        self.scaler.load_state_dict(state)
        self.skipped.fill_(int(sd["skipped"]))
        self.logged = int(sd["skipped"])
