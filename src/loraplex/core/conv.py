"""``AdaptedConv2d``: a frozen ``nn.Conv2d`` plus branch groups, in the conv-LoRA format MoLA uses.

Each branch holds ``A: [r·k, (C_in/g)·k]`` and ``B: [C_out·k, r·k]`` (``k`` the kernel size, ``g`` the groups;
``r·k²·(C_in/g + C_out)`` parameters for a nominal rank ``r``) and its ``ΔW`` is ``s · B A`` viewed in the
weight's shape ``[C_out, C_in/g, k, k]`` — the format of Hu et al.'s ``loralib`` ConvLoRA, which MoLA's
parameter counts use.  The scale is ``α / r`` with the nominal ``r``.  Stride, padding, dilation and groups
are the frozen conv's.

Unlike a linear layer, ``ΔW`` here is not a product a forward can apply cheaply as two thin matmuls, so the
deltas are folded into the weight **functionally** (``W + ΔW`` is a new tensor each forward: the adapters get
gradients and nothing accumulates):

* one task for the batch (or shared branches only) — one conv with ``W + Σ ΔW`` (an ``always`` group adds
  every one of its branches);
* a mixed batch or soft gates — ``slices`` (the batch sorted by task): one conv per task segment with that
  task's kernel (the whole batch costs one frozen conv); otherwise (``bmm``, ``masked``, and soft gates
  under any strategy): the frozen conv plus one conv through every expert's ``ΔW`` stacked along the output
  channels, mixed per sample by the gates (one-hot for task routing) — ``1 + E`` convs' work.  A per-sample
  kernel in one grouped conv (``groups = batch``) was measured 14× slower than the stacked kernel and 23×
  slower than ``slices`` on a CPU (BENCHMARKS.md §6) and is not offered.  No kernel loops over samples.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .branches import LoRAGroup
from .layer import AdaptedLayer, soft_gates
from .routing import Route, RouteContext


class AdaptedConv2d(AdaptedLayer):
    def __init__(self, base: nn.Conv2d, name: str, context: RouteContext) -> None:
        if type(base) is not nn.Conv2d:  # timm's Conv2dSame & co. pad in their own forward
            raise ValueError(f"{name}: {type(base).__name__} is not a plain nn.Conv2d; LoRA adapts nn.Conv2d only")
        if base.padding_mode != "zeros":
            raise ValueError(f"{name}: padding_mode {base.padding_mode!r} is not supported (zeros only)")
        super().__init__(base, name, context)

    @property
    def rank_factor(self) -> int:
        return self.base.kernel_size[0]

    @property
    def in_features(self) -> int:
        return self.base.in_channels // self.base.groups * self.base.kernel_size[1]

    @property
    def out_features(self) -> int:
        return self.base.out_channels * self.base.kernel_size[0]

    def to_weight_shape(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.reshape(*delta.shape[:-2], *self.base.weight.shape)

    def _stacked(self, group: LoRAGroup, dtype: torch.dtype) -> torch.Tensor:
        """Every branch's scaled ``ΔW`` ``[n, C_out, C_in/g, k, k]`` in ``dtype``."""
        a, b = group.factors()
        return self.to_weight_shape((b @ a) * group.scale.view(-1, 1, 1)).to(dtype)

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        base = self.base
        return F.conv2d(x, weight, bias, base.stride, base.padding, base.dilation, base.groups * groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, ctx = self.base, self.context
        if ctx.merged:  # deltas already folded into W
            return base(x)
        route, weight = ctx.route, base.weight
        mixed: list[tuple[LoRAGroup, torch.Tensor]] = []  # groups whose branch differs per sample, with gates
        for group in self.groups.values():
            if group.routing == "always":  # every branch fires
                weight = weight + self._stacked(group, weight.dtype).sum(0)
            elif group.routing == "soft":
                mixed.append((group, soft_gates(group, route)))
            elif route.index is not None:  # one task for the batch: a tensor index, one graph for every task
                weight = weight + self._stacked(group, weight.dtype).index_select(0, route.index)[0]
            elif route.task_ids is not None:
                one_hot = route.task_ids.unsqueeze(1) == torch.arange(group.n, device=route.task_ids.device)
                mixed.append((group, one_hot.to(group.scale.dtype)))
        if not mixed:
            return self._conv(x, weight, base.bias)
        if route.strategy == "slices" and all(g.routing == "task" for g, _ in mixed):
            return self._slices(x, weight, [g for g, _ in mixed], route)
        return self._masked(x, weight, mixed)

    def _slices(self, x: torch.Tensor, weight: torch.Tensor, groups: list[LoRAGroup], route: Route) -> torch.Tensor:
        stacks = [self._stacked(g, weight.dtype) for g in groups]
        parts = [self._conv(x[i:j], weight + sum(s[t] for s in stacks), self.base.bias) for t, i, j in route.segments]
        return torch.cat(parts)

    def _masked(self, x: torch.Tensor, weight: torch.Tensor, mixed: list) -> torch.Tensor:
        y = self._conv(x, weight, self.base.bias)
        g = self.base.groups  # a grouped conv's output channels come group-major: experts go inside each group
        for group, gates in mixed:
            stack = self._stacked(group, weight.dtype)  # [E, C_out, …]: one conv through every expert
            n, out = stack.shape[:2]
            stack = stack.reshape(n, g, out // g, *stack.shape[2:]).transpose(0, 1).reshape(n * out, *stack.shape[2:])
            z = self._conv(x, stack, None)
            z = (
                z.view(z.shape[0], g, n, out // g, *z.shape[2:])
                .transpose(1, 2)
                .reshape(z.shape[0], n, out, *z.shape[2:])
            )
            y = y + (z * gates.to(z.dtype).view(*gates.shape, 1, 1, 1)).sum(1)
        return y
