"""Tiny timm backbones (pretrained=False) and helpers shared by the test suite."""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
import yaml
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


def tiny_resnet(seed: int = 0, num_classes: int = 0) -> nn.Module:
    """A timm ResNet-50-style network (bottlenecks, projection shortcuts, four stages) a few thousand weights big."""
    from timm.models.resnet import Bottleneck, ResNet

    torch.manual_seed(seed)
    model = ResNet(
        Bottleneck, layers=(1, 2, 1, 1), channels=(4, 8, 8, 8), stem_width=8, num_classes=0, zero_init_last=False
    )
    model.reset_classifier(num_classes)
    return model.eval()


BACKBONES = {"vit": tiny_vit, "swin": tiny_swin, "resnet": tiny_resnet}


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Give every adapter, bank, router and head tensor random values, so deltas are far from zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".groups." in name or name.startswith(("banks.", "heads.", "router.")):
                p.copy_(torch.randn(p.shape, generator=g) * std)
        for name, b in model.named_buffers():  # fixed down-projections (InfLoRA's A, set from data in a run)
            if ".groups." in name and name.endswith(".A"):
                b.copy_(torch.randn(b.shape, generator=g) * std)


def images(batch: int = 6, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(method: str, kind: str = "vit", seed: int = 0, randomize: bool = True, **kw) -> lp.AdaptedModel:
    cfg = lp.make_config(method, tasks=TASKS, **kw)
    model = lp.wrap(BACKBONES[kind](seed), cfg, heads=HEADS)
    if randomize:  # conv deltas (B A summed over r·k² terms) at the ViT's scale would swamp a ResNet's weights
        randomize_adapters(model, std=0.02 if kind == "resnet" else 0.2)
    return model.eval()


# A tiny run config (two real domains, a 2-block ViT at 16 px) that trains in seconds.
TINY = {
    "backbone": {
        "name": "vit_tiny_patch16_224",
        "img_size": 16,
        "kwargs": {"patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3},
    },
    "method": {"name": "shared_specific", "rank": 2, "target_modules": ["attn.qkv", "mlp.fc1"]},
    "data": {"domains": ["digits", "mnist"], "train_per_domain": 120, "val_per_domain": 40, "test_per_domain": 60},
    "train": {"steps": 12, "batch_size": 16, "warmup_steps": 2, "eval_every": 4, "checkpoint_every": 4, "lr": 3e-3},
    "output": {"tensorboard": False},
}


def tiny_config(tmp_path: Path, **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    for section, values in sections.items():
        raw[section] = values if section == "method" else {**raw[section], **values}
    raw["output"].setdefault("dir", str(tmp_path / "run"))
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
