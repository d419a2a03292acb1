"""JiT: Just image Transformer (Li & He, arXiv 2511.13720), parameter-for-parameter official.

Parameter names and shapes equal the official release. The op boundaries that the fused
kernels replace (RMSNorm+modulate with the gated residual folded in, q/k RMSNorm+RoPE,
SwiGLU, attention) go through an op table (`jit_kernels.OpTable`, `select_ops(cfg.kernels, device, precision)`),
whose declared capabilities, not its name, shape the forward. Each block
returns its MLP branch and gate un-added, and the next norm (or the final layer) adds them
in its fused residual, so no gated residual ever makes its own pass over the tokens. The GEMMs
feeding a fused op (qkv, w12, attention proj) go through the op table too: the fused table runs
them without their bias and the op it feeds adds it (qk_norm_rope, SwiGLU, norm2's residual); the
reference table adds it in the GEMM, as the official model does. The fused path also computes the adaLN SiLU of
the conditioning once for all blocks and the final layer (`activated_conditioning`: it is the same tensor for each,
2 launches per block fewer); the torch path keeps the official op stream.

Dropout (blocks depth//4 to 3*depth//4): the torch path keeps `nn.Dropout`, as the official model. The fused
path (`fused_dropout`) drops the attention branch inside norm2's residual op and the SwiGLU output inside the
SwiGLU kernel, with Philox masks (`jit_kernels.dropout`) keyed by one seed per forward (`set_dropout_seed`) and a
site per block and place; the masks are statistically equivalent to torch's, not bitwise equal. Attention dropout is
the attention backend's own (`dropout_p`) on both paths.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from jit_fast.configs import ModelConfig, model_config
from jit_fast.model.attention import attention
from jit_fast.model.embeddings import rope_tables, sincos_pos_embed_2d, timestep_embedding
from jit_fast.shared.conditioning import TextCondition
from jit_kernels import OpTable, device_support, get_ops, select_ops
from jit_kernels.dropout import Dropout
from jit_kernels.reference import gated_residual


class RMSNorm(nn.Module):
    """RMSNorm with a weight; holds parameters only, the math lives in the op table."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps


class BottleneckPatchEmbed(nn.Module):
    """Patchify with a low-rank bottleneck: Conv p x p to `bottleneck` then 1x1 conv to D."""

    def __init__(self, patch_size: int, in_chans: int, bottleneck: int, dim: int) -> None:
        super().__init__()
        self.proj1 = nn.Conv2d(in_chans, bottleneck, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck, dim, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """MLP on the 256-dim sinusoid of t."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row (index num_classes) for the null class."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class TextEmbedder(nn.Module):
    """Caption embeddings -> JiT width: a linear projection in place of the label table (issue 14).

    forward returns (vector, context): the projected pooled embedding, added to the timestep embedding,
    and in sequence mode the in-context tokens (the first `context_len` projected per-token states, slots
    past the caption filled with a learned pad token; None in pooled mode). Dropped captions get the null
    embedding: `null_text` "learned" is a trained vector (its context repeats it, as the null class's),
    "empty" projects the encoder's embedding of the empty caption, held in buffers set by `set_empty_text`.
    """

    def __init__(self, text_dim: int, dim: int, tokens: str, null_text: str, context_len: int) -> None:
        super().__init__()
        self.proj = nn.Linear(text_dim, dim)
        self.tokens, self.null_text = tokens, null_text
        if null_text == "learned":
            self.null_embedding = nn.Parameter(torch.zeros(dim))
        else:
            self.register_buffer("empty_pooled", torch.zeros(text_dim))
            if tokens == "sequence":
                self.register_buffer("empty_tokens", torch.zeros(context_len, text_dim))
                self.register_buffer("empty_mask", torch.zeros(context_len))
        if tokens == "sequence":
            self.pad_token = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def set_empty_text(self, pooled: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        """Store the encoder's embedding of the empty caption: pooled (E,), per-token states (L, E) in sequence mode."""
        if self.null_text != "empty":
            raise ValueError("set_empty_text is for null_text='empty' models")
        self.empty_pooled.copy_(pooled)
        if self.tokens == "sequence":
            if tokens is None:
                raise ValueError("a sequence-mode model needs the empty caption's per-token states")
            n = min(tokens.shape[0], self.empty_tokens.shape[0])
            self.empty_tokens.zero_()
            self.empty_tokens[:n].copy_(tokens[:n])
            self.empty_mask.zero_()
            self.empty_mask[:n] = 1.0

    def forward(self, y: TextCondition, context_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(y, TextCondition):
            raise TypeError(f"a text-conditional model takes a TextCondition, got {type(y).__name__}")
        if y.pooled.shape[-1] != self.proj.in_features:
            raise ValueError(f"caption embeddings are {y.pooled.shape[-1]} wide, the model's text_dim is "
                             f"{self.proj.in_features}")
        dtype = self.proj.weight.dtype
        drop = y.drop
        pooled = y.pooled.to(dtype)
        if self.null_text == "empty" and drop is not None:
            pooled = torch.where(drop[:, None], self.empty_pooled.to(dtype), pooled)
        vec = self.proj(pooled)
        if self.null_text == "learned" and drop is not None:
            vec = torch.where(drop[:, None], self.null_embedding.to(vec.dtype), vec)
        if self.tokens != "sequence":
            return vec, None
        if y.tokens is None:
            raise ValueError("a sequence-mode text model needs per-token caption states (tokens and mask)")
        tokens, mask = y.tokens[:, :context_len].to(dtype), y.mask[:, :context_len]
        short = context_len - tokens.shape[1]
        if short > 0:
            tokens = nn.functional.pad(tokens, (0, 0, 0, short))
            mask = nn.functional.pad(mask, (0, short))
        if self.null_text == "empty" and drop is not None:
            tokens = torch.where(drop[:, None, None], self.empty_tokens.to(dtype), tokens)
            mask = torch.where(drop[:, None], self.empty_mask > 0, mask)
        ctx = self.proj(tokens)
        ctx = torch.where(mask[..., None], ctx, self.pad_token.to(ctx.dtype))
        if self.null_text == "learned" and drop is not None:
            ctx = torch.where(drop[:, None, None], vec[:, None], ctx)
        return vec, ctx


class Attention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm and 2D RoPE."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float, ops: OpTable) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.ops = ops

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], fused_dropout: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (branch, proj bias the residual still has to add, or None); with `fused_dropout` the residual op
        drops the branch out (bias included), otherwise proj_drop does here."""
        b, n, d = x.shape
        q, k, v = self.ops.linear_qk_norm_rope(
            x, self.qkv.weight, self.qkv.bias, self.q_norm.weight, self.k_norm.weight, rope[0], rope[1],
            self.num_heads, self.q_norm.eps,
        )
        o = attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0).reshape(b, n, d)
        if self.proj_drop.p > 0 and self.training and not fused_dropout:  # torch's dropout: bias stays in the GEMM
            return self.proj_drop(self.proj(o)), None
        return self.ops.branch_linear(o, self.proj.weight, self.proj.bias)


class SwiGLUFFN(nn.Module):
    """SwiGLU MLP: w3(silu(x1) * x2) with x1, x2 the halves of w12(x).

    `pad_hidden_to` > 1 stores the hidden width padded to a multiple of it (zero rows at the end of
    each w12 half, zero columns of w3) for GEMM-friendly shapes. It is exact: padded units compute
    silu(0) * 0 = 0 and get zero gradients, so they stay zero under AdamW. `state_dict()` always holds
    the official (2h, D) / (D, h) tensors and official weights load through the padding.
    """

    def __init__(self, dim: int, hidden: int, drop: float, ops: OpTable, pad_hidden_to: int = 1) -> None:
        super().__init__()
        self.hidden = hidden
        self.hidden_padded = -(-hidden // pad_hidden_to) * pad_hidden_to
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.ffn_dropout = nn.Dropout(drop)
        self.ops = ops
        if self.hidden_padded != hidden:
            # Built at the official width first, so the RNG draws match the unpadded MLP; then padded.
            with torch.no_grad():
                self.w12.weight = nn.Parameter(self._pad_rows(self.w12.weight))
                self.w12.bias = nn.Parameter(self._pad_rows(self.w12.bias))
                self.w3.weight = nn.Parameter(self._pad_cols(self.w3.weight))
            self.w12.out_features, self.w3.in_features = 2 * self.hidden_padded, self.hidden_padded
            self.register_state_dict_post_hook(SwiGLUFFN._export_official)
            self.register_load_state_dict_pre_hook(SwiGLUFFN._import_official)

    def forward(self, x: torch.Tensor, dropout: Dropout | None = None) -> torch.Tensor:
        """w3(drop(swiglu(w12(x)))): the fused `dropout` inside the SwiGLU op if given, else ffn_dropout."""
        if dropout is not None:
            return self.w3(self.ops.linear_swiglu(x, self.w12.weight, self.w12.bias, dropout))
        h = self.ops.linear_swiglu(x, self.w12.weight, self.w12.bias)
        return self.w3(self.ffn_dropout(h))

    def reset_parameters(self) -> None:
        """Official init (xavier at the official shapes, zero biases; same draws as unpadded), zero padding."""
        w12 = self.w12.weight.new_empty(2 * self.hidden, self.w12.in_features)
        w3 = self.w3.weight.new_empty(self.w3.out_features, self.hidden)
        nn.init.xavier_uniform_(w12)
        nn.init.xavier_uniform_(w3)
        with torch.no_grad():
            self.w12.weight.copy_(self._pad_rows(w12))
            self.w3.weight.copy_(self._pad_cols(w3))
            self.w12.bias.zero_()
            self.w3.bias.zero_()

    def _pad_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Official w12 tensor (2h, ...) -> padded (2hp, ...): each half gets zero rows at its end."""
        x1, x2 = t.chunk(2, dim=0)
        pad = t.new_zeros((self.hidden_padded - self.hidden,) + tuple(t.shape[1:]))
        return torch.cat((x1, pad, x2, pad))

    def _pad_cols(self, t: torch.Tensor) -> torch.Tensor:
        """Official w3 weight (D, h) -> padded (D, hp) with zero columns."""
        return torch.cat((t, t.new_zeros(t.shape[0], self.hidden_padded - self.hidden)), dim=1)

    def _export_official(self, state_dict, prefix, local_metadata) -> None:
        h, hp = self.hidden, self.hidden_padded
        for key in ("w12.weight", "w12.bias"):
            t = state_dict[prefix + key]
            state_dict[prefix + key] = torch.cat((t[:h], t[hp : hp + h]))
        state_dict[prefix + "w3.weight"] = state_dict[prefix + "w3.weight"][:, :h].contiguous()

    def _import_official(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        for key, pad in (("w12.weight", self._pad_rows), ("w12.bias", self._pad_rows), ("w3.weight", self._pad_cols)):
            t = state_dict.get(prefix + key)
            official = 2 * self.hidden if key.startswith("w12") else self.hidden
            if t is not None and t.shape[0 if key.startswith("w12") else 1] == official:
                state_dict[prefix + key] = pad(t)


Pending = tuple[torch.Tensor, torch.Tensor] | None


class JiTBlock(nn.Module):
    """adaLN-Zero transformer block; its MLP residual is handed to the next norm, not added here."""

    def __init__(self, cfg: ModelConfig, attn_drop: float, proj_drop: float, ops: OpTable, index: int = 0) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.index = index
        self.c_activated = ops.activated_conditioning  # the model then hands its blocks SiLU(c), computed once
        self.norm1 = RMSNorm(d)
        self.attn = Attention(d, cfg.num_heads, attn_drop, proj_drop, ops)
        self.norm2 = RMSNorm(d)
        self.mlp = SwiGLUFFN(d, cfg.mlp_hidden, proj_drop, ops, pad_hidden_to=cfg.mlp_pad_to)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.ops = ops

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], pending: Pending = None,
        out_dtype: torch.dtype | None = None, dropout_seed: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (x, mlp_branch, gate_mlp); the block output is x + gate_mlp * mlp_branch.

        `c` is the conditioning, or SiLU of it (`c_activated`). `dropout_seed` (fused path,
        training) moves the block's proj dropout into the fused ops: the attention branch's into norm2's residual
        op (site 2 * index), the MLP's into SwiGLU (site 2 * index + 1).
        """
        ada = self.adaLN_modulation[1](c) if self.c_activated else self.adaLN_modulation(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = ada.chunk(6, dim=-1)
        eps = self.norm1.eps
        if pending is None:
            h = self.ops.rmsnorm_modulate(x, self.norm1.weight, shift_msa, scale_msa, eps, out_dtype)
        else:
            x, h = self.ops.residual_rmsnorm_modulate(
                x, pending[0], pending[1], self.norm1.weight, shift_msa, scale_msa, eps, out_dtype
            )
        p = self.attn.proj_drop.p
        fused = dropout_seed is not None and p > 0 and self.training
        drop_attn, drop_mlp = (
            (Dropout(p, dropout_seed, 2 * self.index), Dropout(p, dropout_seed, 2 * self.index + 1))
            if fused else (None, None)
        )
        attn_out, attn_bias = self.attn(h, rope, fused)
        x, h = self.ops.residual_rmsnorm_modulate(
            x, attn_out, gate_msa, self.norm2.weight, shift_mlp, scale_mlp, eps, out_dtype, attn_bias, drop_attn
        )
        return x, self.mlp(h, drop_mlp), gate_mlp


class FinalLayer(nn.Module):
    """adaLN-modulated RMSNorm and the linear patch decoder."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))


class JiT(nn.Module):
    """Pixel-space x-prediction transformer: forward(z, t, y) -> predicted clean image.

    `ops` is the op table (default `get_ops(cfg.kernels)`); build it with `jit_kernels.select_ops` for the device
    and precision the model will run in, which decides the fallback to the torch ops once, before the model exists.
    """

    def __init__(self, cfg: ModelConfig, ops: OpTable | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.ops = get_ops(cfg.kernels) if ops is None else ops
        self.device_checked = False
        d, n = cfg.hidden_size, cfg.grid_size**2
        self.t_embedder = TimestepEmbedder(d)
        if cfg.conditioning == "text":
            self.y_embedder = TextEmbedder(cfg.text_dim, d, cfg.text_tokens, cfg.null_text, cfg.in_context_len)
        else:
            self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        self.x_embedder = BottleneckPatchEmbed(cfg.patch_size, cfg.in_channels, cfg.bottleneck_dim, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, d), requires_grad=False)
        if cfg.in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, cfg.in_context_len, d))
        lo, hi = cfg.depth // 4, cfg.depth // 4 * 3
        self.blocks = nn.ModuleList(
            JiTBlock(
                cfg,
                cfg.attn_drop if lo <= i < hi else 0.0,
                cfg.proj_drop if lo <= i < hi else 0.0,
                self.ops,
                i,
            )
            for i in range(cfg.depth)
        )
        # the fused path's dropout key: set per forward by the training loop (`set_dropout_seed`), or drawn from
        # torch's generator in each training forward while unset
        self.fused_dropout = self.ops.fused_dropout and cfg.proj_drop > 0
        self.c_activated = self.ops.activated_conditioning  # see JiTBlock.c_activated
        self.register_buffer("dropout_seed", torch.zeros(1, dtype=torch.int64), persistent=False)
        self.dropout_seed_set = False
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.in_channels)
        for name, prefix in (("rope", 0), ("rope_incontext", cfg.in_context_len)):
            cos, sin = rope_tables(cfg.head_dim, cfg.grid_size, prefix)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)
        self.initialize_weights()

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    def initialize_weights(self) -> None:
        """Official init: xavier linears, zero biases, N(0, .02) embeddings, zeroed adaLN and output."""
        mlp_linears: set[nn.Module] = set()
        for m in self.modules():
            if isinstance(m, SwiGLUFFN):
                m.reset_parameters()
                mlp_linears.update((m.w12, m.w3))
            elif isinstance(m, nn.Linear) and m not in mlp_linears:
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.cfg.hidden_size, self.cfg.grid_size).unsqueeze(0))
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.data.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        if self.cfg.in_context_len > 0:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        if isinstance(self.y_embedder, TextEmbedder):
            for p in (getattr(self.y_embedder, "null_embedding", None), getattr(self.y_embedder, "pad_token", None)):
                if p is not None:
                    nn.init.normal_(p, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_dropout_seed(self, seed: int | torch.Tensor | None) -> None:
        """Key the fused dropout masks of the following training forwards (`jit_fast.shared.seeds.dropout_seed`, one per
        forward); None returns to a fresh key per forward from torch's generator, as nn.Dropout draws.

        The key is written into a device buffer the kernels read, in place (an int by `fill_`, a tensor by `copy_`:
        no host sync), so a new key per step recompiles nothing and CUDA graphs replay with the current key. The
        torch path (official nn.Dropout) ignores it.
        """
        if seed is None:
            self.dropout_seed_set = False
            return
        if isinstance(seed, torch.Tensor):
            self.dropout_seed.copy_(seed.reshape(1))
        else:
            self.dropout_seed.fill_(seed)
        self.dropout_seed_set = True

    def forward_dropout_seed(self) -> torch.Tensor | None:
        """The key a training forward hands its blocks: None on the torch path, in eval or without dropout."""
        if not (self.training and self.fused_dropout):
            return None
        if self.dropout_seed_set:
            return self.dropout_seed
        info = torch.iinfo(torch.int64)
        return torch.randint(info.min, info.max, (1,), device=self.dropout_seed.device, dtype=torch.int64)

    @torch.compiler.disable
    def check_device(self, device: torch.device, amp_dtype: torch.dtype | None) -> None:
        """First CUDA forward with the fused table: refuse, naming the reason, a GPU whose fused kernels do not run in
        this precision (a model built by `select_ops` for its device and precision never gets here with one)."""
        self.device_checked = True
        if self.ops.name != "triton":
            return
        precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
        ok, reason = device_support(torch.cuda.get_device_capability(device), precision)
        if not ok:
            raise RuntimeError(f"the fused kernels cannot run here: {reason}; build the model with "
                               f"jit_kernels.select_ops('triton', device, {precision!r}), which falls back "
                               "to the torch ops, or with kernels='torch'")

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image."""
        p, c, g = self.cfg.patch_size, self.cfg.in_channels, self.cfg.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | TextCondition) -> torch.Tensor:
        """Predicted clean images for noisy x at times t under y: labels (B,), or a TextCondition for text models."""
        cfg = self.cfg
        if x.ndim != 4 or tuple(x.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(
                f"expected images (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}), got {tuple(x.shape)}"
            )
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        if not self.device_checked and x.is_cuda:
            self.check_device(x.device, out_dtype)
        text_ctx = None
        if cfg.conditioning == "text":
            y_emb, text_ctx = self.y_embedder(y, cfg.in_context_len)
        else:
            y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb
        c_blocks = F.silu(c) if self.c_activated else c  # SiLU(c) once for every adaLN on the fused path
        x = self.x_embedder(x) + self.pos_embed
        pending: Pending = None
        rope = (self.rope_cos, self.rope_sin)
        seed = self.forward_dropout_seed()
        for i, block in enumerate(self.blocks):
            if cfg.in_context_len > 0 and i == cfg.in_context_start:
                if pending is not None:
                    x = gated_residual(x, pending[0], pending[1])
                    pending = None
                ctx = y_emb.unsqueeze(1).repeat(1, cfg.in_context_len, 1) if text_ctx is None else text_ctx
                ctx = ctx + self.in_context_posemb
                x = torch.cat([ctx, x], dim=1)
                rope = (self.rope_incontext_cos, self.rope_incontext_sin)
            x, branch, gate = block(x, c_blocks, rope, pending, out_dtype, seed)
            pending = (branch, gate)
        if cfg.in_context_len > 0 and cfg.in_context_start < cfg.depth:
            x, branch = x[:, cfg.in_context_len :], branch[:, cfg.in_context_len :]
            pending = (branch, pending[1])
        fl = self.final_layer
        ada = fl.adaLN_modulation[1](c_blocks) if self.c_activated else fl.adaLN_modulation(c)
        shift, scale = ada.chunk(2, dim=-1)
        if pending is None:
            h = self.ops.rmsnorm_modulate(x, fl.norm_final.weight, shift, scale, fl.norm_final.eps, out_dtype)
        else:
            _, h = self.ops.residual_rmsnorm_modulate(
                x, pending[0], pending[1], fl.norm_final.weight, shift, scale, fl.norm_final.eps, out_dtype
            )
        return self.unpatchify(fl.linear(h))


def build_model(
    name: str, img_size: int = 256, num_classes: int = 1000, kernels: str = "torch",
    device: torch.device | str | None = None, precision: str = "fp32", **overrides,
) -> JiT:
    """Build JiT preset `name` (e.g. "JiT-B/16") with official-constructor overrides; its op table is
    `select_ops(kernels, device, precision)` (kernels="triton" on a GPU that does not run them: the torch ops)."""
    cfg = model_config(name, img_size=img_size, num_classes=num_classes, kernels=kernels, **overrides)
    return JiT(cfg, select_ops(kernels, device, precision))
