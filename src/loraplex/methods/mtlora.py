"""MTLoRA (Agiza et al., CVPR 2024; spec ``specs/mtlora.md``): task-agnostic + task-specific LoRA on a Swin
for dense multi-task learning.

* **TA-LoRA** (group ``shared``, always on): rank ``rank`` on ``qkv``, ``proj``, ``fc1``, ``fc2`` of every
  block; a constant ``scale`` (4.0), not α/r; LoRA dropout on the shared input only.
* **TS-LoRA** (group ``task``, one branch per task): rank ``task_rank`` on ``proj``, ``fc1``, ``fc2`` of
  the last block of each stage.  The dataflow of those blocks (frozen matmul once on the shared input,
  task paths without the shared delta, one stream per task, task streams through the stage's patch
  merging) is :class:`~loraplex.models.dense.SwinPyramid`'s, run through the dense heads.
* Also trained, as in the paper: every LayerNorm, the relative-position bias tables, the patch
  embedding and the patch-merging reductions.  ``mtlora_plus`` freezes the reductions and puts a
  TA-LoRA on them instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.inject import GroupSpec
from .registry import DEFAULT_TARGETS, AdapterPlan, MethodConfig, register
from .schedules import StageLast

TRAINED_MODULES = r"patch_embed|.*\.norm\d?|.*\.relative_position_bias_table"  # the non-attention trainables
REDUCTION = "downsample.reduction"
REDUCTION_PATTERN = r".*\.downsample\.reduction"


@dataclass
class MTLoRAConfig(MethodConfig):
    """``rank`` = R (TA-LoRA), ``task_rank`` = r_t (TS-LoRA), ``scale`` = the constant LoRA multiplier."""

    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    task_modules: list[str] = field(default_factory=lambda: ["attn.proj", "mlp.fc1", "mlp.fc2"])
    rank: int = 16
    task_rank: int = 4
    scale: float = 4.0
    dropout: float = 0.05


@dataclass
class MTLoRAPlusConfig(MTLoRAConfig):
    """Same keys as MTLoRA; its own class so that a config names its method."""


def _plan(cfg: MTLoRAConfig, plus: bool) -> AdapterPlan:
    targets = list(cfg.target_modules) if not isinstance(cfg.target_modules, str) else cfg.target_modules
    if plus:
        if isinstance(targets, str):
            raise ValueError("mtlora_plus adds the patch-merging reductions to a list of target_modules, not a regex")
        targets = [*targets, REDUCTION]
    shared = GroupSpec("shared", "always", rank=cfg.rank, scale=cfg.scale, dropout=cfg.dropout, targets=targets)
    task = GroupSpec(
        "task", "task", n=len(cfg.tasks), rank=StageLast(cfg.task_rank), scale=cfg.scale, targets=cfg.task_modules
    )
    trained = [TRAINED_MODULES] if plus else [TRAINED_MODULES, REDUCTION_PATTERN]
    trained += [rf"(.*\.)?{re.escape(name)}" for name in cfg.modules_to_save]  # suffixes, as everywhere else
    return AdapterPlan([shared, task], targets, cfg.blocks, "|".join(trained))


@register("mtlora", MTLoRAConfig)
def mtlora(cfg: MTLoRAConfig) -> AdapterPlan:
    """Task-agnostic LoRA everywhere + task-specific LoRA in the last block of each stage (dense, Swin)."""
    return _plan(cfg, plus=False)


@register("mtlora_plus", MTLoRAPlusConfig)
def mtlora_plus(cfg: MTLoRAPlusConfig) -> AdapterPlan:
    """MTLoRA with the patch-merging reductions frozen and adapted by the task-agnostic LoRA."""
    return _plan(cfg, plus=True)
