"""Backbones (timm presets, the offline zoo, local checkpoints) and the frame-wise video wrapper."""

from .backbones import BackboneError, create_backbone, describe_backbone, write_zoo_entry, zoo_dir, zoo_entries
from .video import FrameWise

__all__ = [
    "BackboneError",
    "FrameWise",
    "create_backbone",
    "describe_backbone",
    "write_zoo_entry",
    "zoo_dir",
    "zoo_entries",
]
