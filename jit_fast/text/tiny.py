"""A tiny local text encoder (no download): a word-level tokenizer from the captions and a seeded random BERT.

Saved with `save_pretrained`, so it loads through the same AutoTokenizer/AutoModel path as a hub encoder.
Used by the tests and by the demo-text preset; its random weights still give every word its own direction,
which is all a demo on a handful of phrasings needs.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from jit_fast.text.encoder import EncoderError

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
_MARKER = "jit_fast_tiny_encoder.json"


def caption_words(captions: list[str]) -> list[str]:
    """Sorted vocabulary of the captions as the tokenizer splits them (lowercase words and punctuation)."""
    return sorted({w for c in captions for w in re.findall(r"\w+|[^\w\s]+", c.lower())})


def build_tiny_encoder(
    out_dir: str | Path,
    captions: list[str],
    *,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_length: int = 77,
    seed: int = 0,
) -> Path:
    """Write the tokenizer and a seeded random BertModel into out_dir (kept if already built with these inputs)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    words = caption_words(captions)
    recipe = dict(words=words, hidden_size=hidden_size, layers=layers, heads=heads, max_length=max_length, seed=seed)
    marker = out / _MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == recipe:
                return out
        except (OSError, ValueError):
            pass
    elif out.exists():
        raise EncoderError(f"{out} exists and is not a tiny encoder written by jit_fast: not replaced")
    vocab = {t: i for i, t in enumerate(list(SPECIAL) + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", model_max_length=max_length)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden_size,
                        max_position_embeddings=max_length + 2, pad_token_id=vocab["[PAD]"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_encoder_", dir=out.parent))
    try:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(recipe))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
