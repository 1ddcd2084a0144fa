"""Shared + domain-specific LoRAs, optionally in separate subspaces of W (seed 000; spec
``specs/shared_specific.md``).

``constraint="subspace"`` confines the shared ``B`` to the column space of W (first ``k`` left
singular vectors) and every domain ``B`` to the rest (the left null space when ``k`` is the numerical
rank), so the two branches' outputs are orthogonal for any input.  A domain rank larger than a
layer's left null space is an error naming the layer and both dimensions (square full-rank layers
such as ``attn.proj`` have none unless ``k`` truncates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..core.inject import GroupSpec, OutputSubspaceSpec
from .registry import AdapterPlan, MethodConfig, register
from .schedules import PlacementName, placed_rank


@dataclass
class SharedSpecificConfig(MethodConfig):
    """Ranks and where the LoRAs sit.

    * ``rank`` (shared) / ``domain_rank`` (each domain; None = ``rank``): an int, or an explicit
      per-block list (0 = absent there; blocks counted across Swin stages).  0 drops that kind
      entirely ("shared only" / "domain only" rows).
    * ``placement`` (domain LoRAs) and ``placement_shared`` (shared LoRA), each ``uniform``,
      ``upper_heavy`` (upper half of the blocks only) or ``lower_heavy`` (the mirror).

      **Default reading of "upper-heavy"** (the paper does not define it): ``placement: upper_heavy``
      moves only the *domain* LoRAs to the upper half and keeps the shared LoRA in every block, as
      the spec reads it.  Why: features grow domain-specific with depth (lower layers transfer,
      upper layers specialise), so private capacity belongs high up, while the shared LoRA — the
      path through which domains help each other — should keep reaching every block; it also makes
      the uniform and upper-heavy rows differ in the domain branches only.  The other reading, the
      whole adapter stack in the upper half, is one setting away: ``placement_shared: upper_heavy``.
    * ``k``: column-space size (None = numerical rank, int, or an energy fraction in (0, 1]).
    * ``form``: ``coordinates`` trains ``C`` with ``B = U C`` (fewer parameters); ``projection``
      trains a full ``B`` and projects it in the forward pass (the paper's parameter count).
    """

    target_modules: list[str] | str = field(default_factory=lambda: ["attn.qkv"])
    rank: int | list[int] = 8
    domain_rank: int | list[int] | None = None
    alpha: float | None = None
    dropout: float = 0.0
    constraint: str = "none"
    form: str = "projection"
    k: int | float | None = None
    placement: PlacementName = "uniform"
    placement_shared: PlacementName = "uniform"

    min_rank: ClassVar[int] = 0  # rank 0 drops the shared LoRA ("domain only" rows)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.constraint not in ("none", "subspace"):
            raise ValueError(f"config key 'constraint' must be 'none' or 'subspace', got {self.constraint!r}")
        if self.form not in ("coordinates", "projection"):
            raise ValueError(f"config key 'form' must be 'coordinates' or 'projection', got {self.form!r}")
        shared = [self.rank] if isinstance(self.rank, int) else list(self.rank)
        domain = [self.domain_ranks] if isinstance(self.domain_ranks, int) else list(self.domain_ranks)
        if not any(shared) and not any(domain):
            raise ValueError("config keys 'rank' and 'domain_rank' are both 0 everywhere: nothing to adapt")
        placed_rank(self.rank, self.placement_shared, "placement_shared")  # conflicts fail at config time
        placed_rank(self.domain_ranks, self.placement, "placement")

    @property
    def domain_ranks(self) -> int | list[int]:
        return self.rank if self.domain_rank is None else self.domain_rank


@register("shared_specific", SharedSpecificConfig)
def shared_specific(cfg: SharedSpecificConfig) -> AdapterPlan:
    """One shared LoRA plus one LoRA per domain on every adapted layer."""
    subspace = cfg.constraint == "subspace"
    shared = GroupSpec(
        "shared",
        "always",
        rank=placed_rank(cfg.rank, cfg.placement_shared, "placement_shared"),
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        output_subspace=OutputSubspaceSpec("column", cfg.k, cfg.form) if subspace else None,
    )
    domain = GroupSpec(
        "domain",
        "task",
        n=len(cfg.tasks),
        rank=placed_rank(cfg.domain_ranks, cfg.placement, "placement"),
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        output_subspace=OutputSubspaceSpec("null", cfg.k, cfg.form) if subspace else None,
    )
    return AdapterPlan([shared, domain], cfg.target_modules, cfg.blocks, cfg.modules_to_save)
