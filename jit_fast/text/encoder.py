"""A Hugging Face text encoder (AutoTokenizer + AutoModel) turning captions into JiT's text condition.

Captions are tokenized right-padded to at most `max_length` tokens, the last hidden states are mean-pooled
over the attention mask (fp32), and in sequence mode the first per-token states are kept as well. Right
padding makes a caption's embedding independent of the batch it is padded in (causal models never see the
pads, bidirectional ones mask them). The encoder is frozen by default: no gradients, eval mode, nothing for
the optimizer, EMA or checkpoint; `EncoderSpec` (name, revision, width, length) identifies its encodings.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from jit_fast.shared.conditioning import TextCondition
from jit_fast.shared.errors import UserError
from jit_fast.shared.quiet import quiet_pytree_notices

DEFAULT_MAX_LENGTH = 77


class EncoderError(UserError, ValueError):
    """A text encoder that cannot be loaded or used as asked, named with the reason."""


@dataclass(frozen=True)
class EncoderSpec:
    """What a caption embedding depends on: recorded in embedding caches and checkpoints, compared on reuse."""

    name: str  # hub id or local directory as given
    revision: str  # hub commit hash, or "sha256:..." of a local directory's files
    hidden_size: int
    max_length: int

    def to_dict(self) -> dict:
        return asdict(self)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, L, E) over the positions where mask (B, L) is set, in fp32; a row without any is refused."""
    m = mask.to(torch.float32)
    counts = m.sum(dim=1, keepdim=True)
    if bool((counts == 0).any()):
        raise EncoderError("a caption has no tokens to pool (empty tokenization)")
    return (hidden.float() * m.unsqueeze(-1)).sum(dim=1) / counts


def directory_revision(path: str | Path) -> str:
    """Content revision of a local encoder directory: sha256 over the names and bytes of its top-level files."""
    h = hashlib.sha256()
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        h.update(entry.name.encode() + b"\0")
        with open(entry.path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return "sha256:" + h.hexdigest()


class TextEncoder(nn.Module):
    """Tokenizer + transformer encoding captions into `TextCondition`s (pooled; per-token states on request)."""

    def __init__(self, tokenizer, model: nn.Module, spec: EncoderSpec, freeze: bool = True) -> None:
        super().__init__()
        self.tokenizer, self.model, self.spec, self.frozen = tokenizer, model, spec, freeze
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:  # causal LMs often ship without one; pads are masked out anyway
            fallback = tokenizer.eos_token or tokenizer.unk_token
            if fallback is None:
                raise EncoderError(f"text encoder {spec.name}: the tokenizer has no pad, eos or unk token to pad with")
            tokenizer.pad_token = fallback
        if freeze:
            model.requires_grad_(False)
        self.train(False)

    @classmethod
    def load(
        cls,
        name: str | Path,
        *,
        revision: str | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        freeze: bool = True,
        progress: bool = True,
    ) -> TextEncoder:
        """Load `name` (hub id or local directory) with AutoTokenizer/AutoModel; bf16 on a GPU, fp32 elsewhere.
        `progress=False` also silences transformers' weight-loading bar (a CLI's --no-progress)."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if max_length < 1:
            raise EncoderError(f"--max-text-len must be >= 1, got {max_length}")
        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        name = os.fspath(name)
        bars = hf_logging.is_progress_bar_enabled()
        if not progress:
            hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
            with quiet_pytree_notices():  # transformers imports torchao (if installed) while it loads a model
                model = AutoModel.from_pretrained(name, revision=revision, dtype=dtype)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EncoderError(f"cannot load text encoder {name!r}: {first}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()  # T5-style: the encoder stack alone gives the caption states
        if os.path.isdir(name):
            rev = directory_revision(name)
        else:
            rev = getattr(model.config, "_commit_hash", None) or revision or "unknown"
        hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
        if not isinstance(hidden, int):
            raise EncoderError(f"text encoder {name}: its config names no hidden_size")
        spec = EncoderSpec(name=name, revision=rev, hidden_size=hidden, max_length=max_length)
        return cls(tokenizer, model.to(device), spec, freeze=freeze)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> TextEncoder:
        """A frozen encoder stays in eval mode (no dropout) whatever the trainer sets."""
        super().train(mode and not self.frozen)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters for the optimizer: none when frozen."""
        return [] if self.frozen else [p for p in self.model.parameters() if p.requires_grad]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, L <= max_length), right-padded, on the encoder's device."""
        batch = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.spec.max_length,
                               return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def hidden_states(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states (B, L, E) in the encoder's dtype and the bool attention mask (B, L)."""
        batch = self.tokenize(captions)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            hidden = self.model(**batch).last_hidden_state
        return hidden, batch["attention_mask"].bool()

    def forward(self, captions: list[str], seq_len: int = 0) -> TextCondition:
        """Pooled fp32 embeddings of `captions`; with seq_len > 0 also their first seq_len per-token states (fp32)."""
        hidden, mask = self.hidden_states(captions)
        pooled = masked_mean(hidden, mask)
        if seq_len <= 0:
            return TextCondition(pooled)
        tokens, tmask = hidden[:, :seq_len].float(), mask[:, :seq_len]
        short = seq_len - tokens.shape[1]
        if short > 0:
            tokens = nn.functional.pad(tokens, (0, 0, 0, short))
            tmask = nn.functional.pad(tmask, (0, short))
        return TextCondition(pooled, tokens * tmask.unsqueeze(-1), tmask)
