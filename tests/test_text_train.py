"""Text-to-image wiring (issue 14): train.py from a caption cache, exact resume, the checkpoint's encoder record,
sample.py with prompts, and the refusals of caches that do not fit. Tiny local encoder, 16 px, a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dist_worker import first_step_grads
from train_helpers import assert_bitwise_equal, checkpoint_tensors, make_text_data, read_losses, tiny_argv

from jit_fast.checkpoint import latest_checkpoint
from jit_fast.checkpoint.dcp import load_dcp_keys
from jit_fast.configs import TrainConfig, model_config
from jit_fast.data.captions import build_caption_index
from jit_fast.data.encode_text import encode_captions
from jit_fast.sampling import generate
from jit_fast.shared.distributed import DistEnv
from jit_fast.text.cache import TextCache, caption_digest
from jit_fast.text.encoder import TextEncoder
from jit_fast.text.sampling import encode_prompts
from jit_fast.text.tiny import build_tiny_encoder
from jit_fast.train.condition import ConditionSource
from jit_fast.train.trainer import main
from jit_kernels.numerics import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    return make_text_data(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def run(text, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-step null_text='empty' run (uninterrupted)."""
    data, _, flags = text
    out = tmp_path_factory.mktemp("text_run")
    assert main(tiny_argv(data, out, *flags, "--null-text", "empty", "--max-steps", "4")) == 0
    return out


def test_resume_is_bitwise_and_the_checkpoint_records_the_encoder(text, run: Path, tmp_path: Path) -> None:
    """2 + 2 resumed steps == 4 steps (catches batch embeddings that depend on anything but the step's samples),
    the encoder spec and text_dim are recorded, and the empty caption's embedding is the cache's."""
    data, cache, flags = text
    half = tmp_path / "half"
    assert main(tiny_argv(data, half, *flags, "--null-text", "empty", "--max-steps", "2")) == 0
    assert main(tiny_argv(data, half, *flags, "--null-text", "empty", "--max-steps", "4", "--resume", str(half))) == 0
    assert_bitwise_equal(checkpoint_tensors(run), checkpoint_tensors(half))
    assert read_losses(run) == read_losses(half)
    ckpt = latest_checkpoint(run)
    meta = json.loads((ckpt / "meta.json").read_text())["model_meta"]
    spec = TextCache(cache).spec
    assert meta["model"] == "JiT-T/4-Text" and meta["text_encoder"] == spec.to_dict()
    assert meta["overrides"]["text_dim"] == spec.hidden_size == 16 and meta["overrides"]["null_text"] == "empty"
    model = load_dcp_keys(ckpt, {"model"})["model"]
    assert torch.equal(model["y_embedder.empty_pooled"], TextCache(cache).empty()[0])


def test_sample_prompts_from_the_checkpoint_encoder(run: Path, tmp_path: Path, capsys) -> None:
    """sample.py encodes --prompt with the recorded encoder: image i gets prompt i % P, captions beside the grid;
    a text model without prompts is a one-line error."""
    out = tmp_path / "samples"
    args = ["--ckpt", str(run), "--steps", "2", "--no-metrics", "--batch-size", "4", "--out", str(out)]
    assert generate.main([*args, "--prompt", "a red picture", "--prompt", "the blue picture",
                          "--images-per-prompt", "3"]) == 0
    npz = np.load(out / "samples.npz")
    assert npz["images"].shape == (6, 16, 16, 3) and npz["labels"].tolist() == [0, 1, 0, 1, 0, 1]
    lines = (out / "grid_captions.txt").read_text().splitlines()
    assert len(lines) == 6 and lines[1] == "row 0 col 1\tthe blue picture"
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["prompts"] == ["a red picture", "the blue picture"] and config["text_encoder"]["hidden_size"] == 16
    assert generate.main([*args, "--out", str(tmp_path / "none")]) == 2
    assert "pass --prompt" in capsys.readouterr().err


def test_caches_that_do_not_fit_are_refused(text, run: Path, tmp_path: Path, capsys) -> None:
    """Another encoder's cache, a cache of changed captions, and (on resume) a cache of an encoder other than the
    checkpoint's are refused with one line naming the cache's index.json."""
    data, cache, flags = text
    assert main(tiny_argv(data, tmp_path / "a", *flags, "--text-encoder", "other/encoder", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "index.json" in err and "encoder" in err and "other/encoder" in err

    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    (changed / "captions" / "c0_000.txt").write_text("a purple picture\n")
    assert main(tiny_argv(changed, tmp_path / "b", *flags, "--max-steps", "1")) == 2
    assert "captions changed since they were encoded" in capsys.readouterr().err

    captions = [p.read_text().strip() for p in sorted((data / "captions").iterdir())]
    other = build_tiny_encoder(tmp_path / "enc2", captions, hidden_size=16, layers=1, heads=2, seed=1)
    cache2 = encode_captions(data, TextEncoder.load(other, device="cpu"), tmp_path / "cache2", progress=False)
    resumed = tiny_argv(data, tmp_path / "c", *flags, "--max-steps", "5", "--resume", str(run),
                        "--text-cache", str(cache2))
    assert main(resumed) == 2
    err = capsys.readouterr().err
    assert "index.json" in err and "revision" in err


def test_live_frozen_encoder_trains_without_a_cache_and_stays_out_of_the_checkpoint(text, run: Path,
                                                                                      tmp_path: Path) -> None:
    """--text-encoder without --text-cache encodes each batch's captions per step (the fork's way): the encoder is
    recorded, but its weights reach neither the optimizer nor the checkpoint (same keys as the cached run)."""
    data, cache, _ = text
    spec = TextCache(cache).spec
    out = tmp_path / "live"
    assert main(tiny_argv(data, out, "--model", "JiT-T/4-Text", "--text-encoder", spec.name, "--null-text", "empty",
                          "--max-steps", "2")) == 0
    meta = json.loads((latest_checkpoint(out) / "meta.json").read_text())["model_meta"]
    assert meta["text_encoder"] == spec.to_dict()
    assert checkpoint_tensors(out).keys() == checkpoint_tensors(run).keys()


def test_fork_flag_spellings_and_the_unsupported_unfrozen_encoder() -> None:
    """The fork's flags map onto ours; --text-tokens/--null-text are model args; --no-freeze-llm is refused."""
    from jit_fast.train.cli import ConfigError, parse_config

    cfg, _ = parse_config(["--preset", "demo", "--use_text_conditioning", "--llm_model_name", "org/llm",
                           "--max_text_len", "64", "--freeze_llm", "--text-tokens", "sequence", "--null-text", "empty"])
    assert (cfg.model, cfg.text_encoder, cfg.max_text_len) == ("JiT-T/4-Text", "org/llm", 64)
    assert cfg.extra_model_args["text_tokens"] == "sequence" and cfg.extra_model_args["null_text"] == "empty"
    assert cfg.extra_model_args["hidden_size"] == 128  # the preset's model args are kept
    with pytest.raises(ConfigError, match="--no-freeze-llm .* not supported yet"):
        parse_config(["--preset", "demo-text", "--no-freeze-llm"])


def test_sequence_tokens_train_resume_and_sample(text, tmp_path: Path) -> None:
    """--text-tokens sequence end to end: a sequence cache and the live encoder give the same first-step gradients
    (catches the two disagreeing on tokens, padding or masks), 2 + 1 resumed steps equal 3 bitwise,
    and sample.py's prompt tokens are the ones the cache trained on."""
    data, cache, _ = text
    spec = TextCache(cache).spec
    seq_cache = encode_captions(data, TextEncoder.load(spec.name, device="cpu"), tmp_path / "seq_cache",
                                pooling="sequence", seq_len=8, progress=False)
    model = ["--model", "JiT-T/4-Text", "--text-tokens", "sequence"]
    cached = [*model, "--text-cache", str(seq_cache)]
    full, half = tmp_path / "full", tmp_path / "half"
    assert main(tiny_argv(data, full, *cached, "--max-steps", "3")) == 0
    assert main(tiny_argv(data, half, *cached, "--max-steps", "2")) == 0
    assert main(tiny_argv(data, half, *cached, "--max-steps", "3", "--resume", str(half))) == 0
    assert_bitwise_equal(checkpoint_tensors(full), checkpoint_tensors(half))
    # A few steps from the zero-initialised gates barely see the condition; perturbed weights make every input count.
    grads = {src: first_step_grads(tiny_argv(data, tmp_path / src, *model, *flags, "--max-steps", "1"))
             for src, flags in (("cache", ["--text-cache", str(seq_cache)]), ("live", ["--text-encoder", spec.name]))}
    assert grads["cache"].keys() == grads["live"].keys()
    far = {k: rel_err(grads["live"][k], g) for k, g in grads["cache"].items() if rel_err(grads["live"][k], g) > 1e-3}
    assert not far, far  # the cache stores float16 embeddings: ~1e-4 apart

    out = tmp_path / "samples"
    assert generate.main(["--ckpt", str(full), "--steps", "2", "--no-metrics", "--batch-size", "2", "--out", str(out),
                          "--prompt", "a red picture", "--prompt", "the blue picture"]) == 0
    assert np.load(out / "samples.npz")["images"].shape == (2, 16, 16, 3)
    mcfg = model_config("JiT-T/4-Text", text_dim=16, text_tokens="sequence")
    prompted = encode_prompts(TextEncoder.load(spec.name, device="cpu"), ["a red picture"], mcfg)
    trained = TextCache(seq_cache)
    row = trained.digests.index(caption_digest("a red picture"))
    stored = trained.condition(np.array([row]))
    assert torch.equal(prompted.mask, stored.mask) and int(stored.mask.sum()) > 1
    torch.testing.assert_close(prompted.tokens.float(), stored.tokens.float(), rtol=1e-3, atol=1e-3)


def test_each_sample_gets_its_own_captions_embedding_when_the_loader_skips_an_image(text, tmp_path: Path) -> None:
    """A cache encoded before an image went bad: the loader skips that image, so its sample numbers are no longer
    the cache's rows; every sample still gets the embedding of its own caption (rows looked up by key)."""
    data, cache, _ = text
    part = tmp_path / "part"
    shutil.copytree(data, part)
    sorted((part / "images").iterdir())[0].write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping 1"):
        index = build_caption_index(part, img_size=16, cache=False)
    assert index.keys == TextCache(cache).keys[1:]
    source = ConditionSource.build(TrainConfig(model="JiT-T/4-Text", img_size=16, text_cache=str(cache)),
                                   SimpleNamespace(index=index), DistEnv())
    samples = [0, 14, 15, 62]  # the first of class 0 left, the first of class 1, the last
    got = source(torch.tensor(samples)).pooled
    want = TextEncoder.load(TextCache(cache).spec.name, device="cpu")([index.captions[i] for i in samples]).pooled
    torch.testing.assert_close(got.float(), want, rtol=2**-10, atol=1e-6)  # float16 storage


def test_live_encoder_and_cache_give_the_same_empty_caption(text, tmp_path: Path) -> None:
    """--null-text empty in sequence mode: the empty caption's pooled and per-token states (its own tokens only, no
    padding slots) are the same whether captions come from a cache or from the encoder run per step."""
    data, cache, _ = text
    name = TextCache(cache).spec.name
    seq_cache = encode_captions(data, TextEncoder.load(name, device="cpu"), tmp_path / "seq_cache",
                                pooling="sequence", seq_len=8, progress=False)
    loader = SimpleNamespace(index=build_caption_index(data, img_size=16, cache=False))
    model = dict(model="JiT-T/4-Text", img_size=16, extra_model_args={"text_tokens": "sequence", "null_text": "empty"})
    cached = ConditionSource.build(TrainConfig(**model, text_cache=str(seq_cache)), loader, DistEnv())
    live = ConditionSource.build(TrainConfig(**model, text_encoder=name), loader, DistEnv())
    (pooled, tokens), (live_pooled, live_tokens) = cached.empty, live.empty
    assert tokens.shape == (2, 16)  # [CLS] [SEP]
    assert torch.equal(pooled, live_pooled) and torch.equal(tokens, live_tokens)
