"""Placement of LoRAs over depth: named schedules resolved once the backbone's depth is known.

A plan is made from a config before any backbone exists, so a named placement cannot be a per-block
list yet; :class:`Placement` and :class:`StageLast` are :data:`~loraplex.core.inject.RankSchedule` objects that
the engine calls with the backbone's block layout (blocks counted across Swin stages) at injection time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..core.inject import BlockLayout, RankSchedule, Site

PlacementName = Literal["uniform", "upper_heavy", "lower_heavy"]
PLACEMENTS: tuple[str, ...] = ("uniform", "upper_heavy", "lower_heavy")


@dataclass(frozen=True)
class Placement:
    """``rank`` in the upper or lower half of the blocks, 0 elsewhere.  A half is ``ceil(n / 2)``
    blocks, so an odd depth puts its middle block in both halves and one block is never left empty."""

    name: PlacementName
    rank: int

    def __call__(self, layout: BlockLayout) -> list[int]:
        num_blocks = layout.count
        half = (num_blocks + 1) // 2
        if self.name == "upper_heavy":
            return [0] * (num_blocks - half) + [self.rank] * half
        if self.name == "lower_heavy":
            return [self.rank] * half + [0] * (num_blocks - half)
        return [self.rank] * num_blocks


@dataclass(frozen=True)
class StageLast:
    """``rank`` in the last block of each stage (MTLoRA's task-specific blocks), 0 elsewhere."""

    rank: int

    def __call__(self, layout: BlockLayout) -> list[int]:
        ends = {stage[-1] for stage in layout.stages}
        return [self.rank if block in ends else 0 for block in range(layout.count)]


def placed_rank(rank: int | Sequence[int], placement: str, key: str) -> int | list[int] | RankSchedule:
    """The rank a group gets: an explicit per-block list as given, an int spread by ``placement``.

    ``uniform`` keeps the plain int, which also adapts target layers outside any ``blocks`` container."""
    if placement not in PLACEMENTS:
        raise ValueError(f"config key {key!r} must be one of {list(PLACEMENTS)}, got {placement!r}")
    if not isinstance(rank, int):
        if placement != "uniform":
            raise ValueError(
                f"config key {key!r} is {placement!r} but the rank is an explicit per-block list: give one or the other"
            )
        return [int(r) for r in rank]
    return rank if placement == "uniform" else Placement(placement, rank)  # type: ignore[arg-type]


@dataclass(frozen=True)
class StagePlacement:
    """A :data:`~loraplex.core.inject.SitePlacement` by stage, as MoLA places its experts on a ResNet.

    ``stages`` are 0-based (a timm ResNet's ``layer1`` is stage 0; a ViT has one stage, a Swin one per
    ``layers.<s>``) with one rank each in ``ranks``; ``stages=None`` puts ``rank`` (an int or a per-block
    list) in every block instead.  Layers outside every block (a CNN's stem) get ``stem``; downsampling
    layers between stages (ResNet projection shortcuts, Swin patch merging) get their stage's rank only
    with ``downsample``."""

    rank: int | tuple[int, ...] = 0
    stages: tuple[int, ...] | None = None
    ranks: tuple[int, ...] = ()
    stem: int = 0
    downsample: bool = False

    def __call__(self, site: Site, layout: BlockLayout) -> int:
        if site.downsample and not self.downsample:
            return 0
        if site.stage is None:
            return self.stem
        if self.stages is None:
            if site.block is None:  # a downsampling layer outside the blocks (Swin's patch merging)
                return self.rank if isinstance(self.rank, int) else 0
            return self.rank if isinstance(self.rank, int) else _per_block(self.rank, site, layout)
        if max(self.stages) >= len(layout.stages):
            raise ValueError(
                f"method.stages names stage {max(self.stages)}, but this backbone has {len(layout.stages)} stage(s) "
                f"(0–{len(layout.stages) - 1}; a ResNet's layer1 is stage 0)"
            )
        return dict(zip(self.stages, self.ranks, strict=True)).get(site.stage, 0)


def _per_block(ranks: Sequence[int], site: Site, layout: BlockLayout) -> int:
    if len(ranks) != layout.count:
        raise ValueError(f"method.rank lists {len(ranks)} per-block ranks, but this backbone has {layout.count} blocks")
    return ranks[site.block]
