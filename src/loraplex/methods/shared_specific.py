"""Shared + domain-specific LoRAs, optionally in separate subspaces of W (seed 000; spec
``specs/shared_specific.md``).

``constraint="subspace"`` confines the shared ``B`` to the column space of W (first ``k`` left
singular vectors) and every domain ``B`` to the rest (the left null space when ``k`` is the numerical
rank), so the two branches' outputs are orthogonal for any input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.inject import GroupSpec, OutputSubspaceSpec
from .registry import AdapterPlan, MethodConfig, register


@dataclass
class SharedSpecificConfig(MethodConfig):
    """``rank``/``domain_rank``: an int or a per-block list (0 = absent there).  ``k``: column-space
    size (None = numerical rank, int, or an energy fraction in (0, 1]).  ``form``: ``coordinates``
    trains ``C`` with ``B = U C`` (fewer parameters); ``projection`` trains a full ``B`` and projects
    it in the forward pass (the paper's parameter count)."""

    target_modules: list[str] | str = field(default_factory=lambda: ["attn.qkv"])
    rank: int | list[int] = 8
    domain_rank: int | list[int] | None = None
    alpha: float | None = None
    dropout: float = 0.0
    constraint: str = "none"
    form: str = "projection"
    k: int | float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.constraint not in ("none", "subspace"):
            raise ValueError(f"config key 'constraint' must be 'none' or 'subspace', got {self.constraint!r}")
        if self.form not in ("coordinates", "projection"):
            raise ValueError(f"config key 'form' must be 'coordinates' or 'projection', got {self.form!r}")


@register("shared_specific", SharedSpecificConfig)
def shared_specific(cfg: SharedSpecificConfig) -> AdapterPlan:
    """One shared LoRA plus one LoRA per domain on every adapted layer."""
    subspace = cfg.constraint == "subspace"
    shared = GroupSpec(
        "shared",
        "always",
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        output_subspace=OutputSubspaceSpec("column", cfg.k, cfg.form) if subspace else None,
    )
    domain = GroupSpec(
        "domain",
        "task",
        n=len(cfg.tasks),
        rank=cfg.rank if cfg.domain_rank is None else cfg.domain_rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        output_subspace=OutputSubspaceSpec("null", cfg.k, cfg.form) if subspace else None,
    )
    return AdapterPlan([shared, domain], cfg.target_modules, cfg.blocks, cfg.modules_to_save)
