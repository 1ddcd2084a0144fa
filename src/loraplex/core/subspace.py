"""Subspaces a low-rank factor may live in.

Two sides, one mechanism (:class:`Subspace`):

* **output side** (seed 000): ``B`` confined to the column space ``span(U_c)`` or the left null space
  ``span(U_⊥)`` of the frozen ``W`` — bases from a thin SVD of ``W`` (:func:`weight_subspaces`);
* **input side** (GPM, InfLoRA, DualLoRA): ``A`` confined to the span of a feature memory, or to its
  orthogonal complement — bases from a :class:`FeatureMemory`.

Two forms: **coordinates** (the factor is ``basis @ C`` with ``C`` trained, fewer parameters) and
**projection** (the factor is ``P F`` with the full-size ``F`` trained; the paper-style parameter count).
A complement is always applied as ``x - M (Mᵀ x)``, which stays exact when the memory grows, so it
is projection-only.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Form = Literal["coordinates", "projection"]
TruncationK = int | float | None


def numerical_rank_k(singular_values: torch.Tensor, shape: tuple[int, int], k: TruncationK) -> int:
    """Resolve a truncation spec: ``None`` numerical rank, ``int`` fixed k, ``float`` energy fraction."""
    if k is None:
        tol = max(shape) * torch.finfo(torch.float32).eps * singular_values.max()
        return int((singular_values > tol).sum())
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"an energy fraction k must lie in (0, 1], got {k}")
        energy = singular_values.double().square().cumsum(0)
        return int(torch.searchsorted(energy, k * energy[-1]).item()) + 1
    if not 0 <= k <= min(shape):
        raise ValueError(f"truncation k={k} is outside [0, {min(shape)}] for a {shape[0]}×{shape[1]} weight")
    return int(k)


def factor_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of what is built beside a frozen ``W``: its own, but never below fp32 (a backbone held in bf16
    keeps fp32 bases and factors)."""
    return torch.promote_types(weight.dtype, torch.float32)


def weight_subspaces(weight: torch.Tensor, k: TruncationK = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_c, U_⊥)``: orthonormal bases of the column space (first k left singular vectors) and of
    the rest of the output space, from a full SVD of ``W`` (``out × in``) in float64."""
    u, kk = _left_singular(weight, k, full=True)
    dtype = factor_dtype(weight)
    return u[:, :kk].to(dtype).contiguous(), u[:, kk:].to(dtype).contiguous()


def column_space(weight: torch.Tensor, k: TruncationK = None) -> torch.Tensor:
    """``U_c`` alone, from a thin SVD: enough wherever the rest is used only as a complement, and much
    cheaper than the full SVD on tall layers (ViT-B's qkv: 2304×768)."""
    u, kk = _left_singular(weight, k, full=False)
    return u[:, :kk].to(factor_dtype(weight)).contiguous()


def _left_singular(weight: torch.Tensor, k: TruncationK, full: bool) -> tuple[torch.Tensor, int]:
    u, s, _ = torch.linalg.svd(weight.detach().double(), full_matrices=full)
    return u, numerical_rank_k(s, tuple(weight.shape), k)


class Subspace(nn.Module):
    """A fixed orthonormal ``basis`` (``[dim, m]``, or ``[n, dim, m]`` per branch) and whether the
    allowed space is its span or its orthogonal complement.

    ``rebuilt``: the basis is a function of the frozen weights, recomputed whenever the model is built, so
    adapter files do not carry it.  Only a projection qualifies: it depends on the span alone, which the
    weights fix, while coordinates are tied to the very basis vectors an SVD happened to return."""

    def __init__(
        self, basis: torch.Tensor, complement: bool = False, form: Form = "projection", rebuilt: bool = False
    ) -> None:
        super().__init__()
        if form not in ("coordinates", "projection"):
            raise ValueError(f"unknown subspace form {form!r}; choose 'coordinates' or 'projection'")
        if complement and form == "coordinates":
            raise ValueError("a complement subspace only has the 'projection' form")
        if rebuilt and form == "coordinates":
            raise ValueError("a coordinate-form basis is part of what was trained: it cannot be rebuilt")
        self.complement = complement
        self.form = form
        self.rebuilt = rebuilt
        self.register_buffer("basis", basis.contiguous())

    @property
    def ambient_dim(self) -> int:
        return int(self.basis.shape[-2])

    @property
    def dim(self) -> int:
        """Dimension of the allowed space."""
        m = int(self.basis.shape[-1])
        return self.ambient_dim - m if self.complement else m

    def coordinate_dim(self) -> int:
        return int(self.basis.shape[-1]) if self.form == "coordinates" else self.ambient_dim

    def project_columns(self, f: torch.Tensor) -> torch.Tensor:
        """Map a stacked factor ``[n, dim, r]`` (coordinates ``[n, m, r]``) into the allowed space."""
        u = self.basis
        if self.form == "coordinates":
            return u @ f
        inside = u @ (u.transpose(-1, -2) @ f)
        return f - inside if self.complement else inside

    def project_rows(self, f: torch.Tensor) -> torch.Tensor:
        """Same for a row factor ``[n, r, dim]`` (coordinates ``[n, r, m]``): ``f Pᵀ``."""
        return self.project_columns(f.transpose(-1, -2)).transpose(-1, -2)

    def set_basis(self, basis: torch.Tensor | list[torch.Tensor]) -> None:
        """Replace the basis (e.g. after a feature memory grew); the factor shapes must not change.

        A list gives one basis per branch (DualLoRA's per-task ``U_t``, of different widths); they
        are stacked with zero columns, which change no projection."""
        if isinstance(basis, list):
            width = max((b.shape[-1] for b in basis), default=0)
            basis = torch.stack([nn.functional.pad(b, (0, width - b.shape[-1])) for b in basis])
        if self.form == "coordinates" and basis.shape != self.basis.shape:
            raise ValueError("a coordinate-form basis cannot change size once its factor is trained")
        if basis.shape[-2] != self.ambient_dim:
            raise ValueError(f"a basis for this subspace needs {self.ambient_dim} rows, got {basis.shape[-2]}")
        self.basis = basis.to(self.basis).contiguous()


class Relevance(nn.Module):
    """Feature-similarity gates for a stack of per-task branches whose ``A`` lives in each task's own input bases
    ``U_t`` (DualLoRA's dynamic memory): when no task is given, each row of a layer input ``x`` weighs branch ``t``
    by how much of its energy lies in ``U_t``, relative to what that task's own inputs put there.

    ``score_t(x) = log( (‖U_tᵀ x‖² / ‖x‖²) / μ_t )`` with ``μ_t`` (``norm``) the same fraction over task ``t``'s
    own inputs, so a task's inputs score about 0 on its own bases wherever the bases lie; the gates are
    ``softmax_t(score_t / temperature)`` over the tasks learned so far (``μ_t > 0``; a task whose bases are empty is
    never chosen; an infinite temperature weighs every learned task alike).  A row is a sample's [CLS] token
    (``cls_only``) or all its tokens together.  Everything stays on
    the device, no host read: a compiled forward keeps one graph.  ``last`` keeps the latest scores while
    ``recording`` is on (task-identity prediction averages them over layers)."""

    def __init__(self, n: int, cls_only: bool = True, temperature: float = 0.1) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"a relevance temperature must be > 0, got {temperature}")
        self.cls_only, self.temperature = cls_only, temperature
        self.register_buffer("norm", torch.zeros(n))
        self.recording = False
        self.last: torch.Tensor | None = None

    def scores(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """``[rows, n]`` log relevance of each row of ``x`` (``[rows, tokens, in]`` or ``[rows, in]``) to each
        task's bases ``[n, in, m]``; ``-inf`` for tasks not learned."""
        if basis.dim() == 2:  # one basis for every branch (before per-task bases are set)
            basis = basis.expand(self.norm.shape[0], *basis.shape)
        rows = x[:, 0] if self.cls_only and x.dim() == 3 else x
        rows = rows.to(basis.dtype)
        captured = torch.einsum("r...i,nim->rn...m", rows, basis).square().sum(-1)  # [rows, n(, tokens)]
        total = rows.square().sum(-1)
        if captured.dim() == 3:  # all tokens of a row together
            captured, total = captured.sum(-1), total.sum(-1)
        fraction = captured / total.clamp_min(torch.finfo(total.dtype).tiny).unsqueeze(1)
        learned = self.norm > 0
        score = torch.log(fraction.clamp_min(1e-12) / torch.where(learned, self.norm, 1.0).to(fraction.dtype))
        return score.masked_fill(~learned, float("-inf"))

    def gates(self, x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        score = self.scores(x, basis)
        if self.recording:
            self.last = score
        if math.isinf(self.temperature):
            score = torch.where(torch.isinf(score), score, torch.zeros_like(score))
            return torch.softmax(score, dim=1).nan_to_num(0.0)
        return torch.softmax(score / self.temperature, dim=1).nan_to_num(0.0)  # no task learned: all zero

    def extra_repr(self) -> str:
        return f"tokens={'cls' if self.cls_only else 'all'}, temperature={self.temperature}"


NOISE_ENERGY = 1e-13
"""A direction holding less than this share of a task's input energy is taken for rounding noise."""


class FeatureMemory:
    """GPM-style memory of the input subspace a layer has seen (Saha & Roy, ICLR 2021).

    Inputs are accumulated as an uncentred covariance ``C = Σ x xᵀ`` (streaming, ``dim × dim``), so
    any number of tokens can be observed.  :meth:`grow` adds, after each task, the fewest new
    directions (orthogonal to the memory) such that the memory retains ``threshold`` of that task's
    input energy: ``‖Mᵀ X‖² + Σ_{i≤k} σ_i² ≥ ε ‖X‖²`` with σ from the residual ``(I − M Mᵀ) X``.
    The per-task bases are kept too (DualLoRA needs ``U_t`` beside ``M = [U_1 … U_t]``).  Statistics and
    bases live on the device of the inputs observed (a GPU run never copies activations to the host).

    ``energy="covariance"`` is InfLoRA's variant (its code runs GPM's rule on the input covariance ``C`` as if it
    were the representation matrix): every rule above then reads ``C²`` for ``C`` — the energy of a direction is
    its squared covariance eigenvalue, and :meth:`residual_directions` are the left singular vectors of
    ``(I − M Mᵀ) C``, InfLoRA's design matrix for a new task's down-projection.
    """

    def __init__(self, dim: int, cls_only: bool = False, energy: Literal["inputs", "covariance"] = "inputs") -> None:
        if energy not in ("inputs", "covariance"):
            raise ValueError(f"unknown memory energy {energy!r}; choose 'inputs' (GPM) or 'covariance' (InfLoRA)")
        self.dim = dim
        self.cls_only = cls_only
        self.energy = energy
        self.basis = torch.zeros(dim, 0, dtype=torch.float64)
        self.task_bases: list[torch.Tensor] = []
        self.reset_statistics()

    def reset_statistics(self) -> None:
        self.covariance = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.basis.device)
        self.count = 0

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Accumulate a layer input ``[L, ..., dim]``; with ``cls_only`` just the first token."""
        if self.cls_only and x.dim() >= 3:
            x = x[:, 0]
        flat = x.reshape(-1, self.dim).double()
        if self.covariance.device != flat.device:  # follow the model: move what is kept, once
            self.basis = self.basis.to(flat.device)
            self.covariance = self.covariance.to(flat.device)
        self.covariance += flat.T @ flat
        self.count += flat.shape[0]

    def _residual_eigen(self) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        m = self.basis
        c = self.covariance if self.energy == "inputs" else self.covariance @ self.covariance
        projector = torch.eye(self.dim, dtype=c.dtype, device=c.device) - m @ m.T
        residual = projector @ c @ projector
        evals, evecs = torch.linalg.eigh(residual)
        order = evals.flip(0).clamp_min(0)
        return order, evecs.flip(1), float(c.trace()), float((m.T @ c @ m).trace())

    def residual_directions(self, rank: int) -> torch.Tensor:
        """Top-``rank`` directions of the observed inputs outside the memory (InfLoRA's fixed ``A``), ``[dim, rank]``;
        a rank beyond the room the memory leaves is an error."""
        room = self.dim - self.basis.shape[1]
        if rank > room:
            raise ValueError(
                f"rank {rank} does not fit: the memory holds {self.basis.shape[1]} of {self.dim} input directions, "
                f"leaving {room}; lower the rank or the memory threshold"
            )
        _, evecs, _, _ = self._residual_eigen()
        return evecs[:, :rank].float()

    def grow(self, threshold: float) -> torch.Tensor:
        """Add this task's new directions; returns the task basis ``U_t`` and resets statistics."""
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"memory energy threshold must lie in (0, 1], got {threshold}")
        if self.count == 0:
            raise RuntimeError("FeatureMemory.grow() called before any input was observed")
        evals, evecs, total, kept = self._residual_eigen()
        k = 0
        if kept < threshold * total:
            cumulative = kept + evals.cumsum(0)
            k = int(torch.searchsorted(cumulative, cumulative.new_tensor(threshold * total)))
            # never past the residual's numerical rank: directions the inputs do not have (rounding noise) would
            # fill the memory at a threshold of 1 and leave later tasks no room
            signal = int((evals > NOISE_ENERGY * total).sum())
            k = min(k + 1, signal, self.dim - self.basis.shape[1])
        new = evecs[:, :k]
        self.task_bases.append(new.float())
        self.basis = torch.cat([self.basis, new], dim=1)
        self.reset_statistics()
        return new.float()

    @property
    def memory(self) -> torch.Tensor:
        return self.basis.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The memory and the per-task bases (statistics are per task and not kept)."""
        return {"basis": self.basis, **{f"task{t}": b for t, b in enumerate(self.task_bases)}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        basis = state["basis"]
        if basis.dim() != 2 or basis.shape[0] != self.dim:
            raise ValueError(f"a memory of {self.dim}-dim inputs cannot hold a basis of shape {tuple(basis.shape)}")
        self.basis = basis.to(torch.float64)
        self.task_bases = [state[f"task{t}"].float() for t in range(sum(k.startswith("task") for k in state))]
        self.reset_statistics()
