"""InfLoRA (Liang & Li, CVPR 2024): interference-free low-rank adaptation for continual learning.

Per task ``t`` a new LoRA branch on the key and value rows of each attention's fused ``qkv`` (rank 10): before the
task its down-projection ``A_t`` is fixed from the task's own layer inputs with the memory subspace removed — the
top left singular vectors of ``(I − M Mᵀ) C_t`` (``C_t``: the task's input covariance), scaled by ``1/√3`` as the
reference code does — and only ``B_t`` (zero at the start) is trained, so the update ``B_t A_t`` reads only input
directions outside ``M``; old tasks, whose inputs lie (up to the memory threshold) in ``M``, see no change.  After
the task the memory grows (DualGPM's rule on the covariance, :class:`~loraplex.core.subspace.FeatureMemory` with
``energy="covariance"``) with an energy threshold annealed across tasks, ``ε_t = ε_0 + (ε_1 − ε_0)·t/T``
(``threshold_start`` / ``threshold_end``; the reference's ``lamb`` / ``lame``).

Every learned branch stays, frozen, and fires on every input: the group is one always-on stack of ``T`` branches
(those of tasks not yet learned are zero), so inference is one forward pass — at backbone speed once merged — with
no task id.  The classifier is one head per task, side by side over every class seen; a task trains only its own
head, on its own classes (the reference's masking of earlier classes).  ``ΔW`` is ``B A`` unscaled (the
reference adds the branches' products as they are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..core.inject import GroupSpec
from ..core.model import AdaptedModel
from ..core.subspace import FeatureMemory
from .memory import MemoryConfig, MemoryContinual
from .registry import AdapterPlan, Inputs, register

KV_TARGETS = ("attn.qkv.k", "attn.qkv.v")
A_SCALE = 1.0 / math.sqrt(3.0)  # the reference's scale of the fixed down-projection


@dataclass
class InfLoRAConfig(MemoryConfig):
    """``rank`` per task and sub-module; ``memory_tokens``: every token of a layer's input (the reference) or the
    [CLS] token only."""

    target_modules: list[str] | str = field(default_factory=lambda: list(KV_TARGETS))
    rank: int = 10
    memory_tokens: Literal["all", "cls"] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_tokens not in ("all", "cls"):
            raise ValueError(f"config key 'memory_tokens' must be 'all' or 'cls', got {self.memory_tokens!r}")


class InfLoRAContinual(MemoryContinual):
    """The memory per adapted layer; ``A_t`` set before task ``t``, the memory grown after it."""

    config: InfLoRAConfig

    def new_memory(self, dim: int) -> FeatureMemory:
        return FeatureMemory(dim, cls_only=self.config.memory_tokens == "cls", energy="covariance")

    @torch.no_grad()
    def _observe(self, model: AdaptedModel, inputs: Inputs) -> dict[str, FeatureMemory]:
        memories = {name: self.memory(name, layer.in_features) for name, layer in model.adapted_layers().items()}
        with model.recording(memories):
            for x in inputs():
                model.forward_features(x)
        return memories

    @torch.no_grad()
    def before_task(self, model: AdaptedModel, task: int, inputs: Inputs) -> None:
        memories = self._observe(model, inputs)
        layers = model.adapted_layers()
        for name, memory in memories.items():
            try:
                directions = memory.residual_directions(self.config.rank).T  # [r, in]
            except ValueError as err:
                raise ValueError(f"{name}, task {task}: {err}") from err
            memory.reset_statistics()
            for group in layers[name].groups.values():
                rows = group.A.shape[1] // self.config.rank  # one copy per sub-module (k and v read the same input)
                group.A[task] = (A_SCALE * directions).repeat(rows, 1).to(group.A)
        super().before_task(model, task, inputs)

    @torch.no_grad()
    def after_task(self, model: AdaptedModel, task: int, inputs: Inputs) -> None:
        super().after_task(model, task, inputs)
        for memory in self._observe(model, inputs).values():
            memory.grow(self.config.threshold(task))


@register("inflora", InfLoRAConfig, continual=InfLoRAContinual)
def inflora(cfg: InfLoRAConfig) -> AdapterPlan:
    """One frozen, always-on branch per task (k and v rows of qkv), A fixed from the task's inputs outside the
    memory, only B trained."""
    group = GroupSpec("tasks", "always", n=len(cfg.tasks), rank=cfg.rank, scale=1.0, init="zeros", train_A=False)
    return AdapterPlan([group], cfg.target_modules, cfg.blocks, cfg.modules_to_save)
