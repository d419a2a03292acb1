"""The condition `y` a JiT net takes: class labels (a long tensor) or a `TextCondition` of caption embeddings.

The loss and the samplers handle both through the few helpers here (drop to the null condition, the null
condition itself, concatenation, row count, static buffers), so they never branch on the kind of model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.utils._pytree as pytree


@dataclass(frozen=True)
class TextCondition:
    """Caption embeddings of a batch from a frozen text encoder (or its cache).

    `pooled` (B, E) is the mask-mean of the encoder's last hidden states; `tokens` (B, T, E) and `mask`
    (B, T) bool are the per-token states of sequence mode (None in pooled mode); `drop` (B,) bool marks
    rows whose caption is dropped (the model substitutes its null embedding), None when no row is.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    drop: torch.Tensor | None = None

    def __post_init__(self) -> None:
        b = self.pooled.shape[0]
        if self.pooled.ndim != 2:
            raise ValueError(f"pooled text embeddings must be (B, E), got {tuple(self.pooled.shape)}")
        if (self.tokens is None) != (self.mask is None):
            raise ValueError("tokens and mask come together (sequence mode) or not at all (pooled mode)")
        if self.tokens is not None and (
            self.tokens.ndim != 3 or self.tokens.shape[0] != b or self.tokens.shape[2] != self.pooled.shape[1]
            or tuple(self.mask.shape) != tuple(self.tokens.shape[:2])
        ):
            raise ValueError(f"tokens (B, T, E) and mask (B, T) do not fit pooled {tuple(self.pooled.shape)}: "
                             f"{tuple(self.tokens.shape)} and {tuple(self.mask.shape)}")
        if self.drop is not None and tuple(self.drop.shape) != (b,):
            raise ValueError(f"drop must have shape ({b},), got {tuple(self.drop.shape)}")

    @property
    def rows(self) -> int:
        return self.pooled.shape[0]

    @property
    def device(self) -> torch.device:
        return self.pooled.device

    def drop_flags(self) -> torch.Tensor:
        """The drop flags as a (B,) bool tensor (all False when none were set)."""
        if self.drop is None:
            return torch.zeros(self.rows, dtype=torch.bool, device=self.device)
        return self.drop

    def dropped(self, drop: torch.Tensor) -> TextCondition:
        """The same captions with the rows where `drop` is True dropped as well."""
        return replace(self, drop=self.drop_flags() | drop.to(self.device, torch.bool))

    def null(self) -> TextCondition:
        """The null condition of every row (classifier-free guidance's unconditional half)."""
        return replace(self, drop=torch.ones(self.rows, dtype=torch.bool, device=self.device))

    def cat(self, other: TextCondition) -> TextCondition:
        """Rows of self followed by rows of other."""
        if (self.tokens is None) != (other.tokens is None):
            raise ValueError("cannot concatenate pooled and sequence text conditions")

        def join(a, b):
            return None if a is None else torch.cat([a, b])

        return TextCondition(join(self.pooled, other.pooled), join(self.tokens, other.tokens),
                             join(self.mask, other.mask), torch.cat([self.drop_flags(), other.drop_flags()]))

    def __getitem__(self, rows) -> TextCondition:
        """Rows `rows` (a slice or index tensor) of every field."""

        def take(a):
            return None if a is None else a[rows]

        return TextCondition(self.pooled[rows], take(self.tokens), take(self.mask), take(self.drop))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextCondition:
        """All fields on `device`."""

        def move(a):
            return None if a is None else a.to(device, non_blocking=non_blocking)

        return TextCondition(move(self.pooled), move(self.tokens), move(self.mask), move(self.drop))

    def layout(self) -> tuple:
        """Shapes past the batch dimension and dtypes: static buffers are reusable for equal layouts."""
        tok = None if self.tokens is None else (tuple(self.tokens.shape[1:]), self.tokens.dtype)
        return (tuple(self.pooled.shape[1:]), self.pooled.dtype, tok)

    def new_static(self, rows: int) -> TextCondition:
        """A zero buffer of `rows` rows with this layout, every row dropped (the padding of a short batch)."""
        tok = None if self.tokens is None else self.tokens.new_zeros((rows, *self.tokens.shape[1:]))
        mask = None if self.mask is None else self.mask.new_zeros((rows, *self.mask.shape[1:]))
        return TextCondition(self.pooled.new_zeros((rows, *self.pooled.shape[1:])), tok, mask,
                             torch.ones(rows, dtype=torch.bool, device=self.device))

    def fill_(self, src: TextCondition, n: int) -> None:
        """Copy `src` into rows [0, n) in place; rows [n, B) become dropped zero padding."""
        for name in ("pooled", "tokens", "mask"):
            dst, s = getattr(self, name), getattr(src, name)
            if dst is not None:
                dst[n:].zero_()
                dst[:n].copy_(s)
        self.drop[n:].fill_(True)
        self.drop[:n].copy_(src.drop_flags())


pytree.register_dataclass(TextCondition, field_names=["pooled", "tokens", "mask", "drop"], drop_field_names=[])

Condition = torch.Tensor | TextCondition


def condition_rows(y: Condition) -> int:
    """Batch size of a condition."""
    return y.rows if isinstance(y, TextCondition) else y.shape[0]


def condition_device(y: Condition) -> torch.device:
    """Device of a condition."""
    return y.device


def drop_condition(y: Condition, drop: torch.Tensor, null_label: int) -> Condition:
    """Rows where `drop` is True replaced by the null condition (labels: the null class `null_label`)."""
    if isinstance(y, TextCondition):
        return y.dropped(drop)
    return torch.where(drop, torch.full_like(y, null_label), y)


def null_condition(y: Condition, null_label: int) -> Condition:
    """The null condition for every row of y."""
    return y.null() if isinstance(y, TextCondition) else torch.full_like(y, null_label)


def cat_conditions(a: Condition, b: Condition) -> Condition:
    """Rows of a followed by rows of b."""
    return a.cat(b) if isinstance(a, TextCondition) else torch.cat([a, b])


def static_condition(y: Condition | None, rows: int, device: torch.device) -> Condition:
    """A reusable buffer of `rows` rows shaped like y (None: class labels)."""
    if isinstance(y, TextCondition):
        return y.to(device).new_static(rows)
    return torch.zeros(rows, dtype=torch.long, device=device)


def same_layout(buffer: Condition, y: Condition) -> bool:
    """True if `buffer` can hold the rows of y."""
    if isinstance(buffer, TextCondition) or isinstance(y, TextCondition):
        return isinstance(buffer, TextCondition) and isinstance(y, TextCondition) and buffer.layout() == y.layout()
    return True


def fill_condition_(buffer: Condition, y: Condition, n: int) -> None:
    """Rows [0, n) of `buffer` := y in place, the rest zero (labels 0) or dropped (text)."""
    if isinstance(buffer, TextCondition):
        buffer.fill_(y, n)
        return
    buffer[n:].zero_()
    buffer[:n].copy_(y)
