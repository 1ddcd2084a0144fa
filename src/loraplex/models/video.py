"""Frame-wise video classification with any image backbone (seed 000's action-recognition setting).

``FrameWise(backbone)(clips)`` takes ``[B, T, C, H, W]``, folds the frames into the batch as
``[B·T, C, H, W]`` **batch-major** (all frames of sample 0, then sample 1, …), runs the image
backbone once and averages the pooled features over time.  Batch-major folding is what makes the
engine's per-sample routing work unchanged: every adapted layer sees a leading dimension
``B · T · k`` and views it as ``[B, -1, C]`` (``k = frames`` in :mod:`loraplex.core.routing`'s terms),
so each frame of a clip uses its clip's domain LoRA, and one set of adapters serves every frame.
"""

from __future__ import annotations

import torch
from torch import nn


class FrameWise(nn.Module):
    """Image backbone → clip features by temporal average pooling (TSN-style consensus)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if getattr(backbone, "num_classes", 0) and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)  # clip heads are the wrapper's owner's (one per domain)
        self.backbone = backbone
        self.num_features = backbone.num_features
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", None) or {}  # names the architecture in errors

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5:
            raise ValueError(f"FrameWise expects clips [B, T, C, H, W], got shape {tuple(clips.shape)}")
        batch, frames = clips.shape[:2]
        features = self.backbone(clips.flatten(0, 1))
        return features.view(batch, frames, -1).mean(1)
