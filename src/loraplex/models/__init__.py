"""Backbones (timm presets, the offline zoo, local checkpoints)."""

from .backbones import BackboneError, create_backbone, zoo_entries

__all__ = ["BackboneError", "create_backbone", "zoo_entries"]
