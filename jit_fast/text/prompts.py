"""Prompts for text-to-image sampling: `--prompt` flags or a `--prompts` file, image i gets prompt i mod P."""

from __future__ import annotations

from pathlib import Path

import torch

from jit_fast.shared.conditioning import TextCondition
from jit_fast.shared.errors import UserError

MAX_PROMPTS_BYTES = 1 << 24  # a prompts file over 16 MiB is refused
PROMPT_RULE = "i % num_prompts"


class PromptError(UserError, ValueError):
    """Prompts that cannot be used, naming the file or flag."""


def read_prompts(path: str | Path) -> list[str]:
    """Non-blank lines of a UTF-8 prompts file (whitespace runs collapsed), in order; an empty file is refused."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_PROMPTS_BYTES + 1)
    except OSError as exc:
        raise PromptError(f"--prompts {path}: cannot read ({exc.strerror})") from exc
    if len(raw) > MAX_PROMPTS_BYTES:
        raise PromptError(f"--prompts {path}: over {MAX_PROMPTS_BYTES} bytes")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"--prompts {path}: not UTF-8 text (byte {exc.start})") from exc
    prompts = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PromptError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def prompt_indices(start: int, end: int, num_prompts: int) -> torch.Tensor:
    """Prompt of images [start, end): image i gets prompt i % num_prompts (world-size independent, as class labels)."""
    return torch.arange(start, end, dtype=torch.long) % num_prompts


def prompt_conditions(encoded: TextCondition, start: int, end: int) -> TextCondition:
    """Rows of the once-encoded prompts for images [start, end)."""
    return encoded[prompt_indices(start, end, encoded.rows).to(encoded.device)]
