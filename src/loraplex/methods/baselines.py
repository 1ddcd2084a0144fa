"""The baselines every paper compares with, as plain compositions of core groups."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.inject import GroupSpec
from .registry import AdapterPlan, MethodConfig, register


@dataclass
class LoRAConfig(MethodConfig):
    """Rank ``rank`` on every target; ``alpha`` defaults to ``rank`` (PEFT scaling ``alpha / r = 1``)."""

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0


@dataclass
class LoRAPerTaskConfig(LoRAConfig):
    pass


@dataclass
class LinearProbeConfig(MethodConfig):
    pass


@dataclass
class FullFinetuneConfig(MethodConfig):
    pass


@register("lora", LoRAConfig)
def lora(cfg: LoRAConfig) -> AdapterPlan:
    """One LoRA shared by every task (each task keeps its own head)."""
    group = GroupSpec("shared", "always", rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
    return AdapterPlan([group], cfg.target_modules, cfg.blocks, cfg.modules_to_save)


@register("lora_per_task", LoRAPerTaskConfig)
def lora_per_task(cfg: LoRAPerTaskConfig) -> AdapterPlan:
    """One private LoRA per task, nothing shared but the frozen backbone."""
    group = GroupSpec("task", "task", n=len(cfg.tasks), rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout)
    return AdapterPlan([group], cfg.target_modules, cfg.blocks, cfg.modules_to_save)


@register("linear_probe", LinearProbeConfig)
def linear_probe(cfg: LinearProbeConfig) -> AdapterPlan:
    """Frozen backbone, trained heads only."""
    return AdapterPlan([], cfg.target_modules, cfg.blocks, cfg.modules_to_save)


@register("full_finetune", FullFinetuneConfig)
def full_finetune(cfg: FullFinetuneConfig) -> AdapterPlan:
    """Every backbone parameter trained (saved whole in the adapter file)."""
    return AdapterPlan([], cfg.target_modules, cfg.blocks, modules_to_save=r".*")
