"""Who fires in this forward pass: a :class:`Route`, built once per model forward.

Every :class:`~loraplex.core.layer.AdaptedLinear` of a model holds a reference to the same
:class:`RouteContext`; the model sets ``context.route`` before running the backbone and clears it
afterwards.  Layers therefore never re-derive grouping information: whatever a kernel needs (task
ids, sorted segments for ``slices``) is computed here once and read by every layer.

A route holds tensors, never per-task Python values that layers read: the homogeneous task is a
one-element tensor, mixed batches keep their ids on the device in batch order.  So building a route
never reads the device from the host (except ``slices``, whose segment bounds are Python ints by
nature), and a compiled backbone is one graph for every task and every mix of tasks.

Layers see inputs whose leading dimension is ``batch * k`` in batch-major order (``k = 1`` for
ViT tokens ``[B, N, C]``; ``k = windows`` for Swin's ``[B * nW, N, C]``; ``k = frames`` for a
frame-wise video wrapper).  They reshape to ``[B, -1, C]`` and use the per-sample route directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

MixedStrategy = Literal["slices", "bmm", "masked"]
MIXED_STRATEGIES: tuple[str, ...] = ("slices", "bmm", "masked")


@dataclass(frozen=True)
class Route:
    """Routing of one forward pass.

    * ``task`` and ``index`` — one task for the whole batch (homogeneous): its index as a Python int,
      for eager bookkeeping (merging), and as a one-element ``LongTensor`` on the model's device, which
      is what layers read (a CPU tensor is made when none is given);
    * ``task_ids`` — one task index per sample ``[B]``, in batch order (``bmm`` and ``masked`` need no
      order).  For ``slices`` the model has sorted the batch by task and ``segments`` lists its
      contiguous ``(task, start, stop)`` runs;
    * ``weights`` — soft gates ``[batch, E]`` for soft-routed expert groups (routers);
    * nothing set — only always-on (shared) branches fire.
    """

    task: int | None = None
    index: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None
    segments: tuple[tuple[int, int, int], ...] = ()
    weights: torch.Tensor | None = None
    strategy: MixedStrategy = "bmm"

    def __post_init__(self) -> None:
        if self.task is not None and self.index is None:
            object.__setattr__(self, "index", torch.tensor([self.task]))

    @classmethod
    def for_samples(cls, ids: torch.Tensor, strategy: MixedStrategy = "bmm", **kw) -> Route:
        """A per-sample route; for ``slices`` the ids must already be sorted (the model sorts them), and the
        segment bounds are read on the host — the only strategy that does so."""
        if strategy not in MIXED_STRATEGIES:
            raise ValueError(f"unknown mixed-batch strategy {strategy!r}; choose one of {MIXED_STRATEGIES}")
        if strategy != "slices":
            return cls(task_ids=ids, strategy=strategy, **kw)
        tasks, counts = torch.unique_consecutive(ids, return_counts=True)
        tasks, stops = tasks.tolist(), counts.cumsum(0).tolist()
        if len(set(tasks)) != len(tasks):
            raise ValueError("the slices strategy needs the batch sorted by task")
        segments = tuple(zip(tasks, [0, *stops[:-1]], stops, strict=True))
        if len(segments) == 1:  # a mixed batch that happens to hold one task: homogeneous path
            return cls(task=tasks[0], index=ids[:1], strategy=strategy, **kw)
        return cls(task_ids=ids, segments=segments, strategy=strategy, **kw)


class RouteContext:
    """The one mutable slot through which a model hands its current :class:`Route` to its layers.

    ``merged`` is a plain flag (layers read it on every forward; a compiled graph guards on it), and
    ``merged_task`` says which task's deltas are folded in (None: shared only)."""

    def __init__(self) -> None:
        self.route: Route = Route()
        self.merged = False
        self.merged_task: int | None = None
        self.recorders: dict[str, object] = {}  # layer name -> feature recorder, while collecting

    def set(self, route: Route) -> Route:
        previous, self.route = self.route, route
        return previous
