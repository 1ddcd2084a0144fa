"""DualLoRA (Chen et al., 2024, arXiv 2411.00623; "Replay-Free Continual Low-Rank Adaptation with Dynamic Memory"
from v3): an orthogonal LoRA for stability, a residual LoRA per task for plasticity, a dynamic memory at inference.

No public code exists; the mechanism is the paper's abstract plus the GPM / InfLoRA line it builds on, and the
points the spec leaves open are decided here (each marked *choice*).  Per adapted layer a feature memory
(:class:`~loraplex.core.subspace.FeatureMemory`, GPM's energy rule) holds ``M = [U_0 … U_t]``, ``U_t`` the input
directions task ``t`` added.

* **Memory growth** (*choice*: before the task): the residual LoRA of task ``t`` must live in ``U_t`` while it
  trains, so ``U_t`` is taken from task ``t``'s inputs under the model learned so far, before training, with the
  energy threshold annealed as InfLoRA's (``threshold_start`` → ``threshold_end``).
* **Orthogonal LoRA** — an always-on stack with one branch per task; branch ``t`` (``A_t`` and ``B_t`` trained, the
  others held) reads its input through ``I − M_{t−1} M_{t−1}ᵀ``, so inputs of earlier tasks, which lie in
  ``M_{t−1}`` up to the threshold, see no change (GPM's guarantee, with a trained down-projection where InfLoRA
  fixes it).  Together the branches are the one orthogonal adapter, merged into ``W`` for inference.
* **Residual LoRA** — task-routed, branch ``t``'s ``A`` confined to ``span(U_t)``; it fires alone on task ``t``'s
  samples while the task trains, "without interaction across tasks".
* **Dynamic memory** (inference, no task id): each residual branch is weighed per sample by the relevance of the
  layer's input to its task's bases, ``softmax_t(log(frac_t/μ_t)/τ)`` with ``frac_t = ‖U_tᵀx‖²/‖x‖²`` and ``μ_t``
  the same fraction over task ``t``'s own inputs (*choice*: this normalisation, so a task whose ``U_t`` holds only
  a little energy — the later tasks — is not always outweighed; ``τ = temperature``; the [CLS] token by default,
  as the paper's summaries say).  One forward pass: the gates come from the inputs each layer sees anyway.
* **Task identity and calibration**: the relevance scores averaged over layers predict the task (``p(t|x)``, at the
  same temperature); class-incremental logits are re-weighted toward it: ``logit_c += β log p(t_c|x)``
  (*choice*: soft re-weighting, ``β = calibration``; β → ∞ would be masking, 0 turns it off).

``dynamic_memory: false`` gives every learned task's residual the same weight instead (the ablation that says what
the relevance gates add).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.nn import functional as F

from ..core.branches import LoRAGroup
from ..core.inject import GroupSpec
from ..core.model import AdaptedModel
from ..core.subspace import FeatureMemory, Subspace
from .inflora import KV_TARGETS
from .memory import MemoryConfig, MemoryContinual
from .registry import AdapterPlan, Inputs, register


@dataclass
class DualLoRAConfig(MemoryConfig):
    """``rank`` of each task's orthogonal branch, ``residual_rank`` of its residual branch (the latter is bounded
    by ``dim U_t`` in effect); memory thresholds in (0, 1]; ``temperature`` of the relevance gates; ``calibration``
    the weight β of the task prior on the logits; ``tokens``: what the memory and the relevance read."""

    target_modules: list[str] | str = field(default_factory=lambda: list(KV_TARGETS))
    rank: int = 10
    residual_rank: int = 10
    alpha: float | None = None
    temperature: float = 0.1
    calibration: float = 1.0
    dynamic_memory: bool = True
    tokens: Literal["cls", "all"] = "cls"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"config key 'temperature' must be > 0, got {self.temperature}")
        if self.calibration < 0:
            raise ValueError(f"config key 'calibration' must be ≥ 0, got {self.calibration}")
        if self.residual_rank < 1:
            raise ValueError(f"config key 'residual_rank' must be ≥ 1, got {self.residual_rank}")
        if self.tokens not in ("cls", "all"):
            raise ValueError(f"config key 'tokens' must be 'cls' or 'all', got {self.tokens!r}")


class DualLoRAContinual(MemoryContinual):
    """The memory per layer, grown before each task; the bases of both LoRAs and the relevance norms set from it."""

    config: DualLoRAConfig

    def new_memory(self, dim: int) -> FeatureMemory:
        return FeatureMemory(dim, cls_only=self.config.tokens == "cls")

    @torch.no_grad()
    def _observe(self, model: AdaptedModel, task: int, inputs: Inputs) -> dict[str, FeatureMemory]:
        """Task ``task``'s inputs of every adapted layer, under that task's route, into the memories."""
        layers = model.adapted_layers()
        memories = {name: self.memory(name, layer.in_features) for name, layer in layers.items()}
        with model.recording(memories):
            for x in inputs():
                model.forward_features(x, task=task)
        return memories

    @torch.no_grad()
    def before_task(self, model: AdaptedModel, task: int, inputs: Inputs) -> None:
        """``U_t`` from the task's inputs under the model so far (its residual is still zero): the residual
        branch's bases and its relevance norm; the orthogonal branch gets the memory of the tasks before."""
        layers = model.adapted_layers()
        for name, memory in self._observe(model, task, inputs).items():
            before, covariance = memory.memory, memory.covariance.clone()
            room = memory.dim - before.shape[1]
            if self.config.rank > room:
                raise ValueError(
                    f"{name}, task {task}: the orthogonal LoRA's rank {self.config.rank} does not fit: the memory "
                    f"holds {before.shape[1]} of {memory.dim} input directions, leaving {room}; lower the rank or "
                    "the memory threshold"
                )
            own = memory.grow(self.config.threshold(task)).to(covariance)
            captured = torch.trace(own.T @ covariance @ own) / torch.trace(covariance).clamp_min(1e-30)
            groups = layers[name].groups
            _set_branch_basis(groups["orthogonal"].input_space, self.tasks, task, before)
            _set_branch_basis(groups["residual"].input_space, self.tasks, task, own.float())
            groups["residual"].relevance.norm[task] = float(captured) if own.shape[1] else 0.0
        super().before_task(model, task, inputs)

    @torch.no_grad()
    def after_task(self, model: AdaptedModel, task: int, inputs: Inputs) -> None:
        """The memory takes in what the trained model's inputs of this task add (GPM grows after a task): what later
        tasks' orthogonal branches must leave alone is what this task's inputs are now, not before it trained."""
        super().after_task(model, task, inputs)
        for memory in self._observe(model, task, inputs).values():
            memory.grow(self.config.threshold(task))

    def class_logits(self, model: AdaptedModel, x: torch.Tensor, learned: int) -> torch.Tensor:
        relevances = [g.relevance for g in _residual_groups(model)]
        for relevance in relevances:
            relevance.recording = True
        try:
            logits = super().class_logits(model, x, learned)
            if self.config.calibration > 0:
                scores = torch.stack([r.last.view(x.shape[0], -1, r.last.shape[-1]).mean(1) for r in relevances])
                prior = F.log_softmax(task_scores(scores)[:, : learned + 1] / self.config.temperature, dim=1)
                sizes = [model.head_outputs[model.tasks[t]] for t in range(learned + 1)]
                logits = logits + self.config.calibration * prior.repeat_interleave(torch.tensor(sizes), dim=1)
        finally:
            for relevance in relevances:
                relevance.recording, relevance.last = False, None
        return logits


def _set_branch_basis(space: Subspace, branches: int, branch: int, basis: torch.Tensor) -> None:
    """Set one branch's basis in a stacked per-branch subspace (the others kept; zero columns pad them)."""
    current = space.basis
    bases = [current[i] if current.dim() == 3 else current for i in range(branches)]
    bases[branch] = basis.to(current)
    space.set_basis(bases)


def task_scores(scores: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` task relevance from per-layer scores ``[layers, B, T]``: each task's mean over the layers where it
    has bases (a layer where a task added no direction — e.g. the first block's [CLS] input, the same for every
    image — says nothing about it); ``-inf`` for a task with none."""
    finite = torch.isfinite(scores)
    total = torch.where(finite, scores, torch.zeros_like(scores)).sum(0)
    count = finite.sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("-inf")))


def _residual_groups(model: AdaptedModel) -> list[LoRAGroup]:
    return [g for layer in model.adapted_layers().values() for g in layer.groups.values() if g.relevance is not None]


@register("duallora", DualLoRAConfig, continual=DualLoRAContinual)
def duallora(cfg: DualLoRAConfig) -> AdapterPlan:
    """An orthogonal LoRA (one always-on branch per task, each outside the memory of earlier tasks) and a residual
    LoRA per task inside that task's own input bases, weighed at inference by the input's relevance to them."""
    tasks = len(cfg.tasks)
    orthogonal = GroupSpec("orthogonal", "always", n=tasks, rank=cfg.rank, alpha=cfg.alpha, input_subspace="complement")
    residual = GroupSpec(
        "residual",
        "task",
        n=tasks,
        rank=cfg.residual_rank,
        alpha=cfg.alpha,
        input_subspace="span",
        relevance=cfg.tokens,
        relevance_temperature=cfg.temperature if cfg.dynamic_memory else float("inf"),  # inf: every task alike
    )
    return AdapterPlan([orthogonal, residual], cfg.target_modules, cfg.blocks, cfg.modules_to_save)
