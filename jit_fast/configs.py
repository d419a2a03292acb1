"""Model presets and run configuration dataclasses (training: TrainConfig; sampling: SampleConfig)."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from jit_fast.errors import UsageError

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

CONDITIONINGS = ("class", "text")
TEXT_TOKENS = ("pooled", "sequence")
NULL_TEXTS = ("learned", "empty")


@dataclass(frozen=True)
class NumberRange:
    """Allowed values of a numeric setting; also an argparse `type=` so bad flags fail at parse time."""

    kind: type = float  # int or float
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        """Human-readable range, e.g. 'a finite number in (0, 1]' or 'an integer >= 1'."""
        what = "an integer" if self.kind is int else "a finite number"
        fmt = "{:d}" if self.kind is int else "{:g}"
        lo, hi = (None if b is None else fmt.format(int(b) if self.kind is int else b) for b in (self.lo, self.hi))
        if self.lo is not None and self.hi is not None:
            return f"{what} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{what} {'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{what} {'<' if self.hi_open else '<='} {hi}"
        return what

    def contains(self, v: float) -> bool:
        """True if `v` has the right kind, is finite and lies within the bounds."""
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (self.kind is int and not isinstance(v, int)):
            return False
        if not math.isfinite(v):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def __call__(self, text: str) -> int | float:
        """Parse and check a command-line value; ArgumentTypeError gives argparse's 'argument --x: ...' line."""
        try:
            v = self.kind(text)
        except ValueError:
            v = None
        if v is None or not self.contains(v):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return v


INT_POSITIVE = NumberRange(int, lo=1)
INT_NONNEGATIVE = NumberRange(int, lo=0)
SEED = NumberRange(int, lo=0, hi=2**63 - 1)
PROBABILITY = NumberRange(float, lo=0.0, hi=1.0)
UNIT_OPEN = NumberRange(float, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
DECAY = NumberRange(float, lo=0.0, hi=1.0, hi_open=True)
POSITIVE = NumberRange(float, lo=0.0, lo_open=True)
NONNEGATIVE = NumberRange(float, lo=0.0)
LEARNING_RATE = NumberRange(float, lo=0.0, hi=1.0, lo_open=True)  # AdamW lr > 1 is nonsense, 1e300 overflows

# Allowed values of the numeric ModelConfig fields (--model-arg KEY=VALUE reaches them unchecked by argparse).
MODEL_RANGES: dict[str, NumberRange] = {
    "input_size": INT_POSITIVE, "patch_size": INT_POSITIVE, "in_channels": INT_POSITIVE,
    "num_classes": INT_POSITIVE, "hidden_size": INT_POSITIVE, "depth": INT_POSITIVE, "num_heads": INT_POSITIVE,
    "mlp_ratio": POSITIVE, "attn_drop": DECAY, "proj_drop": DECAY, "bottleneck_dim": INT_POSITIVE,
    "in_context_len": INT_NONNEGATIVE, "in_context_start": INT_NONNEGATIVE, "mlp_pad_to": INT_POSITIVE,
    "text_dim": INT_NONNEGATIVE,
}


@dataclass
class ModelConfig:
    """Constructor arguments of a JiT model; names follow the official constructor."""

    input_size: int = 256
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    attn_drop: float = 0.0
    proj_drop: float = 0.0
    bottleneck_dim: int = 128
    in_context_len: int = 32
    in_context_start: int = 4
    kernels: str = "torch"
    mlp_pad_to: int = 1
    # Text conditioning (class models leave these at their defaults): the caption embedding width of the
    # encoder, pooled (one vector) or sequence (per-token states as the in-context tokens), and the null
    # embedding of dropped captions: learned, or the encoder's embedding of the empty caption.
    conditioning: str = "class"
    text_dim: int = 0
    text_tokens: str = "pooled"
    null_text: str = "learned"

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
        for name, allowed in MODEL_RANGES.items():
            if not allowed.contains(getattr(self, name)):
                raise ValueError(f"model setting {name} must be {allowed.describe()}, got {getattr(self, name)!r}")
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
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        for name, allowed in (("conditioning", CONDITIONINGS), ("text_tokens", TEXT_TOKENS),
                              ("null_text", NULL_TEXTS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"model setting {name} must be one of {', '.join(allowed)}, got {value!r}")
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


@dataclass
class TrainConfig:
    """Training recipe; field names follow the official training command's flags.

    Defaults are the official ImageNet recipe. `batch_size` is per rank (per micro-step), so the
    global batch is batch_size x world_size x grad_accum and lr = blr x global_batch / 256
    unless `lr` is set. `num_classes` 0 means: from the dataset (or the resumed checkpoint).
    """

    preset: str = ""
    model: str = "JiT-B/16"
    img_size: int = 256
    num_classes: int = 0
    data_path: str = ""
    demo_data: bool = False  # use the built-in digits ImageFolder (jit_fast.data.prepare_demo)
    data_backend: str = "auto"
    dali_filter: str = "cubic"  # DALI's final resize: cubic (PIL BICUBIC) or linear (cheaper on CPU, ~44 dB)
    flip: bool = True  # random horizontal flip; off for the digits demo (a mirrored 3 is no digit)
    output_dir: str = "output"
    resume: str = ""
    auto_resume: bool = False  # continue from output_dir's newest checkpoint if there is one
    overwrite: bool = False  # a fresh run may replace output_dir's old run (moved aside, never deleted)
    discard_newer: bool = False  # resuming a non-latest checkpoint in place moves the newer ones aside
    skip_checksum: bool = False  # load checkpoint files even if they differ from their checksums.json
    # recipe
    epochs: int = 600
    max_steps: int = 0
    batch_size: int = 128
    grad_accum: int = 1
    blr: float = 5e-5
    lr: float | None = None  # absolute lr; None: blr x global_batch / 256 (official)
    min_lr: float = 0.0
    lr_schedule: str = "constant"
    warmup_epochs: float = 5.0
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.0
    ema_decay1: float = 0.9999
    ema_decay2: float = 0.9996
    P_mean: float = -0.8
    P_std: float = 0.8
    noise_scale: float = 1.0
    t_eps: float = 0.05
    label_drop_prob: float = 0.1
    attn_dropout: float = -1.0
    proj_dropout: float = -1.0
    kernels: str = "torch"
    precision: str = "auto"  # auto: bf16 on sm_80+ GPUs, fp16 on older ones (no bf16), fp32 on CPU
    device: str = "auto"
    seed: int = 0
    num_workers: int = 4
    # distributed / performance
    fsdp: str = "auto"  # auto: FSDP2 when world_size > 1
    compile: bool = False
    activation_checkpointing: bool = False
    reshard_after_forward: bool = True
    max_memory_gb: float = 0.0  # GiB per rank the modeled peak must fit before the first step; 0: a GPU only warns
    # logging / checkpoints
    log_freq: int = 50
    save_freq_steps: int = 0
    save_last_freq: int = 5
    keep_last: int = 3
    async_save: bool = False
    signal_check_freq: int = 1
    tensorboard: bool = True
    peak_tflops: float = 0.0  # per device, for MFU; 0 = from the GPU name
    # evaluation: the demo's after training, online FID/IS (official flags and defaults), --evaluate-gen
    demo_eval: bool = False
    online_eval: bool = False
    evaluate_gen: bool = False
    eval_freq: int = 40  # epochs between online evaluations (and after the last epoch)
    gen_bsz: int = 256  # images per rank per sampling batch
    eval_num_images: int = 0  # 0: 50000 for FID (official), the demo's own default for the demo evaluation
    eval_steps: int = 50
    cfg: float = 1.0
    interval_min: float = 0.0
    interval_max: float = 1.0
    solver: str = "heun"
    fid_ref: str = ""  # reference statistics .npz or image folder ("": Inception Score only)
    inception_weights: str = ""  # torch-fidelity Inception weights .pth ("": torch-fidelity's download)
    # watching and profiling
    wandb: str = ""  # Weights & Biases project ("": off)
    profile_steps: str = ""  # "A:B": torch.profiler trace of steps A..B-1
    extra_model_args: dict = field(default_factory=dict)
    # text conditioning (issue 14, docs/TEXT.md): a -Text model reads caption embeddings from --text-cache, or
    # runs the frozen --text-encoder per step; "" / 0 mean "take it from the cache" (text_tokens and null_text
    # are --model-arg shorthands, folded into extra_model_args by the parser)
    use_text_conditioning: bool = False  # the fork's switch: the model's -Text twin
    text_cache: str = ""
    text_encoder: str = ""
    text_encoder_revision: str = ""
    max_text_len: int = 0
    freeze_llm: bool = True


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


# Allowed values of every numeric TrainConfig field (flags are checked at parse time, presets and
# API configs by `train.validate_config`).
TRAIN_RANGES: dict[str, NumberRange] = {
    "img_size": INT_POSITIVE, "num_classes": INT_NONNEGATIVE, "num_workers": INT_NONNEGATIVE,
    "epochs": INT_POSITIVE, "max_steps": INT_NONNEGATIVE, "batch_size": INT_POSITIVE, "grad_accum": INT_POSITIVE,
    "blr": LEARNING_RATE, "lr": LEARNING_RATE, "min_lr": NumberRange(float, lo=0.0, hi=1.0),
    "warmup_epochs": NONNEGATIVE, "weight_decay": NONNEGATIVE, "beta1": DECAY, "beta2": DECAY,
    "grad_clip": NONNEGATIVE, "ema_decay1": DECAY, "ema_decay2": DECAY, "P_mean": NumberRange(float),
    "P_std": POSITIVE, "noise_scale": POSITIVE, "t_eps": UNIT_OPEN, "label_drop_prob": PROBABILITY,
    "attn_dropout": DECAY, "proj_dropout": DECAY, "seed": SEED, "log_freq": INT_POSITIVE,
    "save_freq_steps": INT_NONNEGATIVE, "save_last_freq": INT_NONNEGATIVE, "keep_last": INT_NONNEGATIVE,
    "signal_check_freq": INT_POSITIVE, "peak_tflops": NONNEGATIVE, "cfg": NONNEGATIVE,
    "interval_min": PROBABILITY, "interval_max": PROBABILITY, "eval_steps": INT_POSITIVE,
    "eval_num_images": INT_NONNEGATIVE, "eval_freq": INT_POSITIVE, "gen_bsz": INT_POSITIVE,
    "max_memory_gb": NONNEGATIVE,
    "max_text_len": INT_NONNEGATIVE,
}


# Sampling defaults of `sample.py` (the official evaluation); `--preset demo` takes those of the demo run.
SAMPLING_DEFAULTS: dict = {"cfg": [2.9], "interval": [0.1, 1.0], "steps": 50, "solver": "heun"}
DEFAULT_NUM_IMAGES = 50000


@dataclass(frozen=True)
class SampleConfig:
    """Settings of one `sample.py` launch, built once from the parsed flags by `SampleConfig.from_args`."""

    ckpt: str | Path
    preset: str | None = None
    model: str | None = None  # None: the checkpoint's metadata decides (as img_size, num_classes)
    img_size: int | None = None
    num_classes: int | None = None
    num_images: int = DEFAULT_NUM_IMAGES
    num_images_given: bool = False
    batch_size: int = 64
    cfg: tuple[float, ...] = (2.9,)
    interval: tuple[float, float] = (0.1, 1.0)
    steps: int = 50
    solver: str = "heun"
    seed: int = 0
    ema: tuple[str, ...] = ("ema1",)
    noise_scale: float | None = None  # None: the checkpoint's, else 1 (2 at >= 512 px)
    t_eps: float | None = None  # None: the checkpoint's, else 0.05
    out: Path = Path("samples_out")
    fid_ref: Path | None = None
    fid_ref_crop: int | None = None
    fid_cache: Path | None = None
    fid_batch_size: int = 64
    fid_workers: int = 4
    inception_weights: Path | None = None
    skip_checksum: bool = False
    metrics: bool = True
    png: bool = False
    no_npz: bool = False
    npz_keys: str = "both"
    compile: bool = False
    no_cuda_graph: bool = False
    precision: str = "auto"
    kernels: str = "torch"
    device: str = "auto"
    overwrite: bool = False
    keep_parts: bool = False
    # text models (docs/TEXT.md): prompts (image i gets prompt i % P) and the encoder (default: the checkpoint's)
    prompt: tuple[str, ...] = ()
    prompts: Path | None = None
    images_per_prompt: int | None = None
    text_encoder: str | None = None

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> SampleConfig:
        """The config of parsed `sample.py` flags: unset sampling flags get the official (or demo) defaults."""
        defaults = dict(SAMPLING_DEFAULTS)
        if a.preset == "demo":
            demo = RUN_PRESETS["demo"]
            defaults.update(cfg=[demo["cfg"]], interval=[demo["interval_min"], demo["interval_max"]],
                            steps=demo["eval_steps"])
        given = {f.name: getattr(a, f.name) for f in fields(cls) if f.name != "num_images_given"}
        for k, v in defaults.items():
            if given[k] is None:
                given[k] = v
        given["num_images_given"] = a.num_images is not None
        if a.num_images is None:
            given["num_images"] = DEFAULT_NUM_IMAGES
        given.update(cfg=tuple(given["cfg"]), interval=tuple(given["interval"]), ema=tuple(given["ema"]),
                     out=Path(given["out"]), prompt=tuple(given["prompt"] or ()))
        return cls(**given)

    def validate(self) -> None:
        """Raise UsageError naming the flag for a value or combination that cannot work (also for API callers)."""
        checks = [("--num-images", self.num_images, INT_POSITIVE), ("--batch-size", self.batch_size, INT_POSITIVE),
                  ("--steps", self.steps, INT_POSITIVE), ("--seed", self.seed, SEED),
                  ("--fid-batch-size", self.fid_batch_size, INT_POSITIVE)]
        for flag, value, allowed in checks:
            if not allowed.contains(value):
                raise UsageError(f"{flag} must be {allowed.describe()}, got {value!r}")
        bad_cfg = [c for c in self.cfg if not NONNEGATIVE.contains(c)]
        if bad_cfg:
            raise UsageError(f"--cfg must be {NONNEGATIVE.describe()}, got {bad_cfg[0]!r}")
        lo, hi = self.interval
        if not (PROBABILITY.contains(lo) and PROBABILITY.contains(hi) and lo < hi):
            raise UsageError(f"--interval needs 0 <= LO < HI <= 1, got {lo} {hi}")
        if self.fid_ref is not None and not self.metrics:
            raise UsageError("--fid-ref needs the Inception metrics; drop --no-metrics")
        if self.images_per_prompt is not None and self.num_images_given:
            raise UsageError("--images-per-prompt sets --num-images (prompts x images per prompt): pass one of them")
        if self.out.exists() and not self.out.is_dir():
            raise UsageError(f"--out {self.out} exists and is not a directory")
