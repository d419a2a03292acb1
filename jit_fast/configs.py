"""Model presets and run configuration dataclasses (training: TrainConfig; sampling: SampleConfig)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from jit_fast.options import (
    DECAY,
    INT_NONNEGATIVE,
    INT_POSITIVE,
    LEARNING_RATE,
    NONNEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED,
    UNIT_OPEN,
    NumberRange,
    check_options,
    option,
)
from jit_fast.shared.errors import UsageError

# Official JiT presets (depth, hidden, heads, bottleneck, in-context start, patch).
MODEL_PRESETS: dict[str, dict[str, int | float | str]] = {
    "JiT-B/16": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_start=4, patch_size=16),
    "JiT-B/32": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_start=4, patch_size=32),
    "JiT-L/16": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_start=8, patch_size=16),
    "JiT-L/32": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_start=8, patch_size=32),
    "JiT-H/16": dict(
        depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_start=10, patch_size=16,
        attn_drop=0.2, proj_drop=0.2,
    ),
    "JiT-H/32": dict(
        depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_start=10, patch_size=32,
        attn_drop=0.2, proj_drop=0.2,
    ),
    "JiT-G/16": dict(
        depth=40, hidden_size=1664, num_heads=16, bottleneck_dim=256, in_context_start=10, patch_size=16,
        attn_drop=0.2, proj_drop=0.2,
    ),
    "JiT-G/32": dict(
        depth=40, hidden_size=1664, num_heads=16, bottleneck_dim=256, in_context_start=10, patch_size=32,
        attn_drop=0.2, proj_drop=0.2,
    ),
    # Small models for tests and the CPU demo (not official).
    "JiT-T/4": dict(depth=4, hidden_size=64, num_heads=4, bottleneck_dim=16, in_context_start=2, patch_size=4,
                    in_context_len=8),
    "JiT-S/4": dict(depth=6, hidden_size=192, num_heads=3, bottleneck_dim=32, in_context_start=2, patch_size=4,
                    in_context_len=8),
}
# Text-conditional twins (issue 14): the same networks, the class table replaced by a caption projection.
MODEL_PRESETS.update({f"{name}-Text": {**arch, "conditioning": "text"} for name, arch in list(MODEL_PRESETS.items())})

Conditioning = Literal["class", "text"]
TextTokens = Literal["pooled", "sequence"]
NullText = Literal["learned", "empty"]
Kernels = Literal["torch", "triton"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Solver = Literal["heun", "euler"]
Fp8 = Literal["off", "tensorwise", "rowwise"]


@dataclass
class ModelConfig:
    """Constructor arguments of a JiT model; names follow the official constructor."""

    input_size: int = option(256, range=INT_POSITIVE)
    patch_size: int = option(16, range=INT_POSITIVE)
    in_channels: int = option(3, range=INT_POSITIVE)
    num_classes: int = option(1000, range=INT_POSITIVE)
    hidden_size: int = option(768, range=INT_POSITIVE)
    depth: int = option(12, range=INT_POSITIVE)
    num_heads: int = option(12, range=INT_POSITIVE)
    mlp_ratio: float = option(4.0, range=POSITIVE)
    attn_drop: float = option(0.0, range=DECAY)
    proj_drop: float = option(0.0, range=DECAY)
    bottleneck_dim: int = option(128, range=INT_POSITIVE)
    in_context_len: int = option(32, range=INT_NONNEGATIVE)
    in_context_start: int = option(4, range=INT_NONNEGATIVE)
    kernels: Kernels = "torch"
    mlp_pad_to: int = option(1, range=INT_POSITIVE)
    # Text conditioning (class models leave these at their defaults): the caption embedding width of the
    # encoder, pooled (one vector) or sequence (per-token states as the in-context tokens), and the null
    # embedding of dropped captions: learned, or the encoder's embedding of the empty caption.
    conditioning: Conditioning = "class"
    text_dim: int = option(0, range=INT_NONNEGATIVE)
    text_tokens: TextTokens = "pooled"
    null_text: NullText = "learned"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def mlp_hidden(self) -> int:
        """Official SwiGLU width h = int(int(D * mlp_ratio) * 2 / 3)."""
        return int(int(self.hidden_size * self.mlp_ratio) * 2 / 3)

    def validate(self) -> None:
        """Raise ValueError naming the offending field for out-of-range values and impossible shapes."""
        check_options(self, ValueError, lambda name: f"model setting {name}")
        if self.input_size % self.patch_size:
            raise ValueError(f"img_size {self.input_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of 4 for the 2D sin-cos embedding")
        if not 0 <= self.in_context_start <= self.depth:
            raise ValueError(f"in_context_start {self.in_context_start} outside [0, depth={self.depth}]")
        if self.conditioning == "text" and self.text_dim < 1:
            raise ValueError("a text-conditional model needs text_dim >= 1 (the text encoder's hidden size)")
        if self.conditioning == "text" and self.text_tokens == "sequence" and self.in_context_len < 1:
            raise ValueError("text_tokens 'sequence' feeds the in-context tokens: it needs in_context_len >= 1")


def model_config(name: str, img_size: int = 256, num_classes: int = 1000, **overrides) -> ModelConfig:
    """Build a ModelConfig from preset `name` plus constructor overrides."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model {name!r}; known presets: {', '.join(MODEL_PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown model override(s) {bad}; valid names: {sorted(known)}")
    kwargs = {**MODEL_PRESETS[name], **overrides}
    cfg = ModelConfig(input_size=img_size, num_classes=num_classes, **kwargs)
    cfg.validate()
    return cfg


def _model_arg(text: str) -> tuple[str, int | float | bool | str]:
    """One `--model-arg KEY=VALUE`: the value as int, float or bool where it reads as one, else the string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--model-arg expects KEY=VALUE, got {text!r}")
    key, value = (part.strip() for part in text.split("=", 1))
    for conv in (int, float):
        try:
            return key, conv(value)
        except ValueError:
            pass
    return key, value.lower() == "true" if value.lower() in ("true", "false") else value


@dataclass(frozen=True)
class DataOptions:
    """Data."""

    data_path: str = option("", "ImageFolder root (DIR/train is used when present)")
    demo_data: bool = option(False, "train on the built-in digits dataset")
    data_backend: Literal["auto", "dali", "torch"] = option("auto", "JPEG decoding: DALI on the GPU or torchvision")
    dali_filter: Literal["cubic", "linear"] = option(
        "cubic", "DALI's final resize: cubic (PIL BICUBIC) or linear (cheaper on CPU, ~44 dB)")
    flip: bool = option(True, "random horizontal flip (official recipe; --no-flip for data like digits)")
    img_size: int = option(256, "image size", range=INT_POSITIVE)
    num_classes: int = option(0, "number of classes (0: from the data or the resumed checkpoint)",
                              flags=("--num-classes", "--class-num"), range=INT_NONNEGATIVE)
    num_workers: int = option(4, "loader workers / DALI threads", range=INT_NONNEGATIVE)


@dataclass(frozen=True)
class ModelOptions:
    """Model and flow matching."""

    model: str = option("JiT-B/16", "model preset, e.g. JiT-B/16")
    extra_model_args: dict = option(help="model constructor override KEY=VALUE (repeatable)", factory=dict,
                                    flags=("--model-arg",), parse=_model_arg, action="append")
    attn_dropout: float = option(-1.0, "attention dropout of the middle blocks (default: the preset's)",
                                 range=DECAY, unset=-1.0)
    proj_dropout: float = option(-1.0, "projection dropout of the middle blocks (default: the preset's)",
                                 range=DECAY, unset=-1.0)
    P_mean: float = option(-0.8, "logit-normal t mean", flags=("--P-mean",), range=NumberRange(float))
    P_std: float = option(0.8, "logit-normal t std", flags=("--P-std",), range=POSITIVE)
    noise_scale: float = option(1.0, "noise scale", range=POSITIVE)
    t_eps: float = option(0.05, "clamp of 1 - t in the v conversion", range=UNIT_OPEN)
    label_drop_prob: float = option(0.1, "label dropout probability (CFG)", range=PROBABILITY)


@dataclass(frozen=True)
class OptimizerOptions:
    """Optimizer and EMA."""

    batch_size: int = option(128, "per-GPU batch size (per micro-step)", range=INT_POSITIVE)
    grad_accum: int = option(1, "gradient accumulation micro-steps", range=INT_POSITIVE)
    blr: float = option(5e-5, "base lr: lr = blr * global_batch / 256", range=LEARNING_RATE)
    lr: float | None = option(None, "absolute lr (overrides --blr)", range=LEARNING_RATE)
    weight_decay: float = option(0.0, "AdamW weight decay (not on biases and 1-D params)", range=NONNEGATIVE)
    beta1: float = option(0.9, "AdamW beta1", range=DECAY)
    beta2: float = option(0.95, "AdamW beta2", range=DECAY)
    grad_clip: float = option(0.0, "clip the global grad norm (0: off)", range=NONNEGATIVE)
    ema_decay1: float = option(0.9999, "first EMA decay (used for sampling)", range=DECAY)
    ema_decay2: float = option(0.9996, "second EMA decay", range=DECAY)


@dataclass(frozen=True)
class ScheduleOptions:
    """Schedule."""

    epochs: int = option(600, "training epochs (schedule length)", range=INT_POSITIVE)
    max_steps: int = option(0, "stop after this many optimizer steps (0: no limit)", range=INT_NONNEGATIVE)
    lr_schedule: Literal["constant", "cosine"] = option("constant", "learning-rate schedule after the warmup")
    min_lr: float = option(0.0, "final lr of the cosine schedule", range=NumberRange(float, lo=0.0, hi=1.0))
    warmup_epochs: float = option(5.0, "linear warmup epochs", range=NONNEGATIVE)


@dataclass(frozen=True)
class CheckpointOptions:
    """Run directory and checkpoints."""

    output_dir: str = option("output", "run directory (checkpoints, tb, metrics.jsonl)")
    resume: str = option("", "checkpoint dir, run dir, official .pth or folder with checkpoint-last.pth")
    auto_resume: bool = option(False, "continue from output-dir's newest checkpoint if any")
    overwrite: bool = option(False, "start over: move output-dir's previous run into output-dir/replaced-TIME/")
    discard_newer: bool = option(False, "resume an older checkpoint in place: move the newer ones to "
                                        "output-dir/discarded-TIME/")
    skip_checksum: bool = option(False, "load checkpoint files even if they differ from checksums.json")
    save_freq_steps: int = option(0, "checkpoint every N steps (0: off)", flags=("--save-freq-steps", "--save-freq"),
                                  range=INT_NONNEGATIVE)
    save_last_freq: int = option(5, "checkpoint every N epochs (official meaning)", range=INT_NONNEGATIVE)
    keep_last: int = option(3, "checkpoints kept (0: all)", range=INT_NONNEGATIVE)
    async_save: bool = option(False, "write checkpoints in a background thread")


@dataclass(frozen=True)
class EvaluationOptions:
    """Evaluation: the demo's after training, online FID/IS (official flags and defaults), --evaluate-gen."""

    demo_eval: bool = option(False, "run the demo evaluation (sample grid + accuracy) after training")
    online_eval: bool = option(False, "FID/IS of EMA1 every --eval-freq epochs and at the end (in memory)")
    evaluate_gen: bool = option(False, "with --resume: only generate and evaluate (as sample.py --ckpt)")
    eval_freq: int = option(40, "epochs between online evaluations (also after the last epoch)", range=INT_POSITIVE)
    gen_bsz: int = option(256, "images per rank per sampling batch (evaluations)", range=INT_POSITIVE)
    eval_num_images: int = option(0, "images per evaluation (0: 50000 for FID, the demo's own default)",
                                  flags=("--num-images",), range=INT_NONNEGATIVE)
    eval_steps: int = option(50, "sampling steps (evaluations)", flags=("--num-sampling-steps",), range=INT_POSITIVE)
    cfg: float = option(1.0, "CFG scale of the evaluations (online, --evaluate-gen, demo)", range=NONNEGATIVE)
    interval_min: float = option(0.0, "CFG interval start (evaluations)", range=PROBABILITY)
    interval_max: float = option(1.0, "CFG interval end (evaluations)", range=PROBABILITY)
    solver: Solver = option("heun", "ODE solver of the evaluations", flags=("--sampling-method",))
    fid_ref: str = option("", "FID reference: statistics .npz (mu, sigma) or image folder (none: IS only)")
    inception_weights: str = option("", "torch-fidelity Inception weights .pth (offline; none: its download)")


@dataclass(frozen=True)
class TextOptions:
    """Text conditioning (docs/TEXT.md): caption embeddings from --text-cache, or the frozen encoder per step."""

    use_text_conditioning: bool = option(False, "train the -Text twin of --model (the fork's flag)")
    text_cache: str = option("", "text models: caption embeddings from python -m jit_fast.data.encode_text")
    text_encoder: str = option("", "text models: encoder (hub id or dir); with --text-cache it must be the cache's, "
                                   "without one it runs frozen per step", flags=("--text-encoder", "--llm-model-name"))
    text_encoder_revision: str = option("", "hub revision of --text-encoder")
    max_text_len: int = option(0, "tokens per caption (0: the cache's, else 77)", range=INT_NONNEGATIVE)
    freeze_llm: bool = option(True, "keep the text encoder frozen (default; --no-freeze-llm is not supported yet)")


@dataclass(frozen=True)
class RuntimeOptions:
    """Runtime: device, precision, kernels, distribution, logging."""

    preset: str = option("", "run preset: demo, demo-text or imagenette (RUN_PRESETS; flags override it)")
    kernels: Kernels = option("torch", "block ops: the eager torch ops or the fused Triton kernels")
    precision: Precision = option("auto", "auto: bf16 on sm_80+, fp16 on older GPUs, fp32 on CPU")
    device: str = option("auto", "auto | cpu | cuda")
    seed: int = option(0, "seed of init, data order and noise", range=SEED)
    fsdp: Literal["auto", "on", "off"] = option("auto", "FSDP2 sharding (auto: when world_size > 1)")
    fp8: Fp8 = option("off", "float8 GEMMs in the block linears (qkv, proj, w12, w3) via torchao, with tensorwise "
                             "or rowwise scales; needs an sm_89+ GPU (H100, L40, L4)")
    fp8_emulate: bool = option(False, "run --fp8 through torchao's emulation (CPU and any GPU; slow, for tests)")
    compile: bool = option(False, "torch.compile each block")
    activation_checkpointing: bool = option(False, "recompute block activations in backward")
    reshard_after_forward: bool = option(True, "FSDP2: free gathered params after forward")
    max_memory_gb: float = option(0.0, "GPU memory per rank, GiB: print the modeled memory plan and stop before "
                                       "the first step if it does not fit (0: a GPU only warns)", range=NONNEGATIVE)
    log_freq: int = option(50, "steps between host syncs for loss/grad-norm logging", range=INT_POSITIVE)
    signal_check_freq: int = option(1, "steps between preemption-flag agreements", range=INT_POSITIVE)
    preempt_grace: float = option(30.0, "seconds after SIGTERM/SIGUSR1 within which the run ends, saved or not "
                                        "(0: no limit)", range=NONNEGATIVE)
    loss_explosion: float = option(10.0, "stop (exit 3) when the logged loss stays above this multiple of its "
                                         "running average (0: off; NaN/Inf always stops)", range=NONNEGATIVE)
    loss_explosion_logs: int = option(3, "... at this many consecutive log points", range=INT_POSITIVE)
    tensorboard: bool = option(True, "TensorBoard scalars in OUTPUT/tb")
    peak_tflops: float = option(0.0, "per-device peak TFLOP/s for MFU (0: from the GPU name)", range=NONNEGATIVE)
    wandb: str = option("", "also log scalars and grids to this Weights & Biases project")
    profile_steps: str = option("", "A:B: torch.profiler trace (and CUDA memory snapshot) of steps A..B-1 in "
                                    "OUTPUT/profile/")


@dataclass(frozen=True)
class TrainConfig(RuntimeOptions, TextOptions, EvaluationOptions, CheckpointOptions, ScheduleOptions,
                  OptimizerOptions, ModelOptions, DataOptions):
    """Training recipe: one flat set of fields declared by the groups above (flag, help, choices, range on each).

    Field names follow the official training command's flags and defaults are the official ImageNet recipe.
    `batch_size` is per rank (per micro-step), so the global batch is batch_size x world_size x grad_accum and
    lr = blr x global_batch / 256 unless `lr` is set.
    """


# Run presets for `train.py --preset NAME`: TrainConfig fields; explicit flags override them.
_DEMO: dict = dict(
    model="JiT-T/4",
    extra_model_args=dict(hidden_size=128, depth=4, num_heads=4, patch_size=8, in_context_len=4,
                          bottleneck_dim=32),
    img_size=32,
    num_classes=10,
    demo_data=True,
    data_backend="torch",
    flip=False,
    output_dir="output/demo",
    auto_resume=True,  # a second `make demo` continues (or re-scores) output/demo; --overwrite starts over
    batch_size=64,
    lr=1e-3,
    warmup_epochs=1.0,
    epochs=100000,
    max_steps=1500,
    ema_decay1=0.995,
    ema_decay2=0.99,
    log_freq=50,
    save_freq_steps=500,
    keep_last=1,
    num_workers=0,
    demo_eval=True,
    eval_steps=10,
    cfg=2.0,
    interval_min=0.0,
    interval_max=1.0,
)

RUN_PRESETS: dict[str, dict] = {
    # CPU demo: a tiny JiT on the digits (1797 images, 32x32), a few minutes on 2 cores, then the
    # demo evaluation (sample grid + class-conditional accuracy).
    "demo": _DEMO,
    # CPU text-to-image demo: the same digits, each captioned in one of six phrasings, a tiny local text encoder
    # (nothing downloaded) whose embeddings are cached once, then the demo evaluation prompted with captions.
    "demo-text": {k: v for k, v in _DEMO.items() if k != "num_classes"} | dict(
        model="JiT-T/4-Text", output_dir="output/demo-text", max_steps=3000),
    # One consumer GPU (16 GB, e.g. a free-tier T4): JiT-B/16 at 256 px on ImageNette (10 ImageNet classes, 9469
    # training images), fetched and pre-cropped by `python -m jit_fast.data.prepare --imagenette data/imagenette`.
    # Precision auto (fp16 on GPUs without bf16), the fused kernels where the GPU runs them (the torch ops
    # elsewhere). Batch 32 per step is sized by `jit_fast.memory_plan` for a T4's 15 GiB without activation
    # checkpointing: modeled peak 7.7 GiB with the fused kernels, 10.5 GiB with the torch ops (reserve included);
    # 4 accumulation steps make a global batch of 128 (lr = blr x 128 / 256). auto_resume: a new session continues.
    "imagenette": dict(
        model="JiT-B/16",
        img_size=256,
        num_classes=10,
        data_path="data/imagenette",
        output_dir="output/imagenette",
        auto_resume=True,
        kernels="triton",
        precision="auto",
        batch_size=32,
        grad_accum=4,
        activation_checkpointing=False,
        epochs=300,
    ),
}


DEFAULT_NUM_IMAGES = 50000
DEMO_NUM_IMAGES = 500  # images the demo judge samples by default
DEMO_MIN_IMAGES = 2 * _DEMO["num_classes"]  # the judge needs two images of every digit


EMA_NAMES = ("ema1", "ema2", "model")


def _float_list(text: str) -> list[float]:
    """Comma-separated guidance scales, each finite and >= 0 (NaN would give all-zero images)."""
    vals = [NONNEGATIVE(v.strip()) for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one value")
    return vals


def _ema_list(text: str) -> list[str]:
    """Comma-separated weights to sample from, a subset of EMA_NAMES (several sweep)."""
    vals = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in EMA_NAMES]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"--ema takes a comma-separated subset of {EMA_NAMES}, got {text!r}")
    return vals


@dataclass(frozen=True)
class SampleOptions:
    """Checkpoint and sampling (flags left out take the official values, or the demo run's with --preset demo)."""

    ckpt: str | Path = option(help="checkpoint: .pth (official or ours), .safetensors, DCP dir, run dir")
    preset: Literal["demo"] | None = option(None, "demo: sample grid + class accuracy (digits)")
    model: str | None = option(None, "model preset when the checkpoint has no metadata")
    img_size: int | None = option(None, "image size when the checkpoint has no metadata", range=INT_POSITIVE)
    num_classes: int | None = option(None, "classes when the checkpoint has no metadata", range=INT_POSITIVE)
    num_images: int = option(DEFAULT_NUM_IMAGES, "images to generate", range=INT_POSITIVE)
    num_images_given: bool = option(False, cli=False)
    batch_size: int = option(64, "images per rank per batch (fixed graph shape)", range=INT_POSITIVE)
    cfg: tuple[float, ...] = option((2.9,), "guidance scale(s), e.g. 2.5,2.7,2.9", range=NONNEGATIVE,
                                    parse=_float_list)
    interval: tuple[float, float] = option((0.1, 1.0), "CFG interval", range=PROBABILITY, nargs=2,
                                           metavar=("LO", "HI"))
    steps: int = option(50, "sampling steps", range=INT_POSITIVE)
    solver: Solver = option("heun", "ODE solver")
    seed: int = option(0, "seed of the noise (image i's noise depends only on the seed and i)", range=SEED)
    ema: tuple[str, ...] = option(("ema1",), "weights: ema1, ema2, model (comma list sweeps)", parse=_ema_list)
    noise_scale: float | None = option(None, "default: checkpoint's, else 1 (2 at >= 512)", range=POSITIVE)
    t_eps: float | None = option(None, "default: checkpoint's, else 0.05", range=UNIT_OPEN)
    # text models (docs/TEXT.md): prompts (image i gets prompt i % P) and the encoder (default: the checkpoint's)
    prompt: tuple[str, ...] = option((), "text models: a caption (repeatable)", action="append")
    prompts: Path | None = option(None, "text models: a file of captions, one per line", parse=Path)
    images_per_prompt: int | None = option(None, "text models: images of each prompt (image i gets prompt i %% P; "
                                                 "default 1)", range=INT_POSITIVE)
    text_encoder: str | None = option(None, "text models: the encoder (hub id or dir; default: the one the "
                                            "checkpoint records, which must match its revision)")


@dataclass(frozen=True)
class MetricOptions:
    """FID / Inception Score."""

    metrics: bool = option(True, "skip Inception (no FID/IS)", flags=("--no-metrics",))
    fid_ref: Path | None = option(None, "reference: stats .npz (mu, sigma), images .npz or dir", parse=Path)
    fid_ref_crop: int | None = option(None, "ADM center-crop reference folder images", range=INT_POSITIVE)
    fid_cache: Path | None = option(None, "cache of folder statistics (default ~/.cache)", parse=Path)
    fid_batch_size: int = option(64, "Inception batch (64 = torch-fidelity's)", range=INT_POSITIVE)
    fid_workers: int = option(4, "decoder processes for a reference folder", range=INT_NONNEGATIVE)
    inception_weights: Path | None = option(None, "torch-fidelity Inception .pth (offline)", parse=Path)


@dataclass(frozen=True)
class OutputOptions:
    """Output and runtime."""

    out: Path = option(Path("samples_out"), "output directory", parse=Path)
    png: bool = option(False, "also write OUT/images/NNNNNN.png")
    no_npz: bool = option(False, "do not write samples.npz")
    npz_keys: Literal["both", "named", "adm"] = option(
        "both", "samples.npz arrays: images/labels, arr_0/arr_1 (ADM suite) or both")
    overwrite: bool = option(False, "discard chunks of a different earlier run in OUT")
    keep_parts: bool = option(False, "keep OUT/parts after finishing")
    skip_checksum: bool = option(False, "load a DCP checkpoint even if its files differ from checksums.json "
                                        "(corrupt)")
    compile: bool = option(False, "torch.compile the network")
    no_cuda_graph: bool = option(False, "run the sampler eagerly on CUDA")
    precision: Precision = option("auto", "auto: bf16 on sm_80+, fp16 on older GPUs, fp32 on CPU")
    kernels: Kernels = option("torch", "block ops: the eager torch ops or the fused Triton kernels")
    device: str = option("auto", "auto | cpu | cuda")


@dataclass(frozen=True)
class SampleConfig(OutputOptions, MetricOptions, SampleOptions):
    """Settings of one `sample.py` launch, built once from the parsed flags by `SampleConfig.from_args`."""

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> SampleConfig:
        """The config of parsed `sample.py` flags: unset sampling flags get the official (or demo) defaults."""
        given = dict(vars(a))
        if given.get("preset") == "demo":
            demo = RUN_PRESETS["demo"]
            defaults = dict(cfg=(demo["cfg"],), interval=(demo["interval_min"], demo["interval_max"]),
                            steps=demo["eval_steps"])
            given = {**defaults, **given}
        given["num_images_given"] = "num_images" in given
        for name in ("cfg", "interval", "ema", "prompt"):
            if name in given:
                given[name] = tuple(given[name])
        return cls(**given)

    def validate(self) -> None:
        """Raise UsageError naming the flag for a value or combination that cannot work (also for API callers)."""
        check_options(self, UsageError)
        lo, hi = self.interval
        if not lo < hi:
            raise UsageError(f"--interval needs 0 <= LO < HI <= 1, got {lo} {hi}")
        if self.preset == "demo" and self.metrics and self.num_images < DEMO_MIN_IMAGES:
            raise UsageError(f"--num-images {self.num_images}: the demo judge needs at least {DEMO_MIN_IMAGES} "
                             "images (two per digit class); pass more, or --no-metrics to only sample")
        if self.fid_ref is not None and not self.metrics:
            raise UsageError("--fid-ref needs the Inception metrics; drop --no-metrics")
        if self.images_per_prompt is not None and self.num_images_given:
            raise UsageError("--images-per-prompt sets --num-images (prompts x images per prompt): pass one of them")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} exists and is not a directory")
