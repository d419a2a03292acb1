"""Prompts to the condition of a trained text model: the encoder its checkpoint names, checked, run once.

A text model's checkpoint records the `EncoderSpec` of the embeddings it was trained on (name, revision, width,
max length). Sampling loads that encoder (or the one `--text-encoder` names, e.g. a copy of a local directory),
refuses it when its revision, width or length differ, and encodes every prompt once; the sampler then takes
the rows of image i's prompt (`prompts.prompt_conditions`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from jit_fast.configs import ModelConfig
from jit_fast.shared.conditioning import TextCondition
from jit_fast.shared.errors import UsageError
from jit_fast.shared.files import atomic_write
from jit_fast.text.encoder import EncoderError, EncoderSpec, TextEncoder
from jit_fast.text.prompts import read_prompts


def recorded_spec(spec: dict | None, source: str) -> EncoderSpec:
    """The EncoderSpec a checkpoint records; EncoderError naming `source` when it records none."""
    if spec is None:
        raise EncoderError(f"{source} is a text model but records no text encoder: pass --text-encoder NAME_OR_DIR")
    return EncoderSpec(**spec)


def load_matching_encoder(spec: EncoderSpec, device: torch.device, name: str | None = None) -> TextEncoder:
    """The encoder `spec` describes (loaded from `name` when given); refused unless it yields the same embeddings."""
    where = name or spec.name
    local = os.path.isdir(where)
    encoder = TextEncoder.load(where, revision=None if local else spec.revision, max_length=spec.max_length,
                               device=device)
    got = encoder.spec
    wrong = [f"{what} {have!r} (trained with {want!r})" for what, have, want in (
        ("revision", got.revision, spec.revision), ("hidden size", got.hidden_size, spec.hidden_size))
        if have != want]
    if wrong:
        raise EncoderError(f"text encoder {where}: {'; '.join(wrong)}: its embeddings are not the ones the model "
                           "was trained on")
    return encoder


def encode_prompts(encoder: TextEncoder, prompts: list[str], mcfg: ModelConfig, batch_size: int = 256
                   ) -> TextCondition:
    """Every prompt's condition (pooled; the model's in-context tokens in sequence mode), on the encoder's device."""
    seq = mcfg.in_context_len if mcfg.text_tokens == "sequence" else 0
    parts = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch_size):
            parts.append(encoder(prompts[s:s + batch_size], seq_len=seq))
    out = parts[0]
    for p in parts[1:]:
        out = out.cat(p)
    return TextCondition(out.pooled, out.tokens, out.mask)


def set_empty_text(net: torch.nn.Module, encoder: TextEncoder, mcfg: ModelConfig) -> None:
    """A null_text='empty' model gets the encoder's embedding of "" (EMA weight sets hold parameters only)."""
    if mcfg.conditioning != "text" or mcfg.null_text != "empty":
        return
    try:
        empty = encoder([""], seq_len=mcfg.in_context_len if mcfg.text_tokens == "sequence" else 0)
    except EncoderError as exc:
        raise EncoderError(f"text encoder {encoder.spec.name}: {exc}; this model's null caption is the empty "
                           "one") from None
    tokens = None if empty.tokens is None else empty.tokens[0][empty.mask[0]]
    net.y_embedder.set_empty_text(empty.pooled[0], tokens)



def demo_condition(encoder: TextEncoder, mcfg: ModelConfig) -> Callable[[torch.Tensor, int], TextCondition]:
    """The text demo's judge: image start + j, of digit labels[j], is prompted with phrasing (start + j) // 10."""
    from jit_fast.data.demo import PHRASINGS, demo_prompts

    table = encode_prompts(encoder, [p for d in range(10) for p in demo_prompts(d)], mcfg)

    def condition(labels: torch.Tensor, start: int) -> TextCondition:
        i = torch.arange(start, start + labels.shape[0])
        rows = labels.cpu() * len(PHRASINGS) + (i // 10) % len(PHRASINGS)
        return table[rows.to(table.device)]

    return condition


def text_encoder_for(net: torch.nn.Module, meta, device: torch.device, name: str | None, prompted: bool
                     ) -> TextEncoder | None:
    """The matching encoder of a text model (its empty caption set), None for a class model; prompts for a class
    model are refused."""
    mcfg = net.cfg
    if mcfg.conditioning != "text":
        if prompted:
            raise UsageError(f"--prompt/--prompts/--images-per-prompt need a text model; {meta.source} is "
                             "class-conditional")
        return None
    encoder = load_matching_encoder(recorded_spec(meta.text_encoder, str(meta.source)), device, name)
    set_empty_text(net, encoder, mcfg)
    return encoder


def with_empty_text(net: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` completed with the net's empty-caption buffers where it lacks them (EMA weight sets hold parameters)."""
    own = {k: v for k, v in net.state_dict().items() if k.startswith("y_embedder.empty_")}
    return {**own, **sd}


def sampling_prompts(prompt: tuple[str, ...], prompts_file: Path | None) -> list[str]:
    """The prompts of a launch: every --prompt, then the lines of --prompts; refused when there are none."""
    out = list(prompt) + (read_prompts(prompts_file) if prompts_file is not None else [])
    if not out:
        raise UsageError("a text model samples from captions: pass --prompt TEXT (repeatable) or --prompts FILE")
    return out


def write_grid_captions(path: Path, prompts: list[str], shown: int, cols: int) -> None:
    """The caption of every image of the grid (image i has prompt i % P), row by row, beside grid.png."""
    cols = min(cols, shown)
    lines = [f"row {i // cols} col {i % cols}\t{prompts[i % len(prompts)]}" for i in range(shown)]
    atomic_write(path, "\n".join(lines) + "\n")
