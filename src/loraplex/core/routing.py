"""Who fires in this forward pass: a :class:`Route`, built once per model forward.

Every :class:`~loraplex.core.layer.AdaptedLinear` of a model holds a reference to the same
:class:`RouteContext`; the model sets ``context.route`` before running the backbone and clears it
afterwards.  Layers therefore never re-derive grouping information: the sort by task, the segment
boundaries and the per-sample index tensors are computed here once and read by every layer.

Layers see inputs whose leading dimension is ``batch * k`` in batch-major order (``k = 1`` for
ViT tokens ``[B, N, C]``; ``k = windows`` for Swin's ``[B * nW, N, C]``; ``k = frames`` for a
frame-wise video wrapper).  They reshape to ``[B, -1, C]`` and use the per-sample route directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

MixedStrategy = Literal["slices", "bmm", "masked"]
MIXED_STRATEGIES: tuple[str, ...] = ("slices", "bmm", "masked")


@dataclass
class Route:
    """Routing of one forward pass.

    * ``task`` — one task index for the whole batch (homogeneous batch);
    * ``task_ids`` — one task index per sample; the batch has been **sorted by task** by the model
      (stable), so ``segments`` lists contiguous ``(task, start, stop)`` runs;
    * ``weights`` — soft gates ``[batch, E]`` for soft-routed expert groups (routers);
    * nothing set — only always-on (shared) branches fire.
    """

    task: int | None = None
    task_ids: torch.Tensor | None = None
    segments: tuple[tuple[int, int, int], ...] = ()
    weights: torch.Tensor | None = None
    strategy: MixedStrategy = "bmm"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def for_samples(cls, sorted_ids: torch.Tensor, strategy: MixedStrategy = "bmm", **kw) -> Route:
        """A per-sample route from task ids already sorted (ascending) by the model."""
        if strategy not in MIXED_STRATEGIES:
            raise ValueError(f"unknown mixed-batch strategy {strategy!r}; choose one of {MIXED_STRATEGIES}")
        tasks, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        stops = counts.cumsum(0).tolist()
        starts = [0, *stops[:-1]]
        segments = tuple(zip(tasks.tolist(), starts, stops, strict=True))
        if len(segments) == 1:  # a mixed batch that happens to hold one task: homogeneous path
            return cls(task=segments[0][0], strategy=strategy, **kw)
        return cls(task_ids=sorted_ids, segments=segments, strategy=strategy, **kw)

    @property
    def batch_size(self) -> int | None:
        if self.task_ids is not None:
            return int(self.task_ids.shape[0])
        if self.weights is not None:
            return int(self.weights.shape[0])
        return None

    def task_mask(self, num_tasks: int, dtype: torch.dtype) -> torch.Tensor:
        """One-hot ``[batch, num_tasks]`` of the per-sample task ids (cached per shape/dtype)."""
        key = ("onehot", num_tasks, dtype)
        if key not in self._cache:
            assert self.task_ids is not None
            self._cache[key] = torch.nn.functional.one_hot(self.task_ids, num_tasks).to(dtype)
        return self._cache[key]


class RouteContext:
    """The one mutable slot through which a model hands its current :class:`Route` to its layers."""

    def __init__(self) -> None:
        self.route: Route = Route()
        self.merged_task: int | bool | None = False  # False: not merged; else the folded task (or None)
        self.recorders: dict[str, object] = {}  # layer name -> feature recorder, while collecting

    def set(self, route: Route) -> Route:
        previous, self.route = self.route, route
        return previous
