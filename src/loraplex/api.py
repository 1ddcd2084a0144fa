"""The public entry points: ``wrap``, ``load``, ``load_run``, ``export_peft``, ``count_parameters``, ``configs_dir``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.inject import freeze, inject
from .core.model import AdaptedModel
from .core.routing import RouteContext
from .core.state import (
    AdapterFileError,
    backbone_description,
    check_backbone,
    count_parameters,
    export_peft,
    load_tensors,
    read_config,
)
from .methods import MethodConfig, make_config, method_of
from .models.backbones import package_data_dir
from .models.heads import make_head

__all__ = ["AdapterFileError", "configs_dir", "count_parameters", "export_peft", "load", "load_run", "wrap"]


def _features_only(backbone: nn.Module) -> nn.Module:
    """Drop a timm classifier so ``backbone(x)`` returns pooled features; heads are ours."""
    if getattr(backbone, "num_classes", 0) and hasattr(backbone, "reset_classifier"):
        backbone.reset_classifier(0)
    return backbone


def wrap(
    backbone: nn.Module, config: MethodConfig, heads: dict[str, int], head: dict[str, Any] | None = None
) -> AdaptedModel:
    """Freeze ``backbone``, inject the method's branch groups, attach one head per task with ``heads[t]``
    outputs: linear by default, or as ``head`` describes (:func:`loraplex.models.heads.make_head`; e.g.
    ``{"kind": "dense", "out_size": 448}`` on a :class:`~loraplex.models.dense.SwinPyramid`).

    The backbone is modified in place (its classifier reset, targeted linears replaced).  The model lives
    where the backbone does; a backbone held in bf16 / fp16 keeps its frozen weights so, while everything
    trained (branches, heads, ``modules_to_save``) is fp32."""
    head = dict(head or {"kind": "linear"})
    method = method_of(config)
    if set(heads) != set(config.tasks):
        raise ValueError(f"heads {sorted(heads)} must name exactly the config's tasks {sorted(config.tasks)}")
    plan = method.plan(config)
    backbone = _features_only(backbone)
    info = backbone_description(backbone)
    saved = freeze(backbone, plan.modules_to_save)
    context = RouteContext()
    banks = inject(backbone, plan.targets, plan.groups, context, plan.blocks).banks if plan.groups else {}
    width = getattr(backbone, "num_features", None)
    if width is None:
        raise ValueError(f"{type(backbone).__name__} has no `num_features`; use a timm model or set it")
    head_modules = nn.ModuleList(make_head(head, width, heads[t]) for t in config.tasks)  # by position, never name
    router = plan.router(backbone) if plan.router is not None else None
    model = AdaptedModel(backbone, head_modules, config.tasks, context, banks, config.mixed_strategy, router)
    model.method_name = method.name
    model.method_config = config.to_dict()
    model.backbone_info = info
    model.saved_modules = saved
    model.head_spec = head
    model.head_outputs = {t: int(heads[t]) for t in config.tasks}
    return model.to(_device_of(backbone)).apply(_trainable_in_fp32)


def _device_of(backbone: nn.Module) -> torch.device:
    return next(backbone.parameters(), torch.empty(0)).device


def _trainable_in_fp32(module: nn.Module) -> None:
    """Trained tensors of a low-precision backbone (``modules_to_save``) go to fp32: AdamW in bf16 loses updates."""
    for p in module.parameters(recurse=False):
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def load(directory: str | os.PathLike, backbone: nn.Module, device: str | torch.device | None = None) -> AdaptedModel:
    """Rebuild a saved model on ``backbone`` (on ``device``, default where the backbone is); refuses a backbone
    whose fingerprint differs.  The backbone may be held in bf16 / fp16: the same weights cast are accepted."""
    config = read_config(directory)
    check_backbone(config["backbone"], _features_only(backbone), str(directory))
    cfg = make_config(config["method"], **config["config"])
    model = wrap(backbone, cfg, heads=config["heads"], head=config.get("head"))
    load_tensors(model, directory)
    return model if device is None else model.to(device)


def load_run(run_dir: str | os.PathLike, which: str = "best", device: str | torch.device = "auto") -> AdaptedModel:
    """The model of a run trained by ``loraplex train``, with its ``best`` (on validation; the final ones for a run
    trained without a validation split, ``data.val_per_domain: 0``) or ``final`` adapters.

    The backbone is rebuilt from the run's ``config.yaml`` (zoo entry, timm architecture and checkpoint, or the
    seeded random init the run started from), the adapters are loaded onto it after the fingerprint check, and
    the model is returned in eval mode on ``device`` (``auto``: CUDA when present) with its frozen weights in the
    run's ``backbone.dtype``.  The run's config: ``loraplex.train.runner.read_run_config(run_dir)``.  The CPU
    random state is left as it was."""
    if which not in ("best", "final"):
        raise ValueError(f"which must be 'best' or 'final', got {which!r}")
    from .train.runner import load_run as _load_run  # the run layer (data, training) only when asked for

    with torch.random.fork_rng(devices=[]):  # rebuilding a random-init backbone re-seeds torch
        return _load_run(run_dir, which, device)[1]


def configs_dir() -> Path:
    """The YAML presets shipped with the package (the repository's ``configs/``): ``configs_dir() / "demo.yaml"``."""
    return package_data_dir("configs")
