"""The condition y of a training step: the loader's class labels, or the caption embeddings of its samples.

Over a captioned folder the loader yields sample numbers n as labels (`data.captions`). A text run maps every
sample to its row of the `--text-cache` once (`TextCache.rows` refuses a cache of other captions or keys) and
gathers each batch's embeddings from the memory-mapped cache, so no language model runs during training.
Without a cache, the frozen `--text-encoder` encodes the batch's captions every step instead. The demo
(`--preset demo-text`) builds its captioned digits, its tiny local encoder and their cache once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from jit_fast.checkpoint.meta import ModelMeta
from jit_fast.configs import MODEL_PRESETS, ModelConfig, TrainConfig, model_config
from jit_fast.shared import distributed as D
from jit_fast.shared.conditioning import Condition, TextCondition
from jit_fast.shared.errors import UsageError
from jit_fast.text.encoder import DEFAULT_MAX_LENGTH, EncoderSpec, TextEncoder

DemoCondition = Callable[[torch.Tensor, int], Condition]


def is_text_run(cfg: TrainConfig) -> bool:
    """True if the configured model is conditioned on captions (a -Text preset or conditioning=text)."""
    preset = MODEL_PRESETS.get(cfg.model, {})
    kind = cfg.extra_model_args.get("conditioning", preset.get("conditioning", "class"))
    return cfg.use_text_conditioning or kind == "text"


def text_layout(cfg: TrainConfig) -> ModelConfig:
    """The model config up to its text width: what the caption embeddings must provide (tokens, context)."""
    ov = {**cfg.extra_model_args, "text_dim": 1, "conditioning": "text"}
    try:
        return model_config(cfg.model, img_size=cfg.img_size, num_classes=1, **ov)
    except ValueError as e:
        raise UsageError(str(e)) from None


def demo_text_cache(cfg: TrainConfig, mcfg: ModelConfig) -> Path:
    """The demo's caption cache (digits + tiny local encoder), encoded once per image size, pooling and encoder."""
    from jit_fast.data import demo_text_encoder, prepare_demo_text
    from jit_fast.data.encode_text import encode_captions
    from jit_fast.data.index import cache_dir
    from jit_fast.text.encoder import directory_revision

    data, enc_dir = prepare_demo_text(size=cfg.img_size), demo_text_encoder()
    seq = mcfg.in_context_len if mcfg.text_tokens == "sequence" else 0
    name = f"size{cfg.img_size}-{mcfg.text_tokens}{seq or ''}-{directory_revision(enc_dir)[7:19]}"
    out = cache_dir() / "demo_text_cache" / name
    encoder = TextEncoder.load(enc_dir, device="cpu")  # a complete cache is returned as it is
    return encode_captions(data, encoder, out, pooling=mcfg.text_tokens, seq_len=max(seq, 1), progress=False)


class ConditionSource:
    """Turns a batch's loader labels into the model's y: the labels themselves, or their captions' embeddings."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spec: EncoderSpec | None = None  # None: a class run
        self.cache = self.rows = self.encoder = self.captions = None
        self.empty: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.seq_len = 0

    @classmethod
    def build(cls, cfg: TrainConfig, loader, env: D.DistEnv, recorded: dict | None = None) -> ConditionSource:
        """The source of `cfg`'s run over `loader` (text: checked against the checkpoint's `recorded` encoder)."""
        src = cls(env.device)
        if not is_text_run(cfg):
            if cfg.text_cache or cfg.text_encoder:
                raise UsageError(f"--text-cache / --text-encoder are for text models; {cfg.model} is class-"
                                 "conditional (use a -Text model or --use-text-conditioning)")
            return src
        if cfg.online_eval:
            raise UsageError("--online-eval samples class labels; for a text model evaluate checkpoints with "
                             "sample.py --ckpt RUN --prompts FILE --fid-ref REF")
        mcfg = text_layout(cfg)
        src.seq_len = mcfg.in_context_len if mcfg.text_tokens == "sequence" else 0
        if cfg.text_cache or not cfg.text_encoder:
            src._open_cache(cfg, mcfg, loader, env, recorded)
        else:
            src._load_encoder(cfg, mcfg, loader, env, recorded)
        return src

    def _open_cache(self, cfg: TrainConfig, mcfg: ModelConfig, loader, env: D.DistEnv, recorded: dict | None) -> None:
        from jit_fast.text.cache import TextCache

        if not cfg.text_cache and not cfg.demo_data:
            raise UsageError("a text model needs caption embeddings: pass --text-cache CACHE (made by python -m "
                             "jit_fast.data.encode_text) or --text-encoder NAME to encode captions every step")
        path = cfg.text_cache or D.leader_first(lambda: demo_text_cache(cfg, mcfg), env.is_main, env)
        cache = TextCache(path)
        sequence = mcfg.text_tokens == "sequence"
        cache.require(encoder=cfg.text_encoder or None, revision=cfg.text_encoder_revision or None,
                      max_length=cfg.max_text_len or None, pooling="sequence" if sequence else None,
                      context_len=mcfg.in_context_len if sequence else None)
        if recorded is not None:  # a resumed run keeps the embeddings it was trained on
            cache.require(encoder=recorded["name"], revision=recorded["revision"], max_length=recorded["max_length"])
        self.cache, self.spec = cache, cache.spec
        self.rows = cache.rows(loader.index.keys, loader.index.captions)
        if mcfg.null_text == "empty":
            self.empty = cache.empty()
            if self.empty is None:
                raise UsageError(f"--null-text empty: encoder {cache.spec.name} gives the empty caption no tokens "
                                 "(no embedding to use); use --null-text learned")

    def _load_encoder(self, cfg: TrainConfig, mcfg: ModelConfig, loader, env: D.DistEnv,
                      recorded: dict | None) -> None:
        from jit_fast.data.encode_text import encode_empty

        def load() -> TextEncoder:
            return TextEncoder.load(cfg.text_encoder, revision=cfg.text_encoder_revision or None,
                                    max_length=cfg.max_text_len or DEFAULT_MAX_LENGTH, device=env.device)

        self.encoder = D.leader_first(load, env.is_main, env)  # a download lands in the hub cache once
        self.spec, self.captions = self.encoder.spec, loader.index.captions
        if recorded is not None and EncoderSpec(**recorded) != self.spec:
            raise UsageError(f"--text-encoder {cfg.text_encoder}: {self.spec} differs from the encoder the "
                             f"checkpoint was trained with ({EncoderSpec(**recorded)})")
        if mcfg.null_text == "empty":
            empty = encode_empty(self.encoder, self.seq_len)
            if empty is None:
                raise UsageError(f"--null-text empty: encoder {self.spec.name} gives the empty caption no tokens; "
                                 "use --null-text learned")
            self.empty = (empty.pooled[0], None if empty.tokens is None else empty.tokens[0][empty.mask[0]])

    def fit_config(self, cfg: TrainConfig) -> TrainConfig:
        """A text run's config: the model's text_dim from the embeddings (num_classes is unused: 1)."""
        if self.spec is None:
            return cfg
        ov = dict(cfg.extra_model_args)
        if ov.setdefault("text_dim", self.spec.hidden_size) != self.spec.hidden_size:
            raise UsageError(f"--model-arg text_dim={ov['text_dim']} does not match the caption embeddings "
                             f"({self.spec.hidden_size} wide, encoder {self.spec.name})")
        return dataclasses.replace(cfg, num_classes=1, extra_model_args=ov)

    def record(self, meta: ModelMeta) -> ModelMeta:
        """The checkpoint metadata, with the encoder of a text run's embeddings."""
        return meta if self.spec is None else meta.replace(text_encoder=self.spec.to_dict())

    def prepare(self, net: torch.nn.Module | None) -> torch.nn.Module | None:
        """A null_text='empty' net gets the empty caption's embedding (before FSDP wraps it; EMA copies too)."""
        if net is not None and self.empty is not None:
            net.y_embedder.set_empty_text(*self.empty)
        return net

    def __call__(self, labels: torch.Tensor) -> Condition:
        """y of a batch whose loader labels are `labels` (class ids, or sample numbers of a captioned folder)."""
        if self.spec is None:
            return labels
        n = labels.cpu().numpy()
        if self.cache is not None:
            return self.cache.condition(self.rows[n]).to(self.device)
        with torch.no_grad():
            y = self.encoder([self.captions[i] for i in n.tolist()], seq_len=self.seq_len)
        return TextCondition(y.pooled, y.tokens, y.mask).to(self.device)

    def demo_condition(self, mcfg: ModelConfig) -> DemoCondition | None:
        """The text demo's judge prompts (None for class runs): image i of digit d gets phrasing i // 10 of d."""
        if self.spec is None:
            return None
        from jit_fast.text.sampling import demo_condition, load_matching_encoder

        encoder = self.encoder or load_matching_encoder(self.spec, self.device)
        return demo_condition(encoder, mcfg)


def describe_rows(cfg: TrainConfig, source: ConditionSource) -> str:
    """What the model is conditioned on, for the run's first log line."""
    if source.spec is None:
        return f"{cfg.num_classes} classes"
    where = f"cache {source.cache.root}" if source.cache is not None else "encoded per step"
    return f"captions ({source.spec.name}, {source.spec.hidden_size}-d, {where})"

