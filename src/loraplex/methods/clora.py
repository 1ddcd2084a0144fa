"""CLoRA (Liu, Zhu, Huang, arXiv 2512.24603): collaborative low-rank adaptation — bases shared by every low-rank
module (LRM) of one shape, each module owning only small coefficient matrices, and the SADE regulariser.

``ΔW_j = Σ_{h=1..p} B_h Q_h^j A_h`` (our column convention; the paper's ``D_h Q_h^j U_h``) with ``p`` pairs of bases
``A_h`` (``r × d``), ``B_h`` (``d × r``) per shape group (:class:`~loraplex.core.branches.BasisBank`) and each
module's ``Q_h^j`` (``r × r``): ``(2dr + m r²)·p`` trainable values for ``m`` modules against ``2drm`` for LoRA, and
rank up to ``p·r``.  Input-independent, so it merges into ``W`` and exports as a PEFT LoRA of rank ``p·r``.

Choices (the paper has no public code):

* **Sites**: the d×d modules of the paper — the q and v rows of every block's fused qkv (``attn.qkv.q``,
  ``attn.qkv.v``: 24 modules on ViT-B); any targets may be given, one bank per module shape.
* **Initialisation**: bases Kaiming-uniform, coefficients zero, so ``ΔW = 0`` at the start and every factor gets
  gradient from the first update of the coefficients on.
* **CLoRA#** (the ablation: nothing module-specific) is ``coefficients: shared`` — one ``Q`` in the bank;
  **ARC** (Dong et al., NeurIPS 2023) is ``bases: 1, tied: true, coefficients: diagonal`` — ``B = Aᵀ`` and a
  diagonal ``Q`` per module (square sites only).
* **SADE** (``sade`` = λ): the representations ``z_h = M_h x`` of the bases' contributions ``M_h = B_h Q_h A_h``
  should stay diverse.  The sample-dependent form decorrelates them over a layer's inputs ``X``:
  ``Σ_{h≠k} ‖Z_hᵀ Z_k‖²_F / (‖Z_h‖²_F ‖Z_k‖²_F)`` — a squared cosine between the two maps' outputs, in [0, 1].
  The sample-agnostic form replaces ``XᵀX`` by the identity: ``Σ_{h≠k} ‖M_h M_kᵀ‖²_F / (‖M_h‖²_F ‖M_k‖²_F)``,
  computed from ``r × r`` products of the weights alone (:func:`sade_weights`); both are averaged over the
  modules and the ordered pairs ``h ≠ k``.  Training uses the weight form (the paper's); :func:`sade_samples`
  is there to measure what it saves (``benchmarks/few_shot.py --sade-cost``).  With ``p = 1`` there is no pair:
  SADE is 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..core.branches import BasisBank, LoRAGroup
from ..core.inject import GroupSpec
from ..core.model import AdaptedModel
from .registry import AdapterPlan, MethodConfig, register

QV_TARGETS = ("attn.qkv.q", "attn.qkv.v")
EPS = 1e-12


@dataclass
class CLoRAConfig(MethodConfig):
    """``bases`` = p pairs per shape group, ``rank`` = r of each; ``coefficients``: each module's own (CLoRA),
    ``shared`` (CLoRA#) or ``diagonal`` (ARC, with ``tied``); ``sade`` = λ of the weight-only SADE."""

    target_modules: list[str] | str = field(default_factory=lambda: list(QV_TARGETS))
    rank: int = 8
    bases: int = 1
    coefficients: Literal["module", "shared", "diagonal"] = "module"
    tied: bool = False
    alpha: float | None = None
    sade: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.bases, int) and self.bases >= 1):
            raise ValueError(f"config key 'bases' (p, pairs of shared bases) must be an int ≥ 1, got {self.bases!r}")
        if self.coefficients not in ("module", "shared", "diagonal"):
            raise ValueError(
                f"config key 'coefficients' must be 'module', 'shared' or 'diagonal', got {self.coefficients!r}"
            )
        if self.sade < 0:
            raise ValueError(f"config key 'sade' (λ) must be ≥ 0, got {self.sade}")


def bank_modules(model: AdaptedModel) -> dict[str, tuple[BasisBank, list[LoRAGroup]]]:
    """Each bank of the model with the groups (modules) built from it."""
    found: dict[str, tuple[BasisBank, list[LoRAGroup]]] = {}
    names = {id(bank): key for key, bank in model.banks.items()}
    for layer in model.adapted_layers().values():
        for group in layer.groups.values():
            if group.bank is not None:
                found.setdefault(names[id(group.bank)], (group.bank, []))[1].append(group)
    return found


def sade_weights(bank: BasisBank, q: torch.Tensor) -> torch.Tensor:
    """Sample-agnostic SADE of the modules ``q`` (``[m, p, r, r]``) built from ``bank``: the mean over modules and
    ordered pairs ``h ≠ k`` of ``‖M_h M_kᵀ‖²_F / (‖M_h‖²_F ‖M_k‖²_F)``, from ``r × r`` products only."""
    p = bank.size
    if p < 2:
        return q.new_zeros(())
    a, b = bank.A, bank.up()
    gram_a = torch.einsum("hri,ksi->hkrs", a, a)  # A_h A_kᵀ
    gram_b = torch.einsum("hor,hos->hrs", b, b)  # B_hᵀ B_h
    own_a = gram_a[torch.arange(p), torch.arange(p)]  # A_h A_hᵀ
    # P_hk = Q_h (A_h A_kᵀ) Q_kᵀ, so M_h M_kᵀ = B_h P_hk B_kᵀ and ‖·‖² = tr(P_hkᵀ B_hᵀB_h P_hk B_kᵀB_k)
    pair = torch.einsum("mhab,hkbc,mkdc->mhkad", q, gram_a, q)
    cross = torch.einsum("mhkba,hbc,mhkcd,kda->mhk", pair, gram_b, pair, gram_b)
    norm = torch.einsum("mhba,hbc,mhcd,hda->mh", q, gram_b, q, own_a)  # ‖M_h‖² = tr(Q_hᵀ B_hᵀB_h Q_h A_hA_hᵀ)
    return _mean_off_diagonal(cross / (norm.unsqueeze(2) * norm.unsqueeze(1) + EPS))


def sade_samples(bank: BasisBank, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The sample-dependent SADE it stands in for: the same ratio over the bases' outputs ``Z_h = X M_hᵀ`` on a
    layer's inputs ``x`` (``[m, N, in]``, each module's own): ``‖Z_hᵀ Z_k‖²_F / (‖Z_h‖²_F ‖Z_k‖²_F)``."""
    if bank.size < 2:
        return q.new_zeros(())
    z = torch.einsum("mni,hri,mhsr,hos->mhno", x, bank.A, q, bank.up())  # Z_h = X A_hᵀ Q_hᵀ B_hᵀ
    cross = torch.einsum("mhno,mknp->mhkop", z, z).square().sum((-1, -2))  # ‖Z_hᵀ Z_k‖²_F
    norm = z.square().sum((-1, -2))
    return _mean_off_diagonal(cross / (norm.unsqueeze(2) * norm.unsqueeze(1) + EPS))


def _mean_off_diagonal(ratio: torch.Tensor) -> torch.Tensor:
    p = ratio.shape[-1]
    off = ~torch.eye(p, dtype=torch.bool, device=ratio.device)
    return ratio[:, off].mean()


def sade_loss(model: AdaptedModel) -> torch.Tensor:
    """Weight-only SADE over every bank of the model (mean over banks)."""
    terms = []
    for bank, groups in bank_modules(model).values():
        q = torch.cat([g.coefficients().flatten(0, 1) for g in groups])
        terms.append(sade_weights(bank, q))
    if not terms:
        raise ValueError("SADE regularises the contributions of shared bases: this model has no basis bank")
    return torch.stack(terms).mean()


def clora_regulariser(config: CLoRAConfig, model: AdaptedModel) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """``λ · L_SADE`` (logged as ``sade``), or nothing when λ = 0."""
    if config.sade == 0:
        return None, {}
    value = sade_loss(model)
    return config.sade * value, {"sade": value.detach()}


@register("clora", CLoRAConfig, regulariser=clora_regulariser)
def clora(cfg: CLoRAConfig) -> AdapterPlan:
    """p pairs of bases shared by every module of one shape, each module owning p r×r coefficients (CLoRA); one
    shared Q (CLoRA#) or tied, diagonal (ARC) as options."""
    group = GroupSpec(
        "clora",
        "always",
        rank=cfg.rank,
        alpha=cfg.alpha,
        bank_size=cfg.bases,
        bank_coefficients=cfg.coefficients,
        bank_tied=cfg.tied,
    )
    return AdapterPlan([group], cfg.target_modules, cfg.blocks, cfg.modules_to_save)
