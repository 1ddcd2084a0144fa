"""``AdaptedModel``: backbone with adapted layers, per-task heads, and the one place routes are made.

``model(x, task=...)`` accepts:

* a task name or index — homogeneous batch, returns that head's logits ``[B, C]``;
* a ``LongTensor[B]`` of task indices or a list of names — a **mixed batch**: the batch is sorted by
  task once, the backbone runs once, and a :class:`MixedOutput` holds each task's logits with the
  original positions of its samples;
* ``"all"`` — every task on every sample: ``{task: logits}`` (generic path: the batch is repeated per
  task and run as one mixed batch; methods with stream-aware blocks, such as MTLoRA, do better);
* ``None`` — shared branches only; returns pooled features (no head).

A backbone with ``forward_tasks(x, num_tasks)`` (a dense pyramid with stream-aware blocks, MTLoRA) predicts
every task on every image: ``"all"`` gives ``{task: dense output}`` from one pass, a task name that
task's output; mixed batches do not apply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layer import AdaptedLinear
from .routing import MixedStrategy, Route, RouteContext

TaskSpec = str | int | torch.Tensor | Sequence[str] | Sequence[int] | None


@dataclass
class MixedOutput:
    """Per-task logits of a mixed batch; ``index[t]`` gives the original positions of ``logits[t]``."""

    logits: dict[str, torch.Tensor]
    index: dict[str, torch.Tensor]

    def loss(self, targets: torch.Tensor, loss_fn=nn.functional.cross_entropy) -> torch.Tensor:
        """Sum over tasks of each task's mean loss (MoLA / multi-domain convention)."""
        return sum(loss_fn(self.logits[t], targets[self.index[t]]) for t in self.logits)


class AdaptedModel(nn.Module):
    """Backbone + adapted layers + heads.  Built by :func:`loraplex.wrap`; methods never subclass it."""

    def __init__(
        self,
        backbone: nn.Module,
        heads: nn.ModuleDict,
        tasks: Sequence[str],
        context: RouteContext,
        banks: dict[str, nn.Module],
        mixed_strategy: MixedStrategy = "bmm",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.banks = nn.ModuleDict(banks)
        self.tasks = list(tasks)
        self.context = context
        self.mixed_strategy = mixed_strategy
        self.method_name = ""
        self.method_config: dict = {}
        self.backbone_info: dict = {}
        self.saved_modules: list[str] = []
        self.head_spec: dict = {"kind": "linear"}
        self.head_outputs: dict[str, int] = {}

    # ---- routing -------------------------------------------------------------------------------
    def task_index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task index {task} out of range for tasks {self.tasks}")
            return task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {self.tasks}")
        return self.tasks.index(task)

    def task_ids(self, task: Sequence[str] | Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(task, torch.Tensor):
            ids = task.long()
            if ids.numel() and (ids.min() < 0 or ids.max() >= len(self.tasks)):
                raise ValueError(f"task ids must lie in [0, {len(self.tasks)}), got {ids.unique().tolist()}")
            return ids
        return torch.tensor([self.task_index(t) for t in task], dtype=torch.long)

    def adapted_layers(self) -> dict[str, AdaptedLinear]:
        return {m.name: m for m in self.backbone.modules() if isinstance(m, AdaptedLinear)}

    @property
    def streams(self) -> bool:
        """Whether the backbone runs every task at once (one stream per task, dense heads)."""
        return hasattr(self.backbone, "forward_tasks")

    @property
    def mergeable(self) -> bool:
        """Whether every delta is input-independent, so a task's deltas fold exactly into W (not for task
        streams: there a task path's frozen matmul reads the shared input, not the task's)."""
        if self.streams:
            return False
        return all(g.routing != "soft" for layer in self.adapted_layers().values() for g in layer.groups.values())

    @contextlib.contextmanager
    def routed(self, route: Route) -> Iterator[None]:
        merged = self.context.merged_task
        if merged is not False and (route.task_ids is not None or route.task != merged):
            raise RuntimeError(
                f"the model is merged for task {merged!r}; unmerge (leave the `merged` block) before "
                "running another task or a mixed batch"
            )
        previous = self.context.set(route)
        try:
            yield
        finally:
            self.context.set(previous)

    def _features(self, x: torch.Tensor, route: Route) -> torch.Tensor:
        with self.routed(route):
            return self.backbone(x)

    # ---- forward -------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, task: TaskSpec = None) -> torch.Tensor:
        """Pooled backbone features under the route ``task`` describes (original sample order)."""
        if task is None:
            return self._features(x, Route())
        if isinstance(task, str | int):
            return self._features(x, Route(task=self.task_index(task)))
        ids = self.task_ids(task).to(x.device)
        order = torch.argsort(ids, stable=True)
        feats = self._features(x[order], Route.for_samples(ids[order], self.mixed_strategy))
        return feats[torch.argsort(order)]

    def forward(self, x: torch.Tensor, task: TaskSpec = None):
        if task is None:
            return self._features(x, Route())
        if self.streams:
            return self._all_tasks(x, task)
        if isinstance(task, str) and task == "all":
            ids = torch.arange(len(self.tasks), device=x.device).repeat_interleave(x.shape[0])
            mixed = self._mixed(x.repeat(len(self.tasks), *([1] * (x.dim() - 1))), ids)
            return mixed.logits
        if isinstance(task, str | int):
            t = self.task_index(task)
            return self.heads[self.tasks[t]](self._features(x, Route(task=t)))
        return self._mixed(x, self.task_ids(task).to(x.device))

    def _all_tasks(self, x: torch.Tensor, task: TaskSpec):
        if not (isinstance(task, str | int)):
            raise ValueError("a dense multi-task model predicts every task on every image: use task='all' or one task")
        with self.routed(Route()):
            streams = self.backbone.forward_tasks(x, len(self.tasks))
        if task == "all":
            return {name: self.heads[name](streams[t]) for t, name in enumerate(self.tasks)}
        t = self.task_index(task)
        return self.heads[self.tasks[t]](streams[t])

    def _mixed(self, x: torch.Tensor, ids: torch.Tensor) -> MixedOutput:
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"{ids.shape[0]} task ids for a batch of {x.shape[0]}")
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        route = Route.for_samples(sorted_ids, self.mixed_strategy)
        feats = self._features(x[order], route)
        logits, index = {}, {}
        segments = route.segments or ((route.task, 0, len(ids)),)
        for t, start, stop in segments:
            name = self.tasks[t]
            logits[name] = self.heads[name](feats[start:stop])
            index[name] = order[start:stop]
        return MixedOutput(logits, index)

    def save(self, directory) -> None:
        """Write ``loraplex_config.json`` + ``adapters.safetensors`` (see :mod:`loraplex.core.state`)."""
        from .state import save  # state builds on this module

        save(self, directory)

    # ---- merging -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def merged(self, task: str | int | None = None) -> Iterator[AdaptedModel]:
        """Fold shared + ``task`` deltas into each frozen W (exact); W is restored on exit."""
        if self.context.merged_task is not False:
            raise RuntimeError("the model is already merged")
        t = None if task is None else self.task_index(task)
        originals: list[tuple[AdaptedLinear, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for layer in self.adapted_layers().values():
                    delta = layer.delta_weight(t)
                    originals.append((layer, layer.base.weight.detach().clone()))
                    layer.base.weight.add_(delta.to(layer.base.weight.dtype))
            self.context.merged_task = t
            yield self
        finally:
            with torch.no_grad():
                for layer, weight in originals:
                    layer.base.weight.copy_(weight)
            self.context.merged_task = False
