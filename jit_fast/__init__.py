"""jit_fast: fast training and sampling of JiT (pixel-space flow matching with x-prediction)."""

from jit_fast.checkpoint import load_official_checkpoint
from jit_fast.configs import MODEL_PRESETS, ModelConfig, TrainConfig, model_config
from jit_fast.model.denoiser import flow_matching_loss
from jit_fast.model.network import JiT, build_model
from jit_fast.sampling.sampler import sample

__all__ = [
    "JiT",
    "MODEL_PRESETS",
    "ModelConfig",
    "TrainConfig",
    "build_model",
    "flow_matching_loss",
    "load_official_checkpoint",
    "model_config",
    "sample",
]
