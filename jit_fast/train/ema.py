"""Exponential moving averages of parameters, updated with fused foreach ops."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class EMA:
    """Keeps decay-averaged copies of `params` (works on plain or sharded DTensor parameters)."""

    def __init__(self, params: list[torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor], skip: torch.Tensor | None = None) -> None:
        """shadow = decay * shadow + (1 - decay) * param, rounded as the official update.

        `skip` (a 0-dim tensor, 1.0 on an optimizer step fp16 loss scaling skipped) leaves the shadow unchanged
        without a host sync: the decay becomes 1 and the parameters' weight 0."""
        if skip is None:
            torch._foreach_mul_(self.shadow, self.decay)
            torch._foreach_add_(self.shadow, [p.detach() for p in params], alpha=1.0 - self.decay)
            return
        keep = torch.where(skip > 0, 1.0, self.decay).to(torch.float32)
        take = torch.where(skip > 0, 0.0, 1.0 - self.decay).to(torch.float32)
        torch._foreach_mul_(self.shadow, keep)
        torch._foreach_add_(self.shadow, torch._foreach_mul([p.detach() for p in params], take))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        with torch.no_grad():
            for s, v in zip(self.shadow, sd["shadow"], strict=True):
                s.copy_(v)

    @contextlib.contextmanager
    def swapped_in(self, params: list[torch.Tensor]) -> Iterator[None]:
        """Within the block `params` hold the EMA values; their own values are restored after (also on error)."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in params]
            torch._foreach_copy_([p.detach() for p in params], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.detach() for p in params], saved)
