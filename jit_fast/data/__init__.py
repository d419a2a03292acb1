"""Data pipeline: ADM center crop, sharded reshuffled ImageFolder loading (DALI or torch), demo digits."""

from .captions import CaptionedIndex, CaptionError, build_caption_index
from .crop import CropGeometry, center_crop, crop_geometry
from .demo import demo_arrays, demo_prompts, demo_text_encoder, prepare_demo, prepare_demo_text
from .index import FolderIndex, build_index
from .loader import ImageLoader, build_loader, default_backend
from .order import EpochPlan, plan_epoch

__all__ = [
    "CaptionError",
    "CaptionedIndex",
    "build_caption_index",
    "CropGeometry",
    "EpochPlan",
    "FolderIndex",
    "ImageLoader",
    "build_index",
    "build_loader",
    "center_crop",
    "crop_geometry",
    "default_backend",
    "demo_arrays",
    "demo_prompts",
    "demo_text_encoder",
    "plan_epoch",
    "prepare_demo",
    "prepare_demo_text",
]
