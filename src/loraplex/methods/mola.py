"""MoLA (Zhou et al., ICML 2024; spec ``specs/mola.md``): a mixture of LoRA experts for heterogeneous data.

* ``mola_grad`` — E = number of tasks; each sample's task id picks its expert (a ``task``-routed group), so
  each task's loss updates only its own expert plus the shared weights.
* ``mola_router`` — E experts (default: one per task) gated by **one** router for the whole network that
  reads the raw image (:mod:`loraplex.core.routers`): dense softmax gates (or hard top-1 with a
  straight-through estimator, ``gate: top1``), the same gate vector in every adapted layer.  The **TwD**
  loss projects the router logits to ``twd_dim`` dimensions, L2-normalises them and applies a supervised
  contrastive loss with the task id as label at temperature ``temperature``, weighted ``twd``.

Both: experts on the linear layers of a transformer or the convolutions of a CNN (conv LoRA in loralib's
format, :mod:`loraplex.core.conv`), placed per stage (``stages`` + ``ranks``, 0-based: a ResNet's
``layer1`` is stage 0) or per block (``rank``), with ``stem_rank`` on the stem and, with ``downsample``,
the projection shortcuts; scale ``alpha / r`` with ``alpha = 16``.  The **backbone is trained** (the
paper's setting); ``freeze_backbone: true`` trains only experts, router and heads.  Heads are chosen by the
task id in both variants.  Loss: the plain sum over the batch's tasks of each task's mean loss.

Not reproduced from the reference code (its known defects): the task-LoRA path that added ``B A`` into the
conv weight in place on every forward (here ``W + s B A`` is built functionally), and two optimisers
stepping every parameter (here the loop's one AdamW trains everything).  The checkpoint is selected on a
validation split carved from the training data, and final numbers are reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..core.inject import GroupSpec
from ..core.model import MixedOutput
from ..core.routers import ROUTER_BODIES, make_router
from .registry import DEFAULT_TARGETS, AdapterPlan, MethodConfig, register
from .schedules import StagePlacement

CNN_TARGETS = ("conv1", "conv2", "conv3", "downsample.0")  # timm ResNet convolutions (stem, blocks, shortcuts)
GATES = ("softmax", "top1")


@dataclass
class MoLAConfig(MethodConfig):
    """Where the experts sit and how they are trained (see the module docstring)."""

    target_modules: list[str] | str = field(default_factory=lambda: [*DEFAULT_TARGETS, *CNN_TARGETS])
    experts: int | None = None
    rank: int | list[int] = 8
    stages: list[int] | None = None
    ranks: list[int] | None = None
    stem_rank: int = 0
    downsample: bool = False
    alpha: float = 16.0
    freeze_backbone: bool = False

    min_rank: ClassVar[int] = 0  # per-block lists may leave blocks out

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stages is not None:
            if not self.stages or any(not isinstance(s, int) or s < 0 for s in self.stages):
                raise ValueError(f"config key 'stages' must list stage indices ≥ 0, got {self.stages!r}")
            if self.ranks is None or len(self.ranks) != len(self.stages):
                raise ValueError(f"config key 'ranks' must give one rank per stage of 'stages' {self.stages}")
            if any(not isinstance(r, int) or r < 1 for r in self.ranks):
                raise ValueError(f"config key 'ranks' must hold ints ≥ 1, got {self.ranks!r}")
        elif self.ranks is not None:
            raise ValueError("config key 'ranks' needs 'stages' (which stages the ranks are for)")
        if self.stem_rank < 0:
            raise ValueError(f"config key 'stem_rank' must be ≥ 0, got {self.stem_rank}")

    @property
    def placement(self) -> StagePlacement:
        rank = self.rank if isinstance(self.rank, int) else tuple(self.rank)
        stages = None if self.stages is None else tuple(self.stages)
        return StagePlacement(rank, stages, tuple(self.ranks or ()), self.stem_rank, self.downsample)

    def trained(self) -> str | list[str]:
        """``modules_to_save``: the whole backbone (the paper's setting) unless it is frozen."""
        return list(self.modules_to_save) if self.freeze_backbone else r".*"


@dataclass
class MoLAGradConfig(MoLAConfig):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.experts is not None and self.experts != len(self.tasks):
            raise ValueError(
                f"config key 'experts' is {self.experts}, but mola_grad has one expert per task: "
                f"{len(self.tasks)} tasks {self.tasks}"
            )


@dataclass
class MoLARouterConfig(MoLAConfig):
    """``router``: ``resnet20`` (the paper's, on the raw image) or ``patch`` (the backbone's patch embedding,
    for transformers); ``gate``: ``softmax`` or ``top1``; ``twd``: the TwD weight (0 turns it off)."""

    router: str = "resnet20"
    gate: str = "softmax"
    twd: float = 0.1
    twd_dim: int = 32
    temperature: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.experts is not None and self.experts < 1:
            raise ValueError(f"config key 'experts' must be ≥ 1, got {self.experts}")
        if self.router not in ROUTER_BODIES:
            raise ValueError(f"config key 'router' must be one of {sorted(ROUTER_BODIES)}, got {self.router!r}")
        if self.gate not in GATES:
            raise ValueError(f"config key 'gate' must be one of {list(GATES)}, got {self.gate!r}")
        if self.twd < 0 or self.twd_dim < 1 or self.temperature <= 0:
            raise ValueError("config keys 'twd' ≥ 0, 'twd_dim' ≥ 1 and 'temperature' > 0 are required")

    @property
    def num_experts(self) -> int:
        return self.experts or len(self.tasks)


def task_sum(out: MixedOutput, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """MoLA's loss: the sum over the batch's tasks of each task's mean loss (``MixedOutput.loss``)."""
    return out.loss(labels, smoothing)


def twd_loss(embedding: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Supervised contrastive loss over L2-normalised embeddings, the task id as label: for each anchor ``i`` and
    positive ``j ≠ i`` with the same label, ``−log(exp(z_i·z_j/τ) / Σ_{k≠i} exp(z_i·z_k/τ))``, averaged over all
    positive pairs (0 when the batch has none).  Masks only: no host reads."""
    sim = embedding @ embedding.T / temperature
    self_mask = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    log_prob = sim - torch.logsumexp(sim.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)
    positive = (labels.unsqueeze(0) == labels.unsqueeze(1)) & ~self_mask
    return -(log_prob * positive).sum() / positive.sum().clamp(min=1)


def grad_objective(cfg: MoLAGradConfig, out: MixedOutput, labels: torch.Tensor, smoothing: float):
    return task_sum(out, labels, smoothing), {}


def router_objective(cfg: MoLARouterConfig, out: MixedOutput, labels: torch.Tensor, smoothing: float):
    loss = task_sum(out, labels, smoothing)
    if not cfg.twd:
        return loss, {}
    twd = twd_loss(out.router_embedding, out.task_ids, cfg.temperature)
    return loss + cfg.twd * twd, {"twd": twd.detach()}


@register("mola_grad", MoLAGradConfig, objective=grad_objective)
def mola_grad(cfg: MoLAGradConfig) -> AdapterPlan:
    """One LoRA expert per task, picked by each sample's task id; the backbone trained too (MoLA-Grad)."""
    experts = GroupSpec("experts", "task", n=len(cfg.tasks), alpha=cfg.alpha, placement=cfg.placement)
    return AdapterPlan([experts], cfg.target_modules, cfg.blocks, cfg.trained())


@register("mola_router", MoLARouterConfig, objective=router_objective)
def mola_router(cfg: MoLARouterConfig) -> AdapterPlan:
    """E LoRA experts mixed by one global router reading the image, with the TwD loss (MoLA-Router)."""
    experts = GroupSpec("experts", "soft", n=cfg.num_experts, alpha=cfg.alpha, placement=cfg.placement)

    def router(backbone: torch.nn.Module) -> torch.nn.Module:
        embed = cfg.twd_dim if cfg.twd else 0
        return make_router(cfg.router, backbone, cfg.num_experts, hard=cfg.gate == "top1", embed_dim=embed)

    return AdapterPlan([experts], cfg.target_modules, cfg.blocks, cfg.trained(), router=router)
