"""Checkpoints: official .pth format (`official`), sharded DCP training checkpoints (`dcp`), weights for
sampling and export (`weights`), and the model metadata every kind records (`meta`).

The names below are the ones users and other packages reach for; everything else is imported from its module.
"""

from jit_fast.checkpoint.dcp import latest_checkpoint, list_checkpoints
from jit_fast.checkpoint.meta import CheckpointError, ModelMeta
from jit_fast.checkpoint.official import load_official_checkpoint
from jit_fast.checkpoint.weights import WEIGHT_SETS, build_model_from_meta, export_checkpoint, load_model, load_weights

__all__ = [
    "WEIGHT_SETS",
    "CheckpointError",
    "ModelMeta",
    "build_model_from_meta",
    "export_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model",
    "load_official_checkpoint",
    "load_weights",
]
