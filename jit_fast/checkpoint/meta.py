"""What every checkpoint kind records about its network: `ModelMeta`, and the package's `CheckpointError`.

On disk the model metadata is a JSON object: ``meta.json["model_meta"]`` of a DCP checkpoint holds the
architecture keys (``model``, ``img_size``, ``num_classes``, ``overrides``); the ``jit_fast_meta``
header of a ``.safetensors`` file holds those plus the sampling recipe (``noise_scale``, ``t_eps``,
``P_mean``, ``P_std``) and ``step`` / ``epoch``. An official ``.pth`` records the same facts in its
argparse ``args`` (`jit_fast.checkpoint.official`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jit_fast.shared.errors import UserError

ARCH_KEYS = ("model", "img_size", "num_classes", "overrides")
RECIPE_KEYS = ("noise_scale", "t_eps", "P_mean", "P_std")
PROGRESS_KEYS = ("step", "epoch")
TEXT_KEYS = ("text_encoder",)
ENCODER_FIELDS = {"name": str, "revision": str, "hidden_size": int, "max_length": int}
_ON_DISK = (*ARCH_KEYS, *RECIPE_KEYS, *PROGRESS_KEYS, *TEXT_KEYS)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model."""


@dataclass(frozen=True)
class ModelMeta:
    """The network a checkpoint holds (preset, size, classes, constructor overrides), its recipe and provenance.

    Unknown fields are None. `source`, `kind` ("dcp", "official", "safetensors") and `weights`
    ("ema1", "ema2", "model") say where loaded weights came from; they are never written.
    """

    model: str | None = None
    img_size: int | None = None
    num_classes: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    noise_scale: float | None = None
    t_eps: float | None = None
    P_mean: float | None = None
    P_std: float | None = None
    step: int | None = None
    epoch: int | None = None
    text_encoder: dict[str, Any] | None = None
    source: str | None = None
    kind: str | None = None
    weights: str | None = None

    @classmethod
    def from_dict(cls, d: Any, source: str | Path, required: tuple[str, ...] = ()) -> ModelMeta:
        """Parse an on-disk metadata object; CheckpointError naming `source` for unknown, missing or mistyped keys."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: model metadata is a {type(d).__name__}, expected a JSON object")
        unknown = sorted(set(d) - set(_ON_DISK))
        if unknown:
            raise CheckpointError(f"{source}: unknown model metadata key(s) {unknown} (known: {', '.join(_ON_DISK)})")
        missing = [k for k in required if k not in d]
        if missing:
            raise CheckpointError(f"{source}: model metadata lacks {missing}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if v is None:
                continue
            try:
                kw[k] = _convert(k, v)
            except (TypeError, ValueError):
                raise CheckpointError(f"{source}: model metadata {k}={v!r} is not a valid value") from None
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk object: known architecture and recipe keys (`overrides` always); no progress or provenance."""
        out: dict[str, Any] = {}
        for k in (*ARCH_KEYS, *RECIPE_KEYS, *TEXT_KEYS):
            v = getattr(self, k)
            if v is not None:
                out[k] = dict(v) if k == "overrides" else v
        return out

    def recipe(self) -> dict[str, float]:
        """The recorded recipe values (noise_scale, t_eps, P_mean, P_std), unknown ones left out."""
        return {k: getattr(self, k) for k in RECIPE_KEYS if getattr(self, k) is not None}

    def replace(self, **changes: Any) -> ModelMeta:
        """A copy with `changes` applied."""
        return dataclasses.replace(self, **changes)


def _convert(key: str, v: Any) -> Any:
    """One on-disk value in the type of its field; TypeError/ValueError if it has none."""
    if key == "model":
        if not isinstance(v, str):
            raise TypeError(key)
        return v
    if key == "overrides":
        if not isinstance(v, dict):
            raise TypeError(key)
        return dict(v)
    if key == "text_encoder":
        if not (isinstance(v, dict) and set(v) == set(ENCODER_FIELDS) and all(
                isinstance(v[f], t) and not isinstance(v[f], bool) for f, t in ENCODER_FIELDS.items())):
            raise TypeError(key)
        return dict(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(key)
    return float(v) if key in RECIPE_KEYS else int(v)


def short_error(e: BaseException) -> str:
    """One line for an exception; DCP's CheckpointException is reduced to the first rank's cause."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = next(iter(failures.items()))
        cause = pair[0] if isinstance(pair, tuple) else pair
        return f"rank {rank}: {short_error(cause)}"
    text = str(e).strip().splitlines()
    name = type(e).__name__
    if not text:
        return f"{name} (truncated or corrupt file?)" if isinstance(e, EOFError) else name
    return text[-1] if text[-1].startswith(name) else f"{name}: {text[-1]}"
