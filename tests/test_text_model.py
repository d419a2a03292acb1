"""Text-conditional JiT (issue 14): presets, the caption embedder, the loss and CFG samplers with captions.

Class models must not change at all: their state_dict keys and shapes are the official ones and their
initial weights are bitwise those of the tree before text conditioning (a digest pinned from it).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import jit_fast
from jit_fast.checkpoint.official import official_state_dict_shapes
from jit_fast.configs import MODEL_PRESETS
from jit_fast.model.network import TextEmbedder
from jit_fast.sampling.sampler import StaticSampler, guided_velocity, image_noise, sample
from jit_fast.shared.conditioning import TextCondition, drop_condition

IMG, E = 16, 12
pytestmark = pytest.mark.usefixtures("one_thread")

# sha256 of JiT-T/4 (16 px, 10 classes) initial weights at seed 0, pos_embed excluded (sin/cos may round
# differently per CPU), computed at commit f9e5b0e, before text conditioning existed.
CLASS_INIT_DIGEST = "3f6a9d0cda68ae7bf272aa46d469c0f53f1ce4ec20a30cf25d6502c08c9f59d9"


def init_digest(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        if k != "pos_embed":
            h.update(k.encode())
            h.update(str(tuple(v.shape)).encode())
            h.update(v.numpy().tobytes())
    return h.hexdigest()


def text_net(tokens: str = "pooled", null_text: str = "learned", seed: int = 0) -> jit_fast.JiT:
    """JiT-T/4-Text at 16 px, every tensor perturbed (adaLN and the output layer start at zero)."""
    torch.manual_seed(seed)
    net = jit_fast.build_model("JiT-T/4-Text", img_size=IMG, text_dim=E, text_tokens=tokens, null_text=null_text)
    g = torch.Generator().manual_seed(seed + 1)
    sd = {k: v if k == "pos_embed" else v + 0.1 * torch.randn(v.shape, generator=g)
          for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    return net.eval()


def captions(b: int, t: int = 6, seed: int = 3) -> TextCondition:
    """Random caption embeddings with lengths 1..t (the mask is a prefix, as right-padded encoder output)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    return TextCondition(torch.randn(b, E, generator=g), torch.randn(b, t, E, generator=g), mask)


# ------------------------------------------------------------------------------------------------
# presets and state dicts


def test_every_preset_has_a_text_twin():
    base = [n for n in MODEL_PRESETS if not n.endswith("-Text")]
    assert {"JiT-B/16", "JiT-H/32", "JiT-T/4", "JiT-S/4"} <= set(base)
    for name in base:
        text = MODEL_PRESETS[f"{name}-Text"]
        assert text == {**MODEL_PRESETS[name], "conditioning": "text"}


@pytest.mark.parametrize("name", ["JiT-H/32-Text"])
@pytest.mark.parametrize("tokens", ["pooled", "sequence"])
@pytest.mark.parametrize("null_text", ["learned", "empty"])
def test_text_state_dict(name, tokens, null_text):
    """The label table's place is taken by the projection (and the null / pad / empty-caption tensors)."""
    with torch.device("meta"):
        net = jit_fast.build_model(name, text_dim=3072, text_tokens=tokens, null_text=null_text)
        cls = jit_fast.build_model(name.removesuffix("-Text"))
    d = net.cfg.hidden_size
    want = {k: tuple(v.shape) for k, v in cls.state_dict().items() if not k.startswith("y_embedder.")}
    want.update({"y_embedder.proj.weight": (d, 3072), "y_embedder.proj.bias": (d,)})
    want.update({"y_embedder.null_embedding": (d,)} if null_text == "learned" else {"y_embedder.empty_pooled": (3072,)})
    if tokens == "sequence":
        want["y_embedder.pad_token"] = (d,)
        if null_text == "empty":
            want.update({"y_embedder.empty_tokens": (32, 3072), "y_embedder.empty_mask": (32,)})
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert got == want
    assert official_state_dict_shapes(net.cfg) == want


def test_class_model_is_untouched():
    """Same keys, shapes and initial weights as before text conditioning existed (pinned digest)."""
    torch.manual_seed(0)
    net = jit_fast.build_model("JiT-T/4", img_size=IMG, num_classes=10)
    assert net.cfg.conditioning == "class"
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == official_state_dict_shapes(net.cfg)
    assert not any(k.startswith("y_embedder.") and k != "y_embedder.embedding_table.weight" for k in net.state_dict())
    assert init_digest(net) == CLASS_INIT_DIGEST


@pytest.mark.parametrize(("override", "needle"), [
    (dict(text_dim=0), "text_dim"),
    (dict(text_dim=8, text_tokens="words"), "text_tokens"),
    (dict(text_dim=8, null_text="zero"), "null_text"),
    (dict(text_dim=8, text_tokens="sequence", in_context_len=0), "in_context_len"),
])
def test_bad_text_settings_are_named(override, needle):
    with pytest.raises(ValueError, match=needle):
        jit_fast.build_model("JiT-T/4-Text", img_size=IMG, **override)


def test_wrong_condition_is_named():
    net = text_net()
    x, t = torch.randn(2, 3, IMG, IMG), torch.rand(2)
    with pytest.raises(TypeError, match="takes a TextCondition, got Tensor"):
        net(x, t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="caption embeddings are 7 wide, the model's text_dim is 12"):
        net(x, t, TextCondition(torch.randn(2, 7)))


# ------------------------------------------------------------------------------------------------
# the embedder


def test_pooled_embedder_projects_and_drops_to_the_learned_null():
    emb = TextEmbedder(E, 8, "pooled", "learned", 4)
    torch.nn.init.normal_(emb.null_embedding)
    y = captions(3)
    vec, ctx = emb(TextCondition(y.pooled, drop=torch.tensor([False, True, False])), 4)
    assert ctx is None
    want = y.pooled @ emb.proj.weight.T + emb.proj.bias
    torch.testing.assert_close(vec[[0, 2]], want[[0, 2]])
    assert torch.equal(vec[1], emb.null_embedding.detach())


def test_sequence_embedder_context_tokens():
    """Context slot j holds the projected token j of the caption, the pad token past its end or past T."""
    emb = TextEmbedder(E, 8, "sequence", "learned", 8)
    torch.nn.init.normal_(emb.pad_token)
    torch.nn.init.normal_(emb.null_embedding)
    y = captions(3, t=6)
    drop = torch.tensor([False, False, True])
    vec, ctx = emb(TextCondition(y.pooled, y.tokens, y.mask, drop), 8)
    assert ctx.shape == (3, 8, 8)
    for b in range(2):
        for j in range(8):
            if j < 6 and y.mask[b, j]:
                want = y.tokens[b, j] @ emb.proj.weight.T + emb.proj.bias
            else:
                want = emb.pad_token.detach()
            torch.testing.assert_close(ctx[b, j], want)
    assert torch.equal(ctx[2], emb.null_embedding.detach().expand(8, 8))  # dropped: the null, as a null class
    _, short = emb(TextCondition(y.pooled, y.tokens, y.mask), 4)  # context shorter than the caption: truncated
    torch.testing.assert_close(short[:2], ctx[:2, :4])


@pytest.mark.parametrize("tokens", ["pooled", "sequence"])
def test_empty_null_is_the_empty_caption(tokens):
    """null_text='empty': a dropped caption gives exactly what the empty caption's embedding gives undropped."""
    net = text_net(tokens, "empty")
    y = captions(2)
    empty = TextCondition(torch.randn(1, E), torch.randn(1, 2, E), torch.ones(1, 2, dtype=torch.bool))
    net.y_embedder.set_empty_text(empty.pooled[0], empty.tokens[0])
    x, t = torch.randn(2, 3, IMG, IMG), torch.rand(2)
    dropped = net(x, t, y.null())
    tokens = torch.cat([empty.tokens, torch.zeros(1, 4, E)], 1).expand(2, 6, E)
    mask = torch.cat([empty.mask, torch.zeros(1, 4, dtype=torch.bool)], 1).expand(2, 6)
    as_caption = TextCondition(empty.pooled.expand(2, E), tokens, mask)
    torch.testing.assert_close(dropped, net(x, t, as_caption), rtol=1e-6, atol=1e-6)
    assert (dropped - net(x, t, y)).abs().max() > 1e-3


@pytest.mark.parametrize("tokens", ["pooled", "sequence"])
def test_learned_null_ignores_the_dropped_caption(tokens):
    net = text_net(tokens)
    x, t = torch.randn(2, 3, IMG, IMG), torch.rand(2)
    a, b = captions(2, seed=1).null(), captions(2, seed=2).null()
    assert torch.equal(net(x, t, a), net(x, t, b))
    assert (net(x, t, captions(2, seed=1)) - net(x, t, a)).abs().max() > 1e-3


@pytest.mark.parametrize("tokens", ["pooled", "sequence"])
def test_rows_are_independent(tokens):
    """Row i of a batch depends on caption i only (padding, masks and drops are per row)."""
    net = text_net(tokens)
    y = captions(3).dropped(torch.tensor([False, True, False]))
    x, t = torch.randn(3, 3, IMG, IMG), torch.rand(3)
    out = net(x, t, y)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], net(x[i : i + 1], t[i : i + 1], y[i : i + 1]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# loss and samplers


def test_loss_drops_captions():
    net = text_net("sequence")
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(4, 3, IMG, IMG, generator=g), torch.rand(4, generator=g)
    noise = torch.randn(4, 3, IMG, IMG, generator=g)
    drop = torch.tensor([True, False, False, True])
    y = captions(4)
    loss = jit_fast.flow_matching_loss(net, x, y, t=t, noise=noise, drop=drop)
    z = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * noise
    x_pred = net(z, t, TextCondition(y.pooled, y.tokens, y.mask, drop))
    s = (1 - t).clamp_min(0.05).view(-1, 1, 1, 1)
    want = (((x - z) / s - (x_pred - z) / s) ** 2).mean()
    torch.testing.assert_close(loss, want)
    assert torch.equal(drop_condition(y, drop, 0).drop, drop)
    loss.backward()
    assert net.y_embedder.proj.weight.grad.abs().sum() > 0 and net.y_embedder.null_embedding.grad.abs().sum() > 0


def test_guided_velocity_with_captions():
    """One 2B forward equals separate conditional and null-caption forwards combined by CFG."""
    net = text_net("sequence")
    y, z, t = captions(3), torch.randn(3, 3, IMG, IMG), torch.tensor(0.4)
    v = guided_velocity(net, z, t, y, 2.5, 0, 0.05)
    s = (1 - t).clamp_min(0.05)
    v_c = (net(z, t.expand(3), y) - z) / s
    v_u = (net(z, t.expand(3), y.null()) - z) / s
    torch.testing.assert_close(v, v_u + 2.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", ["pooled", "sequence"])
def test_static_sampler_with_captions_equals_sample(tokens):
    """The CUDA-graph sampler's static step (run eagerly here) gives bitwise `sample`'s images, short batch too."""
    net = text_net(tokens)
    y = captions(3)
    noise = image_noise(1, range(3), (3, IMG, IMG))
    s = StaticSampler(net, 4, steps=3, interval=(0.0, 1.0))
    for n in (3, 2):  # the second run reuses the buffers with another number of padding rows
        out = s.run(noise[:n], y[:n], 2.0)
        padded = y[:n].cat(y.new_static(4 - n))
        pad_noise = torch.cat([noise[:n], torch.zeros(4 - n, 3, IMG, IMG)])
        ref = sample(net, padded, steps=3, cfg=2.0, interval=(0.0, 1.0), noise=pad_noise)
        assert torch.equal(out, ref[:n])


@pytest.mark.slow  # dynamo tracing: 15-40 s per case on this machine
@pytest.mark.parametrize("tokens", ["pooled", "sequence"])
def test_text_model_compiles_without_graph_breaks(tokens):
    """A TextCondition argument is a pytree dynamo traces: fullgraph compile gives the eager output."""
    net = text_net(tokens)
    y = captions(3).dropped(torch.tensor([True, False, False]))
    y = y if tokens == "sequence" else TextCondition(y.pooled, drop=y.drop)
    x, t = torch.randn(3, 3, IMG, IMG), torch.rand(3)
    compiled = torch.compile(net, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t, y), net(x, t, y), rtol=0, atol=0)
