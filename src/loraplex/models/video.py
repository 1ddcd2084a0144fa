"""Frame-wise video classification with any image backbone (seed 000's action-recognition setting).

``FrameWise(backbone)(clips)`` takes ``[B, T, C, H, W]``, folds the frames into the batch as
``[B·T, C, H, W]`` **batch-major** (all frames of sample 0, then sample 1, …), runs the image
backbone once and pools the frames' features over time.  Batch-major folding is what makes the
engine's per-sample routing work unchanged: every adapted layer sees a leading dimension
``B · T · k`` and views it as ``[B, -1, C]`` (``k = frames`` in :mod:`loraplex.core.routing`'s terms),
so each frame of a clip uses its clip's domain LoRA, and one set of adapters serves every frame.

Pooling: ``mean`` is TSN's average consensus (order-free, the usual choice for action datasets and the
paper's); ``concat`` lays the ``T`` frame features side by side (``T · D`` features), so the heads see
frame order — needed when a motion and its reverse are different classes (left-to-right vs
right-to-left hold the same set of frames, which no order-free pooling can tell apart).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Pooling = Literal["mean", "concat"]


class FrameWise(nn.Module):
    """Image backbone → clip features by pooling over time (``mean`` or order-keeping ``concat``)."""

    def __init__(self, backbone: nn.Module, pooling: Pooling = "mean", frames: int | None = None) -> None:
        super().__init__()
        if pooling not in ("mean", "concat"):
            raise ValueError(f"temporal pooling must be 'mean' or 'concat', got {pooling!r}")
        if pooling == "concat" and not frames:
            raise ValueError("concat pooling needs the number of frames (the head's width depends on it)")
        if getattr(backbone, "num_classes", 0) and hasattr(backbone, "reset_classifier"):
            backbone.reset_classifier(0)  # clip heads are the wrapper's owner's (one per domain)
        self.backbone, self.pooling, self.frames = backbone, pooling, frames
        self.num_features = backbone.num_features * (frames if pooling == "concat" else 1)
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", None) or {}  # names the architecture in errors

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5:
            raise ValueError(f"FrameWise expects clips [B, T, C, H, W], got shape {tuple(clips.shape)}")
        batch, frames = clips.shape[:2]
        if self.pooling == "concat" and frames != self.frames:
            raise ValueError(f"this model concatenates {self.frames} frames, got clips of {frames}")
        features = self.backbone(clips.flatten(0, 1)).view(batch, frames, -1)
        return features.flatten(1) if self.pooling == "concat" else features.mean(1)
