"""``AdaptedModel``: backbone with adapted layers, per-task heads, and the one place routes are made.

``model(x, task=...)`` accepts:

* a task name or index — homogeneous batch, returns that head's logits ``[B, C]``;
* a ``LongTensor[B]`` of task indices or a list of names — a **mixed batch**: the backbone runs once
  with per-sample routing, and a :class:`MixedOutput` holds every head's logits and each sample's task
  (its losses and predictions take each sample through its own head);
* ``"all"`` — every task on every sample: ``{task: logits}`` (generic path: the batch is repeated per
  task and run as one mixed batch; methods with stream-aware blocks, such as MTLoRA, do better);
* ``None`` — shared branches only; returns pooled features (no head).

A model with a **router** (a module reading the raw input: MoLA-Router) computes the gates of its soft-routed
groups once per forward, ``[B, E]``, the same vector for every adapted layer; heads are still chosen by
the task.  ``gates=`` overrides the router (analysis, tests).  A mixed batch's :class:`MixedOutput` carries
the router's logits and embedding (the TwD loss reads them).

A backbone with ``forward_tasks(x, num_tasks)`` (a dense pyramid with stream-aware blocks, MTLoRA) predicts
every task on every image: ``"all"`` gives ``{task: dense output}`` from one pass, a task name that
task's output; mixed batches do not apply.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layer import AdaptedLayer
from .routing import MixedStrategy, Route, RouteContext

TaskSpec = str | int | torch.Tensor | Sequence[str] | Sequence[int] | None


@dataclass
class MixedOutput:
    """A mixed batch's logits: every head applied to every sample (``outputs[name]``: ``[B, C_name]``, batch
    order) and each sample's task id.

    Losses and predictions pick each sample's own head through masks, so they never read the ids on the
    host (a training step on a GPU does not stall, a compiled graph does not break).  ``logits`` and
    ``index`` — per task, only that task's samples and their positions — do read them: for inspection."""

    outputs: dict[str, torch.Tensor]
    task_ids: torch.Tensor
    gates: torch.Tensor | None = None  # [B, E] the router's gates, when the model has one
    router_logits: torch.Tensor | None = None  # [B, E]
    router_embedding: torch.Tensor | None = None  # [B, D] L2-normalised projection of the logits (TwD)

    @property
    def index(self) -> dict[str, torch.Tensor]:
        """Positions of each present task's samples in the batch (ascending)."""
        found = {name: torch.nonzero(self.task_ids == t).flatten() for t, name in enumerate(self.outputs)}
        return {name: rows for name, rows in found.items() if rows.numel()}

    @property
    def logits(self) -> dict[str, torch.Tensor]:
        """Each present task's logits on its own samples (in batch order)."""
        return {name: self.outputs[name].index_select(0, rows) for name, rows in self.index.items()}

    def task_mask(self) -> torch.Tensor:
        """``[B, T]`` one-hot of the samples' tasks (bool)."""
        ids = self.task_ids
        return ids.unsqueeze(1) == torch.arange(len(self.outputs), device=ids.device)

    def sample_losses(self, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """``[B]`` cross-entropy of each sample through its own task's head."""
        losses = torch.zeros(targets.shape[0], device=targets.device)
        for t, logits in enumerate(self.outputs.values()):
            own = self.task_ids == t  # other tasks' labels may exceed this head: clamped, then masked out
            ce = nn.functional.cross_entropy(
                logits.float(),
                targets.clamp(max=logits.shape[1] - 1),
                reduction="none",
                label_smoothing=label_smoothing,
            )
            losses = torch.where(own, ce, losses)
        return losses

    def loss(self, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """Sum over the batch's tasks of each task's mean loss (MoLA / multi-domain convention)."""
        mask = self.task_mask().to(torch.float32)
        per_task = (self.sample_losses(targets, label_smoothing).unsqueeze(1) * mask).sum(0)
        return (per_task / mask.sum(0).clamp(min=1)).sum()

    def predictions(self) -> torch.Tensor:
        """``[B]`` arg-max class of each sample under its own task's head."""
        predicted = torch.zeros_like(self.task_ids)
        for t, logits in enumerate(self.outputs.values()):
            predicted = torch.where(self.task_ids == t, logits.argmax(1), predicted)
        return predicted


class AdaptedModel(nn.Module):
    """Backbone + adapted layers + heads.  Built by :func:`loraplex.wrap`; methods never subclass it.

    Heads are a list in task order: task names (``folder:./data`` …) are never module keys.

    Device and dtype: ``model.to(device)`` moves everything (a non-persistent buffer of task indices
    included, which is what homogeneous routes hand the layers).  Features reach the heads in the heads'
    dtype, so a backbone held in bf16 feeds fp32 heads with or without autocast."""

    def __init__(
        self,
        backbone: nn.Module,
        heads: nn.ModuleList,
        tasks: Sequence[str],
        context: RouteContext,
        banks: dict[str, nn.Module],
        mixed_strategy: MixedStrategy = "bmm",
        router: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.banks = nn.ModuleDict(banks)
        self.router = router
        self.experts = max((g.n for g in self._soft_groups()), default=0)
        if router is not None and not self.experts:
            raise ValueError("a router was given but no adapted layer has soft-routed (gated) groups for it to drive")
        if router is None and self.experts:
            raise ValueError("soft-routed (gated) groups need a router to compute their gates; the plan gave none")
        self.tasks = list(tasks)
        self.context = context
        self.mixed_strategy = mixed_strategy
        self.method_name = ""
        self.method_config: dict = {}
        self.backbone_info: dict = {}
        self.saved_modules: list[str] = []
        self.head_spec: dict = {"kind": "linear"}
        self.head_outputs: dict[str, int] = {}
        self.register_buffer("task_range", torch.arange(len(self.tasks)), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.task_range.device

    # ---- routing -------------------------------------------------------------------------------
    def task_index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task index {task} out of range for tasks {self.tasks}")
            return task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this model's tasks are {self.tasks}")
        return self.tasks.index(task)

    def task_ids(self, task: Sequence[str] | Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
        """Per-sample task ids on ``device``.  Ids given on the CPU (or as names) are range-checked there; ids
        already on an accelerator are checked asynchronously, so the forward never waits for the device."""
        if not isinstance(task, torch.Tensor):
            task = torch.tensor([self.task_index(t) for t in task], dtype=torch.long)
        ids = task.long()
        valid = ((ids >= 0) & (ids < len(self.tasks))).all()
        if ids.device.type == "cpu":
            if ids.numel() and not valid:
                raise ValueError(f"task ids must lie in [0, {len(self.tasks)}), got {ids.unique().tolist()}")
        else:
            torch._assert_async(valid, f"task ids must lie in [0, {len(self.tasks)})")
        return ids.to(device, non_blocking=True)

    def task_route(self, task: str | int) -> Route:
        """The homogeneous route of ``task``: its index as a view of a device buffer (no host-to-device copy)."""
        t = self.task_index(task)
        return Route(task=t, index=self.task_range[t : t + 1], strategy=self.mixed_strategy)

    def adapted_layers(self) -> dict[str, AdaptedLayer]:
        return {m.name: m for m in self.backbone.modules() if isinstance(m, AdaptedLayer)}

    def _soft_groups(self) -> list[nn.Module]:
        return [
            g
            for m in self.backbone.modules()
            if isinstance(m, AdaptedLayer)
            for g in m.groups.values()
            if g.routing == "soft"
        ]

    def gated(self, x: torch.Tensor, gates: torch.Tensor | None = None) -> tuple[torch.Tensor | None, tuple]:
        """The gates ``[B, E]`` for input ``x`` (``gates`` if given, checked; else the router's) and the router's
        ``(logits, embedding)`` (empty without a router or with given gates)."""
        if gates is not None:
            if not self.experts:
                raise ValueError("gates were given, but this model has no soft-routed (gated) groups")
            if gates.dim() != 2 or tuple(gates.shape) != (x.shape[0], self.experts):
                raise ValueError(
                    f"gates of shape {tuple(gates.shape)} for a batch of {x.shape[0]} and {self.experts} experts: "
                    f"expected [{x.shape[0]}, {self.experts}]"
                )
            return gates, ()
        if self.router is None:
            return None, ()
        logits, embedding = self.router(x)
        return self.router.gates(logits), (logits, embedding)

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
        return all(
            g.routing != "soft" and g.relevance is None
            for layer in self.adapted_layers().values()
            for g in layer.groups.values()
        )

    @contextlib.contextmanager
    def routed(self, route: Route) -> Iterator[None]:
        ctx = self.context
        if ctx.merged and (route.task_ids is not None or route.task != ctx.merged_task):
            raise RuntimeError(
                f"the model is merged for task {ctx.merged_task!r}; unmerge (leave the `merged` block) before "
                "running another task or a mixed batch"
            )
        previous = ctx.set(route)
        try:
            yield
        finally:
            ctx.set(previous)

    @contextlib.contextmanager
    def recording(self, recorders: dict[str, object]) -> Iterator[None]:
        """While inside, every adapted layer named in ``recorders`` hands its input to that recorder's
        ``observe(x)`` (a :class:`~loraplex.core.subspace.FeatureMemory`, for instance) before its forward."""
        unknown = sorted(set(recorders) - set(self.adapted_layers()))
        if unknown:
            raise ValueError(
                f"no adapted layer named {unknown[:3]} to record; adapted: {list(self.adapted_layers())[:3]} …"
            )
        previous, self.context.recorders = self.context.recorders, dict(recorders)
        try:
            yield
        finally:
            self.context.recorders = previous

    def _features(self, x: torch.Tensor, route: Route, gates: torch.Tensor | None = None) -> torch.Tensor:
        gates, _ = self.gated(x, gates)
        with self.routed(dataclasses.replace(route, weights=gates) if gates is not None else route):
            return self.backbone(x)

    def _mixed_features(
        self, x: torch.Tensor, ids: torch.Tensor, gates: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
        """Features of a mixed batch in its own order, its gates and the router's outputs.  Only ``slices``
        needs the batch sorted by task (and the segment bounds on the host); ``bmm`` and ``masked`` take it as
        it comes."""
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"{ids.shape[0]} task ids for a batch of {x.shape[0]}")
        gates, router = self.gated(x, gates)
        if self.mixed_strategy != "slices":
            with self.routed(Route.for_samples(ids, self.mixed_strategy, weights=gates)):
                return self.backbone(x), gates, router
        order = torch.argsort(ids, stable=True)
        sorted_gates = None if gates is None else gates[order]
        with self.routed(Route.for_samples(ids[order], "slices", weights=sorted_gates)):
            feats = self.backbone(x[order])
        return feats[torch.argsort(order)], gates, router

    def _head(self, t: int, features):
        """Task ``t``'s head on features cast to the heads' dtype (a pyramid is a list of maps)."""
        dtype = next(self.heads.parameters()).dtype
        if isinstance(features, torch.Tensor):
            return self.heads[t](features.to(dtype))
        return self.heads[t]([f.to(dtype) for f in features])

    # ---- forward -------------------------------------------------------------------------------
    def forward_features(
        self, x: torch.Tensor, task: TaskSpec = None, gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pooled backbone features under the route ``task`` describes (original sample order)."""
        if task is None:
            return self._features(x, Route(), gates)
        if isinstance(task, str | int):
            return self._features(x, self.task_route(task), gates)
        return self._mixed_features(x, self.task_ids(task, x.device), gates)[0]

    def forward(self, x: torch.Tensor, task: TaskSpec = None, gates: torch.Tensor | None = None):
        if task is None:
            return self._features(x, Route(), gates)
        if self.streams:
            return self._all_tasks(x, task)
        if isinstance(task, str) and task == "all":
            ids, copies = self.task_range.repeat_interleave(x.shape[0]), len(self.tasks)
            repeated_gates = None if gates is None else gates.repeat(copies, 1)
            features = self._mixed_features(x.repeat(copies, *([1] * (x.dim() - 1))), ids, repeated_gates)[0]
            return {
                name: self._head(t, f)
                for t, (name, f) in enumerate(zip(self.tasks, features.chunk(len(self.tasks)), strict=True))
            }
        if isinstance(task, str | int):
            return self._head(self.task_index(task), self._features(x, self.task_route(task), gates))
        ids = self.task_ids(task, x.device)
        features, used, router = self._mixed_features(x, ids, gates)
        heads = {name: self._head(t, features) for t, name in enumerate(self.tasks)}
        return MixedOutput(heads, ids, used, *router)

    def _all_tasks(self, x: torch.Tensor, task: TaskSpec):
        if not (isinstance(task, str | int)):
            raise ValueError("a dense multi-task model predicts every task on every image: use task='all' or one task")
        with self.routed(Route()):
            streams = self.backbone.forward_tasks(x, len(self.tasks))
        if task == "all":
            return {name: self._head(t, streams[t]) for t, name in enumerate(self.tasks)}
        t = self.task_index(task)
        return self._head(t, streams[t])

    def save(self, directory) -> None:
        """Write ``loraplex_config.json`` + ``adapters.safetensors`` (see :mod:`loraplex.core.state`)."""
        from .state import save  # state builds on this module

        save(self, directory)

    def compile(self, *args, **kwargs) -> None:
        """Compile the routed backbone in place (:meth:`torch.nn.Module.compile`; state-dict keys unchanged).

        Routes hold tensors only, so one graph serves every task and every mix of tasks (``slices``
        excepted: its segment bounds are Python ints).  Route making and the heads stay eager: they read
        task names and are tiny next to the backbone."""
        self.backbone.compile(*args, **kwargs)

    # ---- merging -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def merged(self, task: str | int | None = None) -> Iterator[AdaptedModel]:
        """Fold shared + ``task`` deltas into each frozen W (exact); W is restored on exit.

        Each W is swapped for a fresh ``W + ΔW`` and the original tensor put back afterwards: one pass
        over the weights, and the restored W is the very tensor that was there (bit-exact)."""
        ctx = self.context
        if ctx.merged:
            raise RuntimeError("the model is already merged")
        t = None if task is None else self.task_index(task)
        originals: list[tuple[nn.Parameter, torch.Tensor]] = []
        try:
            with torch.no_grad():
                for layer in self.adapted_layers().values():
                    weight = layer.base.weight
                    delta = layer.delta_weight(t).to(weight.dtype)
                    originals.append((weight, weight.data))
                    weight.data = weight.data + delta
            ctx.merged, ctx.merged_task = True, t
            yield self
        finally:
            for weight, original in originals:
                weight.data = original
            ctx.merged, ctx.merged_task = False, None
