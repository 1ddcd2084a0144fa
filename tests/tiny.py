"""Tiny timm backbones (pretrained=False) and helpers shared by the test suite."""

from __future__ import annotations

import timm
import torch
from torch import nn

import loraplex as lp

TASKS = ["fashion", "mnist", "digits"]
HEADS = {"fashion": 10, "mnist": 7, "digits": 5}


def _tiny(arch: str, seed: int, num_classes: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    model.reset_classifier(num_classes)  # after creation, so the body's weights never depend on it
    return model.eval()


def tiny_vit(seed: int = 0, num_classes: int = 0) -> nn.Module:
    return _tiny(
        "vit_tiny_patch16_224", seed, num_classes, img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3
    )


def tiny_swin(seed: int = 0, num_classes: int = 0) -> nn.Module:
    return _tiny(
        "swin_tiny_patch4_window7_224",
        seed,
        num_classes,
        img_size=32,
        window_size=4,
        embed_dim=24,
        depths=(2, 2),
        num_heads=(2, 4),
    )


BACKBONES = {"vit": tiny_vit, "swin": tiny_swin}


def randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter, bank and head tensor random values, so deltas are far from zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".groups." in name or name.startswith(("banks.", "heads.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def images(batch: int = 6, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(method: str, kind: str = "vit", seed: int = 0, randomize: bool = True, **kw) -> lp.AdaptedModel:
    cfg = lp.make_config(method, tasks=TASKS, **kw)
    model = lp.wrap(BACKBONES[kind](seed), cfg, heads=HEADS)
    if randomize:
        randomize_adapters(model)
    return model.eval()
