"""Demo assets of the text-to-image demo: the captioned digits and the tiny local text encoder."""

from __future__ import annotations

import collections

import pytest
from sklearn.datasets import load_digits

from jit_fast.data import build_caption_index, demo_prompts, demo_text_encoder, prepare_demo, prepare_demo_text
from jit_fast.data.demo import DIGIT_WORDS, PHRASINGS
from jit_fast.text.encoder import TextEncoder, directory_revision


def test_captioned_digits(tmp_path):
    root = prepare_demo_text(tmp_path, size=32)
    stamp = (root / "images" / "0000.jpg").stat().st_mtime_ns
    assert prepare_demo_text(tmp_path, size=32) == root and (root / "images" / "0000.jpg").stat().st_mtime_ns == stamp
    index = build_caption_index(root, img_size=32, cache=False)
    labels = load_digits().target
    assert index.keys == [f"{i:04d}" for i in range(1797)] and not index.bad and not index.unpaired
    per_digit = collections.defaultdict(collections.Counter)
    for key, caption in zip(index.keys, index.captions, strict=True):
        d = int(labels[int(key)])
        assert caption in demo_prompts(d)
        assert DIGIT_WORDS[d] in caption.split() or str(d) in caption.split()
        per_digit[d][caption] += 1
    for d in range(10):  # every phrasing of every digit is trained on, evenly
        counts = per_digit[d]
        assert len(counts) == len(PHRASINGS) and max(counts.values()) - min(counts.values()) <= 1
    class_root = prepare_demo(tmp_path / "class", size=32)  # the same pictures as the class demo (same judge)
    for i in (0, 5, 1796):
        name = f"{i:04d}.jpg"
        assert (root / "images" / name).read_bytes() == (class_root / str(labels[i]) / name).read_bytes()


def test_tiny_demo_encoder_is_local_deterministic_and_covers_every_word(tmp_path):
    a, b = demo_text_encoder(tmp_path / "a"), demo_text_encoder(tmp_path / "b")
    assert directory_revision(a) == directory_revision(b)  # seeded: the same revision on every machine
    assert demo_text_encoder(tmp_path / "a") == a
    enc = TextEncoder.load(a, device="cpu")
    prompts = [p for d in range(10) for p in demo_prompts(d)]
    ids = enc.tokenize(prompts)["input_ids"]
    assert enc.tokenizer.unk_token_id not in ids.tolist()[0] and (ids != enc.tokenizer.unk_token_id).all()
    pooled = enc(prompts).pooled
    assert pooled.shape == (60, 32) and len({tuple(v.tolist()) for v in pooled}) == 60
    with pytest.raises(Exception, match="not a tiny encoder"):
        (tmp_path / "c" / "demo_text_encoder").mkdir(parents=True)
        (tmp_path / "c" / "demo_text_encoder" / "mine.txt").write_text("x")
        demo_text_encoder(tmp_path / "c")
