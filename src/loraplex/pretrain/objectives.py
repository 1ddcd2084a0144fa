"""Pre-training objectives for offline backbones, as pieces a generic training loop can call.

Every objective is an ``nn.Module`` (it owns its heads/projectors, whose parameters the loop must add
to the optimizer) called as ``loss = objective(model, batch)``.  A batch is a dict with ``"images"``
(uint8 ``[B, H, W]`` grey or ``[B, H, W, C]``, any size: augmentation crops and resizes) and, for the
supervised objective, ``"labels"`` (int64 ``[B]``).  The model is any timm backbone with
``forward_features`` / ``forward_head`` (ViT and Swin).

Augmentation runs batched in torch (one ``grid_sample`` per batch), because per-image PIL transforms
would cost more than the forward pass of a small ViT on a CPU.  Random inversion matters: clip art is
dark-on-light, MNIST and Fashion-MNIST are light-on-dark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Augment",
    "MaskedImageObjective",
    "MultiObjective",
    "SimCLRObjective",
    "SupervisedObjective",
    "pooled_features",
    "to_float",
]

MEAN, STD = 0.5, 0.5  # inputs are mapped to [-1, 1]; fine-tuning must normalise the same way


def to_float(images: Tensor, channels: int = 1) -> Tensor:
    """uint8 ``[B, H, W]`` / ``[B, H, W, C]`` -> float ``[B, channels, H, W]`` in [0, 1].

    Grey is repeated to ``channels``; RGB is averaged to grey when ``channels == 1``.
    """
    x = images.float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        x = x.mean(1, keepdim=True).expand(-1, channels, -1, -1)
    return x.contiguous()


def normalize(x: Tensor) -> Tensor:
    """[0, 1] -> the backbone's input range."""
    return (x - MEAN) / STD


@dataclass
class Augment:
    """Batched random-resized-crop + flips + rotation + inversion + contrast, output ``[B, C, size, size]``.

    ``scale`` is the crop's area fraction, ``ratio`` its aspect range; a 3x3 box blur on the source
    first stops thin fractal lines from aliasing away when a 64 px image is sampled down to 32.
    """

    size: int = 32
    channels: int = 1
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
        return normalize(x)


def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """The backbone's pooled pre-logits features (CLS token for a timm ViT, average for Swin)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def feature_dim(model: nn.Module) -> int:
    """Width of :func:`pooled_features` (timm's ``num_features``)."""
    return int(model.num_features)


class SupervisedObjective(nn.Module):
    """Cross-entropy with label smoothing through a linear head on pooled features."""

    def __init__(self, dim: int, n_classes: int, augment: Augment | None = None, label_smoothing: float = 0.1):
        super().__init__()
        self.head = nn.Linear(dim, n_classes)
        self.augment = augment or Augment()
        self.label_smoothing = label_smoothing
        self.last_accuracy = float("nan")

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        logits = self.head(pooled_features(model, self.augment(batch["images"])))
        labels = batch["labels"]
        with torch.no_grad():
            self.last_accuracy = (logits.argmax(1) == labels).float().mean().item()
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


class SimCLRObjective(nn.Module):
    """NT-Xent contrastive loss between two augmented views of each image (SimCLR, Chen et al. 2020).

    Needs no labels, so it can use any unlabelled source; the projector is discarded after training.
    """

    def __init__(self, dim: int, augment: Augment | None = None, proj_dim: int = 128, temperature: float = 0.2):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj_dim))
        self.augment = augment or Augment(scale=(0.2, 1.0))
        self.temperature = temperature
        self.last_accuracy = float("nan")

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        images = batch["images"]
        b = images.shape[0]
        views = torch.cat([self.augment(images), self.augment(images)])
        z = F.normalize(self.projector(pooled_features(model, views)), dim=1)
        sim = z @ z.t() / self.temperature
        sim.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(sim.device)
        with torch.no_grad():
            self.last_accuracy = (sim.argmax(1) == target).float().mean().item()
        return F.cross_entropy(sim, target)


class MaskedImageObjective(nn.Module):
    """SimMIM-style masked image modelling (Xie et al. 2022) for timm ViT and Swin.

    A forward hook on ``model.patch_embed`` replaces the embeddings of masked patches with a learned
    mask token (so no model code changes and Swin works too); a linear decoder maps each output token
    back to its pixels, and the loss is L1 on masked pixels only.  ``mask_patch`` (pixels) is the
    masking granularity, ``ratio`` the fraction masked.
    """

    def __init__(self, model: nn.Module, augment: Augment | None = None, mask_patch: int = 8, ratio: float = 0.5):
        super().__init__()
        self.augment = augment or Augment(scale=(0.5, 1.0), invert=0.5)
        self.mask_patch, self.ratio = mask_patch, ratio
        self.mask_token = nn.Parameter(torch.zeros(int(model.patch_embed.proj.out_channels)))
        nn.init.normal_(self.mask_token, std=0.02)
        self.embed_patch = int(model.patch_embed.patch_size[0])
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self._mask: Tensor | None = None
        c, size = self.augment.channels, self.augment.size
        with torch.no_grad():  # one dry run gives the output token grid and width
            grid = self._token_grid(model.forward_features(torch.zeros(1, c, size, size)), size, size)
        self.pixels = size // grid.shape[1]
        self.decoder = nn.Linear(grid.shape[-1], self.pixels**2 * c)
        self._handle = model.patch_embed.register_forward_hook(self._hook)

    def remove_hook(self) -> None:
        """Detach from the backbone after pre-training (the hook is a no-op outside this objective)."""
        self._handle.remove()

    def _token_grid(self, feats: Tensor, h: int, w: int) -> Tensor:
        """Output tokens as ``[B, gh, gw, D]`` (drop a ViT's prefix tokens; Swin is already NHWC)."""
        if feats.dim() == 3:
            gh, gw = h // self.embed_patch, w // self.embed_patch
            feats = feats[:, self.num_prefix :].reshape(feats.shape[0], gh, gw, -1)
        return feats

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
        if self._mask is None:
            return None
        m = self._mask  # [B, gh, gw] at patch-embed resolution
        tok = self.mask_token.to(out.dtype)
        if out.dim() == 4:  # Swin: NHWC
            return torch.where(m[..., None], tok, out)
        return torch.where(m.flatten(1)[..., None], tok, out)  # ViT: [B, N, D]

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x = self.augment(batch["images"])
        b, c, h, w = x.shape
        coarse = torch.rand(b, h // self.mask_patch, w // self.mask_patch, device=x.device)
        k = max(1, round(self.ratio * coarse[0].numel()))
        thresh = coarse.flatten(1).kthvalue(k, dim=1).values[:, None, None]
        coarse_mask = coarse <= thresh
        rep = self.mask_patch // self.embed_patch
        self._mask = coarse_mask.repeat_interleave(rep, 1).repeat_interleave(rep, 2)
        try:
            feats = model.forward_features(x)
        finally:
            self._mask = None
        feats = self._token_grid(feats, h, w)
        gh, gw, px = feats.shape[1], feats.shape[2], self.pixels
        pred = self.decoder(feats).reshape(b, gh, gw, c, px, px).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
        pix_mask = coarse_mask.repeat_interleave(self.mask_patch, 1).repeat_interleave(self.mask_patch, 2)
        pix_mask = pix_mask[:, None].expand_as(x).float()
        return (F.l1_loss(pred, x, reduction="none") * pix_mask).sum() / pix_mask.sum().clamp(min=1)


class MultiObjective(nn.Module):
    """Weighted sum of named objectives; the batch is a dict of sub-batches keyed by the same names."""

    def __init__(self, objectives: dict[str, nn.Module], weights: dict[str, float] | None = None):
        super().__init__()
        self.objectives = nn.ModuleDict(objectives)
        self.weights = weights or {}
        self.last_losses: dict[str, float] = {}

    def forward(self, model: nn.Module, batch: dict[str, dict[str, Tensor]]) -> Tensor:
        total: Tensor | None = None
        for name, obj in self.objectives.items():
            loss = obj(model, batch[name]) * self.weights.get(name, 1.0)
            self.last_losses[name] = float(loss.detach())
            total = loss if total is None else total + loss
        assert total is not None, "MultiObjective needs at least one objective"
        return total
