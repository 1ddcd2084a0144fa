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
        for group in self.groups.values():
            y = add_group_output(group, x, y, ctx.route)
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
        if self.context.merged_task is not False:
            raise RuntimeError(f"{self.name}: task streams cannot run on merged weights (shared delta counted twice)")
        pre = self.base(x_shared)
        y_shared = pre
        task_group = None
        for group in self.groups.values():
            if group.routing == "always":
                y_shared = _always(group, x_shared, y_shared)
            elif group.routing == "task":
                task_group = group
        if task_group is None:
            raise ValueError(f"{self.name}: forward_streams needs a task-routed group on this layer")
        a, b = task_group.factors()
        tasks, width, out = a.shape[0], x_shared.shape[-1], pre.shape[-1]
        # contiguous [T, N, ·] batched products, the scale on the rank-r intermediate and the add fused into
        # the last product: every [T, N, ·] tensor is written once and read with unit strides (what task
        # streams cost on a CPU is this memory-bound work; einsum's strided views made it ~3× slower)
        shared_input = x_shared.reshape(1, -1, width).expand(tasks, -1, -1)
        x = shared_input if x_tasks is None else x_tasks.reshape(tasks, -1, width)
        h = torch.bmm(x, a.transpose(1, 2)) * task_group.scale.view(-1, 1, 1)
        y_tasks = torch.baddbmm(pre.reshape(1, -1, out).expand(tasks, -1, -1), h, b.transpose(1, 2))
        return y_shared, y_tasks.view(tasks, *pre.shape)


def _add_product(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y + h Bᵀ`` as one fused ``addmm`` over the flattened leading dimensions."""
    return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), b.T).view_as(y)


def _low_rank(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y + scale · (x Aᵀ) Bᵀ``: the scale multiplies the rank-r intermediate (cheapest place)."""
    return _add_product(y, (x @ a.T) * scale, b)


def _always(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    a, b = group.factors()
    return _low_rank(group.dropout(x), y, a[0], b[0], group.scale[0])


def add_group_output(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, route: Route) -> torch.Tensor:
    """``y`` plus the routed output of one group for input ``x`` ``[batch·k, ..., in]``."""
    if group.routing == "always":
        return _always(group, x, y)
    if group.routing == "soft":
        if route.weights is None:
            raise RuntimeError("a soft-routed group ran without gate weights in the route")
        return _masked(group, x, y, route.weights)
    if route.task is not None:
        a, b = group.factors()
        t = route.task
        return _low_rank(group.dropout(x), y, a[t], b[t], group.scale[t])
    if route.task_ids is None:
        return y  # shared-only route: task branches stay silent
    if route.strategy == "slices":
        return _slices(group, x, y, route)
    if route.strategy == "bmm":
        return _bmm(group, x, y, route)
    return _masked(group, x, y, route.task_mask(group.n, x.dtype))


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] % batch:
        raise RuntimeError(f"layer input leading dim {t.shape[0]} is not a multiple of the batch {batch}")
    return t.reshape(batch, -1, t.shape[-1])


def _slices(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, route: Route) -> torch.Tensor:
    a, b = group.factors()
    batch = len(route.task_ids)
    xs, ys = _per_sample(group.dropout(x), batch), _per_sample(y, batch)
    parts = [_low_rank(xs[i:j], ys[i:j], a[t], b[t], group.scale[t]) for t, i, j in route.segments]
    return torch.cat(parts).view_as(y)


def _bmm(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, route: Route) -> torch.Tensor:
    a, b = group.factors()
    ids = route.task_ids
    xs = _per_sample(group.dropout(x), len(ids))
    h = torch.bmm(xs, a[ids].transpose(1, 2)) * group.scale[ids].view(-1, 1, 1)
    return torch.baddbmm(_per_sample(y, len(ids)), h, b[ids].transpose(1, 2)).view_as(y)


def _masked(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """One GEMM through all ``n`` branches; each sample's rank block is scaled by its gate."""
    a, b = group.factors()
    n, r = a.shape[0], a.shape[1]
    batch = gates.shape[0]
    xs = _per_sample(group.dropout(x), batch)
    h = (xs @ a.reshape(n * r, -1).T) * (gates * group.scale).repeat_interleave(r, dim=1).unsqueeze(1)
    b_cat = b.permute(1, 0, 2).reshape(b.shape[1], n * r)
    return _add_product(y, h, b_cat)
