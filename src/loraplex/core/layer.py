"""``AdaptedLinear``: a frozen ``nn.Linear`` plus branch groups, driven by the model's current Route.

``y = W x + b + Σ_groups Σ_k g_k(sample) · s_k · B_k A_k x``.  The forward reads the route from the
shared :class:`~loraplex.core.routing.RouteContext`; it never hooks, never re-groups the batch.
Mixed-batch kernels:

* ``bmm`` — gather each sample's factors and run two batched matmuls (any sample order);
* ``slices`` — one low-rank product per task segment of a batch sorted by task (no gathers);
* ``masked`` — one GEMM through every branch, masked per sample (also the soft-routing kernel).

Every kernel adds its low-rank product **in place** into ``W x + b`` (a fresh tensor autograd does not
need): no second output tensor, no copy of it.  The factors follow the activations' dtype, so a frozen
backbone held in bf16 runs with fp32 trainable factors, with or without autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from .branches import LoRAGroup
from .routing import Route, RouteContext


class AdaptedLayer(nn.Module):
    """What every adapted layer shares: the frozen module, its name, the model's route context, its groups.

    ``in_features`` / ``out_features`` are the sizes of the matrix ``B A`` that a branch builds, and
    ``rank_factor`` how many factor rows one unit of nominal rank takes (1 for a linear layer)."""

    rank_factor = 1

    def __init__(self, base: nn.Module, name: str, context: RouteContext) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.context = context
        self.groups = nn.ModuleDict()

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def to_weight_shape(self, delta: torch.Tensor) -> torch.Tensor:
        """A branch's ``B A`` (``out_features × in_features``) as a tensor of the frozen weight's shape."""
        return delta

    def delta_weight(self, task: int | None) -> torch.Tensor:
        """The input-independent ``ΔW`` that fires for ``task`` (every branch of the shared groups plus that task's
        branch), in the frozen weight's shape."""
        deltas = []
        for key, group in self.groups.items():
            if group.routing == "soft" or (task is None and group.relevance is not None):
                raise ValueError(
                    f"{self.name}: group {key!r} is routed by input-dependent gates{' without a task' * (task is None)}"
                    "; it has no fixed ΔW to merge or export"
                )
            if group.routing == "always":
                deltas.append(group.delta_weight(None))
            elif task is not None:
                deltas.append(group.delta_weight(task))
        return self.to_weight_shape(sum(deltas)) if deltas else torch.zeros_like(self.base.weight)


class AdaptedLinear(AdaptedLayer):
    """A frozen ``nn.Linear`` plus branch groups (``A: [n, r, in]``, ``B: [n, out, r]``)."""

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if ctx.recorders:
            recorder = ctx.recorders.get(self.name)
            if recorder is not None:
                recorder.observe(x)
        y = self.base(x)
        if ctx.merged:  # deltas already folded into W
            return y
        for group in self.groups.values():
            y = add_group_output(group, x, y, ctx.route)
        return y

    def forward_streams(
        self, x_shared: torch.Tensor, x_tasks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task at once (MTLoRA): the frozen matmul runs once on the shared input.

        Returns ``(y_shared, y_tasks)`` with ``y_shared = W x_sh + b + Σ_always s B A drop(x_sh)`` and
        ``y_tasks[t] = W x_sh + b + s_t B_t A_t x_t`` (``x_t = drop(x_sh)`` — the same dropout mask as the
        shared LoRA's — when ``x_tasks`` is None).  The task path deliberately omits the shared delta, as
        MTLoRA's task-specific layers do.  Shared groups here hold one branch each.
        """
        if self.context.merged:
            raise RuntimeError(f"{self.name}: task streams cannot run on merged weights (shared delta counted twice)")
        pre = self.base(x_shared)
        task_group = next((g for g in self.groups.values() if g.routing == "task"), None)
        if task_group is None:
            raise ValueError(f"{self.name}: forward_streams needs a task-routed group on this layer")
        shared = [g for g in self.groups.values() if g.routing == "always"]
        if any(g.n > 1 for g in shared):
            raise ValueError(f"{self.name}: forward_streams runs always-on groups of one branch each, not stacked ones")
        # the task LoRAs that read the shared input read it through the shared LoRA's dropout, with the same
        # mask (MTLoRA's code drops the input once and hands it to both)
        dropped = shared[0].dropout(x_shared) if shared else x_shared
        a, b = task_group.factors()
        tasks, rank, width, out = a.shape[0], a.shape[1], x_shared.shape[-1], pre.shape[-1]
        if x_tasks is None:  # one GEMM through every task's A: the shared input is read once, not once per task
            rows = dropped.reshape(-1, width)
            h = (rows @ a.reshape(tasks * rank, width).to(rows.dtype).T).view(-1, tasks, rank).transpose(0, 1)
        else:
            h = torch.bmm(x_tasks.reshape(tasks, -1, width), a.to(x_tasks.dtype).transpose(1, 2))
        # contiguous [T, N, ·] operands, the scale on the rank-r intermediate and the add fused into the last
        # product: what task streams cost on a CPU is this memory-bound work (strided views made it ~3× slower)
        h = h.to(pre.dtype).contiguous() * task_group.scale.to(pre.dtype).view(-1, 1, 1)
        y_tasks = torch.baddbmm(pre.reshape(1, -1, out).expand(tasks, -1, -1), h, b.to(pre.dtype).transpose(1, 2))
        y_shared = pre  # baddbmm saved nothing of `pre`, so the shared deltas may now go into it in place
        for i, group in enumerate(shared):
            a_s, b_s = group.factors()
            _low_rank_(y_shared, dropped if i == 0 else group.dropout(x_shared), a_s[0], b_s[0], group.scale[0])
        return y_shared, y_tasks.view(tasks, *pre.shape)


def _low_rank_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y += (x Aᵀ) diag(scale) Bᵀ`` in place (``scale`` one value, or one per rank column); the scale multiplies
    the rank-r intermediate (cheapest place)."""
    h = (x @ a.to(x.dtype).T).to(y.dtype) * scale.to(y.dtype)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), b.to(y.dtype).T)
    return y


def _always(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every branch fires: one GEMM through the branches' factors concatenated along the rank."""
    a, b, scale = group.concatenated()
    return _low_rank_(y, group.dropout(x), a, b, scale)


def add_group_output(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, route: Route) -> torch.Tensor:
    """``y`` plus the routed output of one group for input ``x`` ``[batch·k, ..., in]`` (``y`` updated in place)."""
    if group.routing == "always":
        return _always(group, x, y)
    if group.routing == "soft":
        return _masked(group, x, y, soft_gates(group, route))
    if route.index is not None:  # homogeneous: the task is a tensor, so one compiled graph serves every task
        a, b = group.factors()
        one = route.index
        a, b, scale = a.index_select(0, one)[0], b.index_select(0, one)[0], group.scale.index_select(0, one)
        return _low_rank_(y, group.dropout(x), a, b, scale)
    if route.task_ids is None:
        if group.relevance is not None:  # no task given: the branches weighed by the input's relevance to each
            return _masked(group, x, y, group.relevance.gates(x, group.input_space.basis))
        return y  # shared-only route: task branches stay silent
    if route.strategy == "slices":
        return _slices(group, x, y, route)
    if route.strategy == "bmm":
        return _bmm(group, x, y, route.task_ids)
    ids = route.task_ids
    one_hot = ids.unsqueeze(1) == torch.arange(group.n, device=ids.device)
    return _masked(group, x, y, one_hot.to(group.scale.dtype))


def soft_gates(group: LoRAGroup, route: Route) -> torch.Tensor:
    """The route's gates ``[B, E]`` for a soft-routed group of ``E`` experts (shapes only: no host read)."""
    gates = route.weights
    if gates is None:
        raise RuntimeError("a soft-routed group ran without gate weights in the route (the model has no router?)")
    if gates.dim() != 2 or gates.shape[1] != group.n:
        raise ValueError(
            f"gates of shape {tuple(gates.shape)} for a group of {group.n} experts: expected [batch, {group.n}]"
        )
    return gates


def _per_sample(t: torch.Tensor, batch: int) -> torch.Tensor:
    """An input ``[batch·k, …, C]`` as ``[batch, -1, C]`` (outputs use ``view``, so in-place updates reach them)."""
    if t.shape[0] % batch:
        raise RuntimeError(f"layer input leading dim {t.shape[0]} is not a multiple of the batch {batch}")
    return t.reshape(batch, -1, t.shape[-1])


def _slices(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, route: Route) -> torch.Tensor:
    a, b = group.factors()
    batch = len(route.task_ids)
    xs, ys = _per_sample(group.dropout(x), batch), y.view(batch, -1, y.shape[-1])
    for t, i, j in route.segments:  # contiguous views of y, each updated in place
        _low_rank_(ys[i:j], xs[i:j], a[t], b[t], group.scale[t])
    return y


def _bmm(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    a, b = group.factors()
    xs = _per_sample(group.dropout(x), len(ids))
    h = torch.bmm(xs, a.index_select(0, ids).to(xs.dtype).transpose(1, 2)).to(y.dtype)
    h = h * group.scale.index_select(0, ids).to(y.dtype).view(-1, 1, 1)
    y.view(len(ids), -1, y.shape[-1]).baddbmm_(h, b.index_select(0, ids).to(y.dtype).transpose(1, 2))
    return y


def _masked(group: LoRAGroup, x: torch.Tensor, y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """One GEMM through all ``n`` branches; each sample's rank block is scaled by its gate."""
    a, b = group.factors()
    n, r = a.shape[0], a.shape[1]
    batch = gates.shape[0]
    xs = _per_sample(group.dropout(x), batch)
    h = (xs @ a.reshape(n * r, -1).to(xs.dtype).T).to(y.dtype)
    h = h * (gates * group.scale).to(y.dtype).repeat_interleave(r, dim=1).unsqueeze(1)
    b_cat = b.permute(1, 0, 2).reshape(b.shape[1], n * r).to(y.dtype)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, n * r), b_cat.T)
    return y
