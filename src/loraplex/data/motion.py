"""The offline multi-domain video benchmark (benchmarks.md #2): real images moving along motion patterns.

A clip is ``T`` frames of a black ``canvas × canvas`` field in which one real image (``item × item``)
moves along one of :data:`PATTERNS`; **the pattern is the class** and the image source (fashion,
mnist, digits) is the domain, so a model must read motion across frames, not the item's own label.
Every clip is a deterministic function of ``(seed, clip index)``: which image, where it starts, the
perpendicular offset, the circle's radius and phase, the zoom's centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PATTERNS: tuple[str, ...] = (
    "left_to_right",
    "right_to_left",
    "top_to_bottom",
    "bottom_to_top",
    "diagonal_down",  # top-left → bottom-right
    "diagonal_up",  # bottom-left → top-right
    "circle",  # one clockwise turn
    "zoom_in",
)
ZOOM_RANGE = (0.4, 1.6)  # item scale at the first and last frame of a zoom-in


@dataclass
class MotionClips:
    """uint8 clips ``[N, T, canvas, canvas]`` (grey), their pattern labels, and the source image used."""

    clips: torch.Tensor
    labels: torch.Tensor
    items: torch.Tensor  # index into the source images
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _track(pattern: str, frames: int, span: float, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Per frame ``(x, y, scale)`` of the item's centre, with ``span`` = how far a centre may travel."""
    lo, hi = -span / 2, span / 2
    across = rng.uniform(lo, hi) * 0.5  # perpendicular offset of a straight path
    ts = np.linspace(0.0, 1.0, frames)
    if pattern == "circle":
        radius, phase = rng.uniform(0.6, 1.0) * span / 2, rng.uniform(0, 2 * math.pi)
        return [
            (radius * math.cos(phase + 2 * math.pi * t), radius * math.sin(phase + 2 * math.pi * t), 1.0) for t in ts
        ]
    if pattern == "zoom_in":
        cx, cy = rng.uniform(lo, hi, size=2) * 0.25
        return [(cx, cy, ZOOM_RANGE[0] + (ZOOM_RANGE[1] - ZOOM_RANGE[0]) * t) for t in ts]
    ends = {
        "left_to_right": ((lo, across), (hi, across)),
        "right_to_left": ((hi, across), (lo, across)),
        "top_to_bottom": ((across, lo), (across, hi)),
        "bottom_to_top": ((across, hi), (across, lo)),
        "diagonal_down": ((lo + across / 2, lo - across / 2), (hi + across / 2, hi - across / 2)),
        "diagonal_up": ((lo + across / 2, hi + across / 2), (hi + across / 2, lo + across / 2)),
    }
    if pattern not in ends:
        raise ValueError(f"unknown motion pattern {pattern!r}; known: {list(PATTERNS)}")
    (x0, y0), (x1, y1) = ends[pattern]
    return [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, 1.0) for t in ts]


def _paste(canvas: torch.Tensor, item: torch.Tensor, cx: float, cy: float) -> None:
    """Draw ``item`` centred at ``(cx, cy)`` (canvas-centred coordinates), clipped, brightest pixel wins."""
    size, h = canvas.shape[-1], item.shape[-1]
    top, left = round(size / 2 + cy - h / 2), round(size / 2 + cx - h / 2)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, size), min(left + h, size)
    if y1 > y0 and x1 > x0:
        patch = item[y0 - top : y1 - top, x0 - left : x1 - left]
        canvas[y0:y1, x0:x1] = torch.maximum(canvas[y0:y1, x0:x1], patch)


def motion_clips(
    images: torch.Tensor, count: int, *, frames: int = 8, canvas: int = 32, item: int = 16, seed: int = 0
) -> MotionClips:
    """``count`` clips (classes balanced, order shuffled) from grey uint8 ``images [N, h, w]``."""
    if images.dim() != 3 or images.dtype != torch.uint8:
        raise ValueError(f"motion clips need grey uint8 images [N, h, w], got {images.dtype} {tuple(images.shape)}")
    if not 0 < item <= canvas or frames < 2:
        raise ValueError(f"need 0 < item ≤ canvas and frames ≥ 2, got item={item}, canvas={canvas}, frames={frames}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(count) % len(PATTERNS))
    chosen = rng.integers(0, len(images), size=count)
    span = float(canvas - item)
    clips = torch.zeros(count, frames, canvas, canvas, dtype=torch.uint8)
    scaled: dict[tuple[int, int], torch.Tensor] = {}
    for n in range(count):
        clip_rng = np.random.default_rng((seed, n))
        source = images[int(chosen[n])].float()[None, None]
        for t, (cx, cy, scale) in enumerate(_track(PATTERNS[labels[n]], frames, span, clip_rng)):
            side = max(1, round(item * scale))
            key = (int(chosen[n]), side)
            if key not in scaled:
                resized = F.interpolate(source, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
                scaled[key] = resized[0, 0].round().clamp(0, 255).to(torch.uint8)
            _paste(clips[n, t], scaled[key], cx, cy)
    return MotionClips(clips, torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(chosen), list(PATTERNS))
