"""The caption encoder: mask-mean pooling, padding invariance, its spec, and staying frozen (no downloads:
tiny encoders with seeded random weights and word-level tokenizers are written into tmp dirs)."""

from __future__ import annotations

import pytest
import torch

import jit_fast
from jit_fast.text.encoder import EncoderError, TextEncoder, directory_revision, masked_mean
from jit_fast.text.tiny import build_tiny_encoder

CAPTIONS = ["a handwritten seven", "the digit 7", "a handwritten one", "the number one written by hand"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny", CAPTIONS)


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    return TextEncoder.load(encoder_dir, device="cpu")


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    """A tiny GPT-2 (causal attention) whose tokenizer has no pad token: the encoder must pad right with unk."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    from jit_fast.text.tiny import caption_words

    vocab = {t: i for i, t in enumerate(["<unk>", *caption_words(CAPTIONS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tmp_path_factory.mktemp("gpt") / "tiny_gpt"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=80)).save_pretrained(out)
    return out


def test_masked_mean_is_the_mean_over_set_positions():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    want = torch.stack([sum(h[b, j] for j in range(5) if mask[b, j]) / int(mask[b].sum()) for b in range(3)])
    torch.testing.assert_close(masked_mean(h, mask), want)
    with pytest.raises(EncoderError, match="no tokens"):
        masked_mean(h, torch.zeros(3, 5, dtype=torch.bool))


def test_pooled_embedding_equals_hand_computation(encoder):
    """Tokens by hand ([CLS] words [SEP]), the model's states on them alone, their plain mean."""
    vocab = encoder.tokenizer.get_vocab()
    ids = [vocab["[CLS]"], vocab["a"], vocab["handwritten"], vocab["seven"], vocab["[SEP]"]]
    with torch.no_grad():
        states = encoder.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    want = sum(states[j] for j in range(len(ids))) / len(ids)
    got = encoder(["a handwritten seven"])
    assert got.tokens is None and got.pooled.dtype == torch.float32
    torch.testing.assert_close(got.pooled[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["bert", "causal"])
def test_padding_does_not_change_a_caption(which, encoder, causal_dir):
    enc = encoder if which == "bert" else TextEncoder.load(causal_dir, device="cpu")
    alone = enc(["a handwritten seven"], seq_len=8)
    padded = enc(["the number one written by hand", "a handwritten seven"], seq_len=8)
    assert int(padded.mask[1].sum()) < int(padded.mask[0].sum())  # the caption really was padded
    torch.testing.assert_close(padded.pooled[1], alone.pooled[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded.tokens[1], alone.tokens[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(padded.mask[1], alone.mask[0])
    assert not padded.tokens[1][~padded.mask[1]].any()  # states past the caption are zeroed, not pad states


def test_truncation_and_sequence_slots(encoder):
    short = TextEncoder.load(encoder.spec.name, device="cpu", max_length=3)
    y = short(["the number one written by hand"], seq_len=5)
    assert y.mask.tolist() == [[True, True, True, False, False]] and short.spec.max_length == 3


def test_spec_records_name_and_content_revision(encoder_dir, encoder, tmp_path):
    assert encoder.spec.name == str(encoder_dir) and encoder.spec.hidden_size == 32
    assert encoder.spec.revision == directory_revision(encoder_dir) and encoder.spec.revision.startswith("sha256:")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in encoder_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert directory_revision(copy) == encoder.spec.revision
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert directory_revision(copy) != encoder.spec.revision


def test_missing_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(EncoderError, match="cannot load text encoder"):
        TextEncoder.load(tmp_path / "nowhere", device="cpu")


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_encoder_gets_no_gradients_and_no_optimizer_slot(encoder_dir, freeze):
    enc = TextEncoder.load(encoder_dir, device="cpu", freeze=freeze)
    net = jit_fast.build_model("JiT-T/4-Text", img_size=16, text_dim=enc.spec.hidden_size)
    with torch.no_grad():  # the official init zeroes adaLN and the output: no gradient would reach the caption
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    opt = torch.optim.AdamW([*net.parameters(), *enc.trainable_parameters()])
    enc.train()
    assert enc.model.training is not freeze
    loss = jit_fast.flow_matching_loss(net, torch.randn(2, 3, 16, 16), enc(CAPTIONS[:2]))
    loss.backward()
    encoder_params = {id(p) for p in enc.model.parameters()}
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    grads = [p.grad for p in enc.model.parameters()]
    if freeze:
        assert all(g is None for g in grads) and not (encoder_params & in_opt)
        assert not any(p.requires_grad for p in enc.model.parameters())
    else:  # the same check fails when the encoder does train
        assert any(g is not None and g.abs().sum() > 0 for g in grads) and encoder_params <= in_opt
