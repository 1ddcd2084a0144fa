"""Low-rank factor containers.

A :class:`LoRAGroup` holds ``n`` branches of one kind on one layer, **stacked**: ``A: [n, r, in]``,
``B: [n, out, r]`` (n = 1 for a shared LoRA, n = tasks for task-specific LoRAs, n = E for experts).
Whatever stores the factors — private parameters, coordinates in a subspace, a fixed down-projection,
or a :class:`BasisBank` shared across layers — :meth:`LoRAGroup.factors` returns plain stacked
effective factors, so routing, merging and export work on every kind alike.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .subspace import Subspace

Routing = Literal["always", "task", "soft"]
Init = Literal["lora", "gaussian", "zeros"]


class BasisBank(nn.Module):
    """CLoRA's bases shared by every low-rank module of one shape: ``p`` pairs ``(A_h, B_h)``.

    In our column convention (``y = W x``) the paper's ``ΔW_j = Σ_h D_h Q_h^j U_h`` (row-vector
    convention) reads ``ΔW_j = Σ_h B_h Q_h^jᵀ A_h`` with ``A_h = D_hᵀ`` (``r × in``) and
    ``B_h = U_hᵀ`` (``out × r``); each module only owns its ``Q^j`` (``p × r × r``).  Both bases are
    initialised non-zero (Kaiming-uniform, as LoRA's ``A``) and the module coefficients at zero, so
    every ΔW starts at 0 while every factor still receives gradient after the first step.
    """

    def __init__(self, size: int, rank: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.size, self.rank = size, rank
        self.A = nn.Parameter(torch.empty(size, rank, in_features))
        self.B = nn.Parameter(torch.empty(size, out_features, rank))
        for h in range(size):
            nn.init.kaiming_uniform_(self.A[h], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.B[h], a=math.sqrt(5))


class LoRAGroup(nn.Module):
    """``n`` stacked low-rank branches of one layer sharing rank, routing, dropout and constraints.

    ``scale`` is a buffer ``[n]`` (``alpha / r`` by default, a constant where a method says so).
    ``routing`` says who fires: ``always`` (shared), ``task`` (the route's task per sample) or
    ``soft`` (the route's gate weights).
    """

    def __init__(
        self,
        n: int,
        rank: int,
        in_features: int,
        out_features: int,
        *,
        routing: Routing,
        scale: float | list[float],
        dropout: float = 0.0,
        init: Init = "lora",
        output_space: Subspace | None = None,
        input_space: Subspace | None = None,
        train_A: bool = True,
        bank: BasisBank | None = None,
    ) -> None:
        super().__init__()
        if routing not in ("always", "task", "soft"):
            raise ValueError(f"unknown routing {routing!r}; choose 'always', 'task' or 'soft'")
        self.n, self.routing = n, routing
        self.in_features, self.out_features = in_features, out_features
        self.output_space, self.input_space = output_space, input_space
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        scales = [float(scale)] * n if isinstance(scale, int | float) else [float(s) for s in scale]
        self.register_buffer("scale", torch.tensor(scales))
        self._bank = [bank] if bank is not None else []  # referenced, not owned: the model owns banks
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        if bank is not None:
            self.rank = bank.rank * bank.size
            self.Q = nn.Parameter(torch.zeros(n, bank.size, bank.rank, bank.rank))
            return
        self.rank = rank
        a_cols = input_space.coordinate_dim() if input_space is not None else in_features
        b_rows = output_space.coordinate_dim() if output_space is not None else out_features
        a = torch.empty(n, rank, a_cols)
        b = torch.zeros(n, b_rows, rank)
        if init == "lora":
            for i in range(n):
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(a, std=1.0 / rank)
        elif init == "zeros":
            a.zero_()
        else:
            raise ValueError(f"unknown init {init!r}; choose 'lora', 'gaussian' or 'zeros'")
        if train_A:
            self.A = nn.Parameter(a)
        else:  # InfLoRA: a fixed down-projection, set from feature statistics, never trained
            self.register_buffer("A", a)
        self.B = nn.Parameter(b)

    @property
    def bank(self) -> BasisBank | None:
        return self._bank[0] if self._bank else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective stacked factors ``(A [n, R, in], B [n, out, R])`` after bank and constraints.

        Built factors (bank products, subspace projections) are cached while gradients are off: evaluation
        rebuilds them only when a tensor they come from has changed (its storage or its version)."""
        sources = self._sources()
        if not sources or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._build()
        # a source changes by an in-place write (its version) or by getting other storage (``.data =``, ``.to``)
        key = tuple((t.untyped_storage()._cdata, t._version, t.dtype, t.device) for t in sources)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._build())
        return self._cache[1]

    def _sources(self) -> list[torch.Tensor]:
        """What built factors are made from; empty for plain pairs, which need no building."""
        bank = self.bank
        spaces = [s.basis for s in (self.input_space, self.output_space) if s is not None]
        if bank is None and not spaces:
            return []
        factors = [self.Q, bank.A, bank.B] if bank is not None else [self.A, self.B]
        return factors + spaces

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.bank
        if bank is not None:
            p, r = bank.size, bank.rank
            a = bank.A.reshape(1, p * r, -1).expand(self.n, -1, -1)
            # B_eff[:, :, h*r:(h+1)*r] = B_h @ Q_h  for every branch
            b = torch.einsum("hor,nhrs->nohs", bank.B, self.Q).reshape(self.n, -1, p * r)
        else:
            a, b = self.A, self.B
        if self.input_space is not None:
            a = self.input_space.project_rows(a)
        if self.output_space is not None:
            b = self.output_space.project_columns(b)
        return a, b

    def delta_weight(self, branch: int) -> torch.Tensor:
        """``s_i B_i A_i`` (``out × in``) of one branch."""
        a, b = self.factors()
        return self.scale[branch] * (b[branch] @ a[branch])

    def extra_repr(self) -> str:
        kind = "bank" if self.bank is not None else "pairs"
        return f"n={self.n}, rank={self.rank}, routing={self.routing}, {kind}"
