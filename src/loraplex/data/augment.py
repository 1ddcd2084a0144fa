"""Batched image augmentation for training on uint8 batches (pre-training uses it).

One ``affine_grid``/``grid_sample`` for the whole batch: per-image PIL transforms would cost more
than the forward pass of a small ViT on a CPU.  Random inversion matters: clip art is dark-on-light,
MNIST and Fashion-MNIST are light-on-dark.  Randomness comes from torch's global generator, which the
training loop re-seeds every step, so augmented runs resume exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def to_float(images: Tensor, channels: int) -> Tensor:
    """uint8 ``[B, H, W]`` / ``[B, H, W, C]`` → float ``[B, channels, H, W]`` in [0, 1] (grey repeated,
    RGB averaged to grey for one channel)."""
    x = images.float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return x.contiguous()


@dataclass
class Augment:
    """Batched random-resized-crop + flips + rotation + inversion + contrast, output ``[B, C, size, size]``.

    ``scale`` is the crop's area fraction, ``ratio`` its aspect range; a 3x3 box blur on the source
    first stops thin fractal lines from aliasing away when a 64 px image is sampled down to 32.
    """

    size: int = 32
    channels: int = 3
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rotate: float = 0.0  # max degrees
    invert: float = 0.5
    contrast: float = 0.3  # multiplicative jitter of (x - mean)
    blur: bool = True

    def __call__(self, images: Tensor) -> Tensor:
        x = to_float(images, self.channels)
        b = x.shape[0]
        if self.blur and x.shape[-1] > self.size:
            x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        dev = x.device
        area = torch.empty(b, device=dev).uniform_(*self.scale)
        logr = torch.empty(b, device=dev).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w = (area * logr.exp()).sqrt().clamp(max=1.0)
        h = (area / logr.exp()).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
        sx = torch.where(torch.rand(b, device=dev) < self.hflip, -w, w)
        sy = torch.where(torch.rand(b, device=dev) < self.vflip, -h, h)
        ang = (torch.rand(b, device=dev) * 2 - 1) * math.radians(self.rotate)
        cos, sin = ang.cos(), ang.sin()
        theta = torch.stack([torch.stack([sx * cos, -sy * sin, cx], 1), torch.stack([sx * sin, sy * cos, cy], 1)], 1)
        grid = F.affine_grid(theta, [b, x.shape[1], self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.contrast > 0:
            c = 1 + (torch.rand(b, 1, 1, 1, device=dev) * 2 - 1) * self.contrast
            m = x.mean((1, 2, 3), keepdim=True)
            x = ((x - m) * c + m).clamp(0, 1)
        if self.invert > 0:
            flip = (torch.rand(b, 1, 1, 1, device=dev) < self.invert).float()
            x = flip * (1 - x) + (1 - flip) * x
        return (x - 0.5) / 0.5  # the normalisation of to_tensor_batch
