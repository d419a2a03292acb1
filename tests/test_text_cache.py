"""The caption-embedding cache: equal to live encoding, resumable, world-size independent, refuses what does
not fit (other encoder, length, pooling, changed captions) and damaged files, naming the file."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import describe, subprocess_env, torchrun

import jit_fast.data.encode_text as encode_text
from jit_fast.data.encode_text import encode_captions
from jit_fast.text.cache import CacheError, TextCache
from jit_fast.text.encoder import TextEncoder
from jit_fast.text.tiny import build_tiny_encoder

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [f"a handwritten {w}" if i % 2 else f"the digit {i} , {w}" for i, w in enumerate(WORDS)] + ["one more one"]
pytestmark = pytest.mark.usefixtures("one_thread")


def make_captioned(root, captions=CAPTIONS):
    (root / "images").mkdir(parents=True)
    (root / "captions").mkdir()
    for i, text in enumerate(captions):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "images" / f"{i:02d}.png")
        (root / "captions" / f"{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_captioned(tmp_path_factory.mktemp("capdata"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return TextEncoder.load(build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny", CAPTIONS), device="cpu")


def build(data, encoder, out, **kw):
    return encode_captions(data, encoder, out, shard_rows=4, batch_size=3, progress=False, **kw)


@pytest.mark.parametrize("pooling", ["pooled", "sequence"])
def test_cached_embeddings_equal_live_ones(data, encoder, tmp_path, pooling):
    cache = TextCache(build(data, encoder, tmp_path / "c", pooling=pooling, seq_len=8))
    keys = [f"{i:02d}" for i in range(len(CAPTIONS))]
    assert cache.keys == keys and len(cache.pooled) == 3  # 11 captions in shards of 4
    perm = np.array([7, 0, 10, 3, 3, 5])
    got = cache.condition(cache.rows([keys[i] for i in perm], [CAPTIONS[i] for i in perm]))
    seq = 8 if pooling == "sequence" else 0
    live = encoder([CAPTIONS[i] for i in perm], seq_len=seq)

    def fp16_close(cached, want):  # float16 storage: within its rounding (2^-11 relative) of the live value
        assert cached.dtype == torch.float16
        assert ((cached.float() - want).abs() <= 2**-11 * want.abs() + 1e-6).all()

    fp16_close(got.pooled, live.pooled)
    first = encoder(CAPTIONS[:3], seq_len=seq)  # the cache's first batch, padded alike: bitwise
    assert torch.equal(cache.condition(np.arange(3)).pooled, first.pooled.half())
    if pooling == "sequence":
        fp16_close(got.tokens, live.tokens)
        assert torch.equal(got.mask, live.mask) and not got.mask.all()
        assert torch.equal(cache.condition(np.arange(3)).tokens, first.tokens.half())
    else:
        assert got.tokens is None
    pooled, tokens = cache.empty()
    empty = encoder([""], seq_len=seq)
    assert torch.equal(pooled, empty.pooled[0])
    if pooling == "sequence":
        assert tokens.shape == (2, 32) and torch.equal(tokens, empty.tokens[0, :2])  # [CLS] [SEP]
    cache.require(encoder=encoder.spec.name, revision=encoder.spec.revision, max_length=77, pooling=pooling, dim=32,
                  context_len=8)


def test_interrupted_run_resumes_with_the_same_result(data, encoder, tmp_path, monkeypatch):
    fresh = build(data, encoder, tmp_path / "fresh")
    calls = []
    real = encode_text.write_rows

    def flaky(*args):
        calls.append(len(args[3]))
        if len(calls) == 2:  # after the first batch of 3: stopped in the middle of shard 0
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(encode_text, "write_rows", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(data, encoder, tmp_path / "c")
    with pytest.raises(CacheError, match="incomplete"):
        TextCache(tmp_path / "c")
    calls.clear()
    monkeypatch.setattr(encode_text, "write_rows", lambda *a: (calls.append(len(a[3])), real(*a))[1])
    build(data, encoder, tmp_path / "c")
    assert calls == [1, 3, 1, 3]  # the batch written before the interruption is kept
    for f in sorted(fresh.iterdir()):
        assert (tmp_path / "c" / f.name).read_bytes() == f.read_bytes(), f.name
    calls.clear()
    build(data, encoder, tmp_path / "c")  # complete: nothing to do
    assert calls == []


def test_cache_refuses_other_settings(data, encoder, tmp_path):
    out = build(data, encoder, tmp_path / "c")
    cache = TextCache(out)
    index = str(out / "index.json")
    for kw, needle in ((dict(encoder="llm-jp/llm-jp-3-3.7b"), "encoder '"), (dict(max_length=32), "max text length 77"),
                       (dict(pooling="sequence"), "pooling 'pooled'"), (dict(revision="abc"), "encoder revision"),
                       (dict(dim=3072), "embedding width 32")):
        with pytest.raises(CacheError, match=needle) as err:
            cache.require(**kw)
        assert index in str(err.value)
    with pytest.raises(CacheError, match="captions changed") as err:
        cache.rows(["00", "01"], [CAPTIONS[0], "a new caption"])
    assert "'01'" in str(err.value)
    with pytest.raises(CacheError, match="not cached"):
        cache.rows(["00", "99"])
    short = TextEncoder.load(encoder.spec.name, device="cpu", max_length=16)
    with pytest.raises(CacheError, match="other settings.*max_length"):
        build(data, short, out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a text cache"):
        build(data, encoder, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_encoding_changed_captions_into_an_existing_cache_is_refused(data, encoder, tmp_path):
    """The same keys with a changed caption: encode_text refuses to resume or reuse the cache (its rows hold the old
    captions' embeddings), and leaves its index as it was."""
    import shutil

    out = build(data, encoder, tmp_path / "c")
    index = (out / "index.json").read_text()
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    (changed / "captions" / "03.txt").write_text("a handwritten three , again")
    with pytest.raises(CacheError, match="other settings.*captions differ"):
        build(changed, encoder, out)
    assert (out / "index.json").read_text() == index


def test_sequence_cache_shorter_than_the_context_is_named(data, encoder, tmp_path):
    cache = TextCache(build(data, encoder, tmp_path / "c", pooling="sequence", seq_len=4))
    with pytest.raises(CacheError, match="re-encode with --seq-tokens 8"):
        cache.require(context_len=8)


def test_damaged_cache_files_are_named(data, encoder, tmp_path):
    import shutil

    good = build(data, encoder, tmp_path / "good")

    def damaged(name, edit):
        out = tmp_path / name
        shutil.copytree(good, out)
        edit(out)
        return out

    def swap_array(out, arr):
        np.save(out / "pooled-00001.npy", arr, allow_pickle=True)

    cases = [
        (lambda o: (o / "pooled-00001.npy").write_bytes(pickle.dumps({"evil": 1})), "pooled-00001.npy: not a readable"),
        (lambda o: swap_array(o, np.array([object()] * 4)), "pooled-00001.npy: not a readable"),
        (lambda o: swap_array(o, np.zeros((4, 32), np.float32)), r"holds float32 \(4, 32\), expected float16"),
        (lambda o: swap_array(o, np.zeros((3, 32), np.float16)), r"\(3, 32\), expected float16 \(4, 32\)"),
        (lambda o: (o / "pooled-00002.npy").unlink(), "pooled-00002.npy: missing"),
        (lambda o: (o / "index.json").write_text("{"), "index.json: unreadable"),
        (lambda o: (o / "index.json").write_text(json.dumps({**json.loads((good / "index.json").read_text()),
                                                             "keys": ["00"] * 11})), "duplicate keys"),
    ]
    for i, (edit, needle) in enumerate(cases):
        with pytest.raises(CacheError, match=needle):
            TextCache(damaged(f"d{i}", edit))
    nan = damaged("nan", lambda o: None)
    arr = np.load(nan / "pooled-00001.npy", mmap_mode="r+")
    arr[2, 5] = np.nan
    arr.flush()
    del arr
    cache = TextCache(nan)
    cache.condition(cache.rows(["00", "05"]))  # other rows still load
    with pytest.raises(CacheError, match="pooled-00001.npy: non-finite embedding for key '06'"):
        cache.condition(cache.rows(["06"]))


def test_cli_writes_a_cache_and_reports_errors(data, encoder, tmp_path, capsys):
    out = tmp_path / "cli"
    assert encode_text.main([str(data), "--encoder", encoder.spec.name, "--out", str(out), "--no-progress",
                             "--device", "cpu"]) == 0
    assert len(TextCache(out)) == len(CAPTIONS)
    assert encode_text.main([str(data), "--encoder", str(tmp_path / "none"), "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("encode_text: error: cannot load text encoder")


@pytest.mark.slow
def test_two_ranks_write_the_cache_of_one(data, encoder, tmp_path):
    """Rank r encodes shards r, r + 2, ...; batches never cross shards, so the files equal one process's."""
    one = build(data, encoder, tmp_path / "one", pooling="sequence", seq_len=5)
    p = torchrun(["-m", "jit_fast.data.encode_text", str(data), "--encoder", encoder.spec.name, "--out",
                  str(tmp_path / "two"), "--batch-size", "3", "--shard-rows", "4", "--pooling", "sequence",
                  "--seq-tokens", "5", "--device", "cpu", "--no-progress"], env=subprocess_env())
    assert p.returncode == 0, describe(p)
    for f in sorted(one.iterdir()):
        assert (tmp_path / "two" / f.name).read_bytes() == f.read_bytes(), f.name
