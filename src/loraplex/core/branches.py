"""Low-rank factor containers.

A :class:`LoRAGroup` holds ``n`` branches of one kind on one layer, **stacked**: ``A: [n, r, in]``,
``B: [n, out, r]`` (n = 1 for a shared LoRA, n = tasks for task-specific LoRAs, n = E for experts).
Whatever stores the factors — private parameters, coordinates in a subspace, a fixed down-projection,
a :class:`BasisBank` shared across layers, or separate LoRAs on row blocks of a fused projection (the
q / k / v thirds of timm's ``attn.qkv``) — :meth:`LoRAGroup.factors` returns plain stacked effective
factors, so routing, merging and export work on every kind alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .subspace import Relevance, Subspace

Routing = Literal["always", "task", "soft"]
Init = Literal["lora", "gaussian", "zeros"]


Coefficients = Literal["module", "shared", "diagonal"]


class BasisBank(nn.Module):
    """CLoRA's bases shared by every low-rank module of one shape: ``p`` pairs ``(A_h, B_h)``.

    In our column convention (``y = W x``) the paper's ``ΔW_j = Σ_h D_h Q_h^j U_h`` (row-vector
    convention) reads ``ΔW_j = Σ_h B_h Q_h^jᵀ A_h`` with ``A_h = D_hᵀ`` (``r × in``) and
    ``B_h = U_hᵀ`` (``out × r``); each module only owns its ``Q^j`` (``p × r × r``).  Both bases are
    initialised non-zero (Kaiming-uniform, as LoRA's ``A``) and the module coefficients at zero, so
    every ΔW starts at 0 while every factor still receives gradient after the first step.

    Two variants of the same code: ``coefficients="shared"`` keeps one ``Q`` in the bank for every module
    (CLoRA#, the paper's ablation: nothing module-specific), and ``tied`` makes ``B_h = A_hᵀ`` (ARC, Dong et al.
    2023, with ``p = 1`` and diagonal coefficients; square modules only).
    """

    def __init__(
        self, size: int, rank: int, in_features: int, out_features: int, *, tied: bool = False,
        coefficients: Coefficients = "module",
    ) -> None:  # fmt: skip
        super().__init__()
        if coefficients not in ("module", "shared", "diagonal"):
            raise ValueError(f"unknown bank coefficients {coefficients!r}; choose 'module', 'shared' or 'diagonal'")
        if tied and in_features != out_features:
            raise ValueError(f"a tied bank (B = Aᵀ, ARC) needs square modules; these are {out_features}×{in_features}")
        self.size, self.rank, self.tied, self.coefficients = size, rank, tied, coefficients
        self.A = nn.Parameter(torch.empty(size, rank, in_features))
        for h in range(size):
            nn.init.kaiming_uniform_(self.A[h], a=math.sqrt(5))
        if not tied:
            self.B = nn.Parameter(torch.empty(size, out_features, rank))
            for h in range(size):
                nn.init.kaiming_uniform_(self.B[h], a=math.sqrt(5))
        if coefficients == "shared":
            self.Q = nn.Parameter(torch.zeros(size, rank, rank))

    def up(self) -> torch.Tensor:
        """The up-projections ``[p, out, r]`` (``Aᵀ`` when tied)."""
        return self.A.transpose(1, 2) if self.tied else self.B


class LoRAGroup(nn.Module):
    """``n`` stacked low-rank branches of one layer sharing rank, routing, dropout and constraints.

    ``scale`` is a buffer ``[n]`` (``alpha / r`` by default, a constant where a method says so).
    ``routing`` says who fires: ``always`` (every branch: ``ΔW = Σ_i s_i B_i A_i``), ``task`` (the route's
    task per sample) or ``soft`` (the route's gate weights).

    ``row_slices`` makes each branch ``S`` separate LoRAs of rank ``r``, one per block of output rows
    ``(start, stop)`` (all of one size ``d``): ``A`` is ``[n, S·r, in]`` and ``B`` the compact ``[n, S, d, r]``
    (``S·r·(in + d)`` trained values per branch), and :meth:`factors` places each ``B_s`` in its rows and its
    own ``r`` columns of an effective ``B: [n, out, S·r]`` — zeros elsewhere, so ``B A`` is exactly the sum of
    the ``S`` row-block updates and every kernel, merge and export reads it as one LoRA of rank ``S·r``.
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
        row_slices: Sequence[tuple[int, int]] | None = None,
        relevance: Relevance | None = None,
    ) -> None:
        super().__init__()
        if routing not in ("always", "task", "soft"):
            raise ValueError(f"unknown routing {routing!r}; choose 'always', 'task' or 'soft'")
        if relevance is not None and (routing != "task" or input_space is None or input_space.complement):
            raise ValueError("relevance gates need task-routed branches confined to their tasks' own input bases")
        # DualLoRA's dynamic memory: without a task, each branch fires with its input's relevance to its bases
        self.relevance = relevance
        self.n, self.routing = n, routing
        self.in_features, self.out_features = in_features, out_features
        self.output_space, self.input_space = output_space, input_space
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        scales = [float(scale)] * n if isinstance(scale, int | float) else [float(s) for s in scale]
        self.register_buffer("scale", torch.tensor(scales))
        # which branches train_only leaves trainable (read only while it is set); not state: never saved
        self.register_buffer("branch_mask", torch.ones(n, dtype=torch.bool), persistent=False)
        self._only: int | None = None
        self._masked = False  # what the forward reads: a bool, so a compiled graph serves every trained branch
        self._bank = [bank] if bank is not None else []  # referenced, not owned: the model owns banks
        self._cache: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.row_slices = _checked_slices(row_slices, out_features) if row_slices is not None else None
        if self.row_slices is not None and output_space is not None:
            raise ValueError("row-sliced branches cannot be confined to an output subspace")
        if bank is not None:  # one module per row block: each owns its coefficients (none when the bank holds them)
            parts = len(self.row_slices) if self.row_slices is not None else 1
            self.rank = bank.rank * bank.size * parts
            shape = {"module": (bank.rank, bank.rank), "diagonal": (bank.rank,), "shared": None}[bank.coefficients]
            if shape is not None:
                lead = (n, parts) if self.row_slices is not None else (n,)
                self.Q = nn.Parameter(torch.zeros(*lead, bank.size, *shape))
            return
        a_cols = input_space.coordinate_dim() if input_space is not None else in_features
        if self.row_slices is None:
            self.rank = rank
            b_rows = output_space.coordinate_dim() if output_space is not None else out_features
            b = torch.zeros(n, b_rows, rank)
        else:  # compact: each row block's own B_s [d, r]
            start, stop = self.row_slices[0]
            self.rank = rank * len(self.row_slices)
            b = torch.zeros(n, len(self.row_slices), stop - start, rank)
        a = torch.empty(n, self.rank, a_cols)
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

    @property
    def trained_branch(self) -> int | None:
        """The branch :meth:`train_only` leaves trainable (None: every branch trains)."""
        return self._only

    def train_only(self, branch: int | None) -> None:
        """Let gradients reach only ``branch``'s factors (None: every branch's again), so a continual method
        trains the current task's branch of a stacked group and leaves the others exactly as they are.

        The other branches' factors are detached inside :meth:`factors` (their gradient is exactly zero) and,
        while this is set, :meth:`no_weight_decay` exempts the group's factors from AdamW's decoupled weight
        decay, which would move them anyway — the trained branch goes without decay too.  Set it before the
        optimizer is built, and build a fresh one after switching branches: Adam's moments would keep moving
        the previous branch.  A bank shared by every branch keeps training; only each branch's ``Q`` is held."""
        if branch is not None and not 0 <= branch < self.n:
            raise ValueError(f"train_only: branch {branch} out of range for a group of {self.n} branches")
        self._only, self._masked = branch, branch is not None
        mask = torch.arange(self.n) == branch if branch is not None else torch.ones(self.n, dtype=torch.bool)
        self.branch_mask.copy_(mask)  # in place: the buffer keeps its device; the index never reaches a graph

    def no_weight_decay(self) -> set[str]:
        """The factor parameters (names relative to this group) that must not decay while :meth:`train_only` is
        set (read by the training loop's optimizer)."""
        if not self._masked:
            return set()
        return {name for name, _ in self.named_parameters(recurse=False)}

    def _held(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (stacked per branch) with every branch but the trained one detached, while train_only is set."""
        if not self._masked:
            return t
        return torch.where(self.branch_mask.view(-1, *[1] * (t.dim() - 1)), t, t.detach())

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
        if bank is None and not spaces and self.row_slices is None:
            return []
        if bank is None:
            return [self.A, self.B, *spaces]
        return [
            t
            for t in (getattr(self, "Q", None), getattr(bank, "Q", None), bank.A, getattr(bank, "B", None))
            if t is not None
        ]

    def coefficients(self) -> torch.Tensor:
        """Every module's full coefficients ``[n, parts, p, r, r]`` (parts: row blocks, 1 without), from its own,
        diagonal or the bank's shared ones."""
        bank = self.bank
        if bank.coefficients == "shared":
            parts = len(self.row_slices) if self.row_slices is not None else 1
            return bank.Q.expand(self.n, parts, *bank.Q.shape)
        q = self._held(self.Q)
        if bank.coefficients == "diagonal":
            q = torch.diag_embed(q)
        return q if self.row_slices is not None else q.unsqueeze(1)

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        bank = self.bank
        if bank is not None:
            p, r = bank.size, bank.rank
            q = self.coefficients()
            parts = q.shape[1]
            a = bank.A.reshape(1, p * r, -1).repeat(1, parts, 1).expand(self.n, -1, -1)
            # B_eff[:, s, :, h*r:(h+1)*r] = B_h @ Q_{s,h}: each module (row block s) from the shared bases
            b = torch.einsum("hor,nshrq->nsohq", bank.up(), q).reshape(self.n, parts, -1, p * r)
            b = self._placed(b) if self.row_slices is not None else b[:, 0]
        else:
            a, b = self._held(self.A), self._held(self.B)
            if self.row_slices is not None:
                b = self._placed(b)
        if self.input_space is not None:
            a = self.input_space.project_rows(a)
        if self.output_space is not None:
            b = self.output_space.project_columns(b)
        return a, b

    def _placed(self, b: torch.Tensor) -> torch.Tensor:
        """The compact ``[n, S, d, r]`` row-block factors as the effective ``[n, out, S·r]``: ``B_s`` in rows
        ``row_slices[s]`` and columns ``s·r … (s+1)·r``, zeros elsewhere."""
        n, count, _, r = b.shape
        full = b.new_zeros(n, self.out_features, count, r)
        for s, (start, stop) in enumerate(self.row_slices):
            full[:, start:stop, s] = b[:, s]
        return full.reshape(n, self.out_features, count * r)

    def concatenated(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every branch side by side along the rank: ``A = [A_1; …; A_n]`` (``[n·R, in]``), ``B = [B_1 … B_n]``
        (``[out, n·R]``) and each rank column's scale (``[n·R]``; a scalar for one branch), so that
        ``B diag(s) A = Σ_i s_i B_i A_i``: what an ``always`` group fires, in one GEMM."""
        a, b = self.factors()
        if self.n == 1:
            return a[0], b[0], self.scale[0]
        n, r = a.shape[0], a.shape[1]
        return a.reshape(n * r, -1), b.permute(1, 0, 2).reshape(b.shape[1], n * r), self.scale.repeat_interleave(r)

    def delta_weight(self, branch: int | None) -> torch.Tensor:
        """``s_i B_i A_i`` (``out × in``) of one branch, or with ``branch=None`` the sum over every branch (what
        an ``always`` group fires)."""
        if branch is None:
            a, b, scale = self.concatenated()
            return (b * scale) @ a
        a, b = self.factors()
        return self.scale[branch] * (b[branch] @ a[branch])

    def extra_repr(self) -> str:
        kind = "bank" if self.bank is not None else "pairs"
        rows = f", rows={list(self.row_slices)}" if self.row_slices is not None else ""
        return f"n={self.n}, rank={self.rank}, routing={self.routing}, {kind}{rows}"


def _checked_slices(slices: Sequence[tuple[int, int]], out_features: int) -> tuple[tuple[int, int], ...]:
    """Row blocks as a tuple (in the given order: block ``s`` is ``B[:, s]``): non-empty, of one size, inside the
    output, not overlapping."""
    found = tuple((int(start), int(stop)) for start, stop in slices)
    ordered = sorted(found)
    sizes = {stop - start for start, stop in found}
    inside = all(0 <= start < stop <= out_features for start, stop in found)
    apart = all(ordered[i][1] <= ordered[i + 1][0] for i in range(len(ordered) - 1))
    if not found or len(sizes) != 1 or not inside or not apart:
        raise ValueError(f"row slices {list(slices)} must be apart, of one size and inside {out_features} rows")
    return found
