"""Routers: one network per model that reads the raw input and gates the experts of every adapted layer.

A :class:`Router` wraps a body (input → ``E`` logits) and says how logits become gates: a dense softmax over
all experts (MoLA-Router), or a hard top-1 choice trained with a straight-through estimator (the forward
uses the one-hot arg-max, the backward the softmax's gradient — the reference code's hard variant).  With
``embed_dim`` it also projects the logits to an L2-normalised embedding for a contrastive loss (MoLA's TwD):
the projection runs inside the forward, so DDP sees it used.

Bodies:

* :class:`ResNet20` — MoLA's router: a 3×3 stem with 16 channels, three stages of three basic blocks at
  16 / 32 / 64 channels (stride 2 entering stages 2 and 3), parameter-free shortcuts (subsample and zero-pad
  the channels: He et al.'s option A), global average pooling, a linear map to ``E``.  269,332 parameters
  at ``E = 4``, as the paper's table counts.
* :class:`PatchRouter` — a cheaper router for transformers: the backbone's own patch embedding (run once
  more; not a second copy of its weights), mean-pooled, normalised, a linear map to ``E``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Router(nn.Module):
    def __init__(self, body: nn.Module, experts: int, *, hard: bool = False, embed_dim: int = 0) -> None:
        super().__init__()
        self.body, self.experts, self.hard = body, experts, hard
        self.projection = nn.Linear(experts, embed_dim) if embed_dim else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits [B, E], embedding [B, D] or None)``."""
        logits = self.body(x).float()
        if self.projection is None:
            return logits, None
        return logits, F.normalize(self.projection(logits), dim=1)

    def gates(self, logits: torch.Tensor) -> torch.Tensor:
        soft = logits.float().softmax(dim=1)
        if not self.hard:
            return soft
        hard = F.one_hot(soft.argmax(dim=1), self.experts).to(soft.dtype)
        return hard - soft.detach() + soft  # forward: one-hot; backward: the softmax's gradient


class _BasicBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.stride, self.pad = stride, channels_out - channels_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Option A: no parameters — subsample spatially, zero-pad the new channels (half on each side)."""
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet20(nn.Module):
    def __init__(self, outputs: int, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64), depth: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, channels = [], widths[0]
        for stage, width in enumerate(widths):
            for i in range(depth):
                blocks.append(_BasicBlock(channels, width, 2 if stage and not i else 1))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(channels, outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(y.mean(dim=(2, 3)))


class PatchRouter(nn.Module):
    def __init__(self, backbone: nn.Module, outputs: int) -> None:
        super().__init__()
        embed = getattr(backbone, "patch_embed", None)
        if embed is None:
            raise ValueError(f"router 'patch' reads a patch embedding; {type(backbone).__name__} has no `patch_embed`")
        self._embed = [embed]  # the backbone's module, referenced: not a second copy in the state dict
        width = int(backbone.embed_dim if hasattr(backbone, "embed_dim") else backbone.num_features)
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self._embed[0](x)  # ViT [B, N, C]; Swin [B, H, W, C]
        pooled = tokens.reshape(tokens.shape[0], -1, tokens.shape[-1]).mean(dim=1)
        return self.fc(self.norm(pooled))


ROUTER_BODIES = {"resnet20": lambda backbone, experts: ResNet20(experts), "patch": PatchRouter}
"""Router kinds by name: backbone, number of experts → a body producing the logits."""


def make_router(kind: str, backbone: nn.Module, experts: int, *, hard: bool = False, embed_dim: int = 0) -> Router:
    if kind not in ROUTER_BODIES:
        raise ValueError(f"unknown router {kind!r}; choose one of {sorted(ROUTER_BODIES)}")
    return Router(ROUTER_BODIES[kind](backbone, experts), experts, hard=hard, embed_dim=embed_dim)
