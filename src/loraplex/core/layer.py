"""``AdaptedLinear``: a frozen ``nn.Linear`` plus branch groups, driven by the model's current Route.

``y = W x + b + Σ_groups Σ_k g_k(sample) · s_k · B_k A_k x``.  The forward reads the route from the
shared :class:`~loraplex.core.routing.RouteContext`; it never hooks, never re-groups the batch.
Mixed batches arrive sorted by task (the model sorted them once), so each strategy is cheap:

* ``slices`` — one low-rank product per task segment, concatenated (no gathers);
* ``bmm`` — gather each sample's factors and run two batched matmuls;
* ``masked`` — one GEMM through every branch, masked per sample (also the soft-routing kernel).
"""

from __future__ import annotations

import torch
from torch import nn

from .branches import LoRAGroup
from .routing import Route, RouteContext


class AdaptedLinear(nn.Module):
    def __init__(self, base: nn.Linear, name: str, context: RouteContext) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.context = context
        self.groups = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if ctx.recorders:
            recorder = ctx.recorders.get(self.name)
            if recorder is not None:
                recorder.observe(x)
        y = self.base(x)
        if ctx.merged_task is not False:  # deltas already folded into W
            return y
        route = ctx.route
        for group in self.groups.values():
            delta = group_delta(group, x, route)
            if delta is not None:
                y = y + delta
        return y

    def delta_weight(self, task: int | None) -> torch.Tensor:
        """The input-independent ``ΔW`` that fires for ``task`` (shared groups plus that task's branch)."""
        total = torch.zeros_like(self.base.weight)
        for key, group in self.groups.items():
            if group.routing == "soft":
                raise ValueError(
                    f"{self.name}: group {key!r} is routed by input-dependent gates; it has no fixed ΔW "
                    "to merge or export"
                )
            if group.routing == "always":
                total = total + group.delta_weight(0)
            elif task is not None:
                total = total + group.delta_weight(task)
        return total

    def forward_streams(
        self, x_shared: torch.Tensor, x_tasks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task at once (MTLoRA): the frozen matmul runs once on the shared input.

        Returns ``(y_shared, y_tasks)`` with ``y_shared = W x_sh + b + Σ_always s B A drop(x_sh)`` and
        ``y_tasks[t] = W x_sh + b + s_t B_t A_t x_t`` (``x_t = x_shared`` when ``x_tasks`` is None).
        The task path deliberately omits the shared delta, as MTLoRA's task-specific layers do.
        """
        pre = self.base(x_shared)
        y_shared = pre
        task_group = None
        for group in self.groups.values():
            if group.routing == "always":
                y_shared = y_shared + _always(group, x_shared)
            elif group.routing == "task":
                task_group = group
        if task_group is None:
            raise ValueError(f"{self.name}: forward_streams needs a task-routed group on this layer")
        a, b = task_group.factors()
        scale = task_group.scale.view(-1, *([1] * x_shared.dim()))
        if x_tasks is None:
            h = torch.einsum("...i,tri->t...r", x_shared, a)
        else:
            h = torch.einsum("t...i,tri->t...r", x_tasks, a)
        y_tasks = pre.unsqueeze(0) + scale * torch.einsum("t...r,tor->t...o", h, b)
        return y_shared, y_tasks


def _always(group: LoRAGroup, x: torch.Tensor) -> torch.Tensor:
    a, b = group.factors()
    return group.scale[0] * ((group.dropout(x) @ a[0].T) @ b[0].T)


def group_delta(group: LoRAGroup, x: torch.Tensor, route: Route) -> torch.Tensor | None:
    """The routed output of one group for input ``x`` ``[batch·k, ..., in]``."""
    if group.routing == "always":
        return _always(group, x)
    if group.routing == "soft":
        if route.weights is None:
            raise RuntimeError("a soft-routed group ran without gate weights in the route")
        return _masked(group, x, route.weights)
    if route.task is not None:
        a, b = group.factors()
        return group.scale[route.task] * ((group.dropout(x) @ a[route.task].T) @ b[route.task].T)
    if route.task_ids is None:
        return None  # shared-only route: task branches stay silent
    if route.strategy == "slices":
        return _slices(group, x, route)
    if route.strategy == "bmm":
        return _bmm(group, x, route)
    return _masked(group, x, route.task_mask(group.n, x.dtype))


def _per_sample(x: torch.Tensor, batch: int) -> torch.Tensor:
    if x.shape[0] % batch:
        raise RuntimeError(f"layer input leading dim {x.shape[0]} is not a multiple of the batch {batch}")
    return x.reshape(batch, -1, x.shape[-1])


def _slices(group: LoRAGroup, x: torch.Tensor, route: Route) -> torch.Tensor:
    a, b = group.factors()
    xs = _per_sample(group.dropout(x), len(route.task_ids))
    parts = [group.scale[t] * ((xs[start:stop] @ a[t].T) @ b[t].T) for t, start, stop in route.segments]
    return torch.cat(parts).reshape(*x.shape[:-1], -1)


def _bmm(group: LoRAGroup, x: torch.Tensor, route: Route) -> torch.Tensor:
    a, b = group.factors()
    ids = route.task_ids
    xs = _per_sample(group.dropout(x), len(ids))
    h = torch.bmm(xs, a[ids].transpose(1, 2)) * group.scale[ids].view(-1, 1, 1)
    return torch.bmm(h, b[ids].transpose(1, 2)).reshape(*x.shape[:-1], -1)


def _masked(group: LoRAGroup, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """One GEMM through all ``n`` branches; each sample's rank block is scaled by its gate."""
    a, b = group.factors()
    n, r = a.shape[0], a.shape[1]
    xs = _per_sample(group.dropout(x), gates.shape[0])
    h = xs @ a.reshape(n * r, -1).T
    mask = (gates * group.scale).repeat_interleave(r, dim=1).unsqueeze(1)
    b_cat = b.permute(1, 0, 2).reshape(b.shape[1], n * r)
    return ((h * mask) @ b_cat.T).reshape(*x.shape[:-1], -1)
