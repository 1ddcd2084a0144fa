"""The offline dense multi-task benchmark (benchmarks.md #3, MTLoRA's structure): scenes of real items.

A scene is a black ``size × size`` canvas on which 2–4 real items (Fashion-MNIST garments and MNIST
digits) are pasted at random positions and scales, each at its own depth, far ones first so that near
ones occlude them.  An item's pixels are those brighter than :data:`ITEM_THRESHOLD`.  Four dense tasks
per image, mirroring PASCAL-Context's four:

* ``semseg`` — 21 classes: background 0, garments 1–10, digits 11–20;
* ``saliency`` — the foreground mask (``semseg > 0``);
* ``depth`` — each item's depth on its visible pixels, :data:`BACKGROUND_DEPTH` elsewhere;
* ``normals`` — unit normals of the height field ``h = (1 − depth) + RELIEF · intensity`` (items stand
  out by nearness and their own shading), smoothed by a Gaussian of σ = :data:`SMOOTHING` · size pixels,
  from central differences, ``h`` in units of :data:`HEIGHT_SCALE` · size pixels.

Why smoothed (choice): real surfaces are smooth at the scale a dense head predicts, and the raw field is
not — its normals' signal sits in 1-pixel cliffs at item rims and stroke edges.  On raw fields, maps
averaged over the cells of the Swin pyramid's finest (stride-4) map scored no better than a flat surface
(32 px: 12.2° against 11.5°; 64 px: 8.9° against 9.1°), so no model with such a head could learn the
task; with σ = size / 16 the same reference scores 3.8° against 10.2° for the flat surface (32 px).

Every scene is a function of ``(seed, scene index)`` and the item pools, which come from disjoint
splits of the sources, so no item image is shared between train, val and test scenes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

ITEM_THRESHOLD = 40  # uint8 intensity above which a pixel belongs to an item
BACKGROUND_DEPTH = 1.0
DEPTH_RANGE = (0.3, 0.9)
SCALE_RANGE = (0.35, 0.6)  # item side as a fraction of the canvas
ITEMS_RANGE = (2, 4)
RELIEF = 0.1
HEIGHT_SCALE = 0.25
SMOOTHING = 1 / 16  # σ of the height field's Gaussian, as a fraction of the canvas side
TARGET_CHANNELS = {"semseg": slice(0, 1), "depth": slice(1, 2), "normals": slice(2, 5)}  # packed float16


@dataclass
class Scenes:
    """uint8 images ``[N, S, S]`` and packed float16 targets ``[N, 5, S, S]`` (see :data:`TARGET_CHANNELS`)."""

    images: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


SCENE_TASKS = ("semseg", "saliency", "normals", "depth")


def scene_target(packed: torch.Tensor, task: str) -> torch.Tensor:
    """One task's target from packed targets ``[B, 5, S, S]``: class ids / mask ``[B, S, S]``, maps ``[B, C, S, S]``."""
    if task == "semseg":
        return packed[:, TARGET_CHANNELS["semseg"]][:, 0].long()
    if task == "saliency":
        return (packed[:, TARGET_CHANNELS["semseg"]][:, 0] > 0).float()
    if task in ("depth", "normals"):
        return packed[:, TARGET_CHANNELS[task]].float()
    raise ValueError(f"scenes have no {task!r} target; they have {list(SCENE_TASKS)}")


def normals_of(height: torch.Tensor) -> torch.Tensor:
    """Unit normals ``[..., 3, S, S]`` of a height field ``[..., S, S]`` (in pixel units)."""
    dy, dx = torch.gradient(height, dim=(-2, -1))
    normal = torch.stack([-dx, -dy, torch.ones_like(height)], dim=-3)
    return normal / normal.norm(dim=-3, keepdim=True)


def smooth_height(height: torch.Tensor) -> torch.Tensor:
    """``height [S, S]`` blurred by a Gaussian of σ = ``SMOOTHING · S`` (reflected at the canvas border)."""
    sigma = SMOOTHING * height.shape[-1]
    kernel = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur(height[None], [kernel, kernel], [sigma, sigma])[0]


def dense_scenes(
    pools: list[tuple[torch.Tensor, torch.Tensor]], count: int, *, size: int = 64, seed: int = 0
) -> Scenes:
    """``count`` scenes from item pools ``[(uint8 images [N, h, w], class ids [N] ≥ 1), …]`` (one per source)."""
    if any(images.dim() != 3 or images.dtype != torch.uint8 for images, _ in pools):
        raise ValueError("scene items must be grey uint8 images [N, h, w]")
    images = torch.zeros(count, size, size, dtype=torch.uint8)
    targets = torch.empty(count, 5, size, size, dtype=torch.float16)
    for n in range(count):
        rng = np.random.default_rng((seed, n))
        canvas = torch.zeros(size, size)
        semseg = torch.zeros(size, size)
        depth = torch.full((size, size), BACKGROUND_DEPTH)
        k = int(rng.integers(ITEMS_RANGE[0], ITEMS_RANGE[1] + 1))
        depths = np.sort(rng.uniform(*DEPTH_RANGE, size=k))[::-1]  # far first: near items paint over them
        for d in depths:
            pool_images, pool_classes = pools[int(rng.integers(len(pools)))]
            pick = int(rng.integers(len(pool_images)))
            side = max(4, round(size * rng.uniform(*SCALE_RANGE)))
            item = F.interpolate(
                pool_images[pick].float()[None, None], size=(side, side), mode="bilinear", antialias=True
            )[0, 0]
            top, left = (int(v) for v in rng.integers(-side // 4, size - 3 * side // 4, size=2))
            y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + side, size), min(left + side, size)
            patch = item[y0 - top : y1 - top, x0 - left : x1 - left]
            mask = patch > ITEM_THRESHOLD
            canvas[y0:y1, x0:x1][mask] = patch[mask]
            semseg[y0:y1, x0:x1][mask] = float(pool_classes[pick])
            depth[y0:y1, x0:x1][mask] = float(d)
        height = smooth_height((BACKGROUND_DEPTH - depth) + RELIEF * canvas / 255.0)
        images[n] = canvas.round().clamp(0, 255).to(torch.uint8)
        targets[n, TARGET_CHANNELS["semseg"]] = semseg
        targets[n, TARGET_CHANNELS["depth"]] = depth
        targets[n, TARGET_CHANNELS["normals"]] = normals_of(height * HEIGHT_SCALE * size)
    return Scenes(images, targets)
