"""Task heads, rebuilt from a small JSON-able spec so that a saved model reloads with the same heads.

* ``{"kind": "linear"}`` — one ``nn.Linear`` on pooled features (classification; the default).
* ``{"kind": "dense", "out_size": S}`` — MTLoRA's decoder on a feature pyramid: per stage a bias-free
  1×1 fusion conv to HRNet-W18 widths ``18 · 2^i`` (``[18, 36, 72, 144]`` for Swin-T's four stages),
  the coarser maps upsampled to the finest and concatenated (270 channels for four stages), then
  1×1 conv → 4× the width (with bias), BatchNorm, ReLU, 1×1 conv → the task's outputs, and bilinear
  upsampling to ``S × S`` (the input size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FUSION_BASE = 18  # HRNet-W18's finest width
HEAD_EXPANSION = 4


class DenseHead(nn.Module):
    """Pyramid ``[B, C_i, H_i, W_i]`` → per-pixel outputs ``[B, K, S, S]``."""

    def __init__(self, channels: Sequence[int], outputs: int, out_size: int) -> None:
        super().__init__()
        widths = [FUSION_BASE * 2**i for i in range(len(channels))]
        self.fusion = nn.ModuleList(nn.Conv2d(c, w, 1, bias=False) for c, w in zip(channels, widths, strict=True))
        width = sum(widths)
        self.decode = nn.Sequential(
            nn.Conv2d(width, width * HEAD_EXPANSION, 1),
            nn.BatchNorm2d(width * HEAD_EXPANSION),
            nn.ReLU(inplace=True),
            nn.Conv2d(width * HEAD_EXPANSION, outputs, 1),
        )
        self.out_features = outputs
        self.out_size = out_size

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = [conv(f) for conv, f in zip(self.fusion, features, strict=True)]
        size = fused[0].shape[-2:]
        up = [fused[0]] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in fused[1:]]
        out = self.decode(torch.cat(up, 1))
        return F.interpolate(out, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)


def make_head(spec: dict[str, Any], features: int | Sequence[int], outputs: int) -> nn.Module:
    kind = spec.get("kind", "linear")
    if kind == "linear":
        if not isinstance(features, int):
            raise ValueError("a linear head needs pooled features; this backbone gives a pyramid: use a dense head")
        return nn.Linear(features, outputs)
    if kind == "dense":
        if isinstance(features, int):
            raise ValueError("a dense head needs a feature pyramid (e.g. SwinPyramid), got pooled features")
        return DenseHead(features, outputs, int(spec["out_size"]))
    raise ValueError(f"unknown head kind {kind!r}; known: linear, dense")
