"""Find target layers, swap in :class:`AdaptedLinear` / :class:`AdaptedConv2d`, build branch groups, freeze the rest.

Targets use PEFT's vocabulary: a list of module-name suffixes (``"attn.qkv"`` matches
``blocks.3.attn.qkv``) or one regular expression matched against the full name; they may name
``nn.Linear`` and ``nn.Conv2d`` layers.  A listed target may also name a **sub-module** of a fused
projection: ``"attn.qkv.k"`` is the k third of the output rows of ``attn.qkv`` (timm's order q, k, v), and
each such part of a layer gets its own LoRA (:class:`LoRAGroup`'s ``row_slices``).

A **block index** is the position of a module's enclosing block container in registration order, counted
across stages (ViT: ``blocks.0…``; Swin:
``layers.0.blocks.0``, ``layers.0.blocks.1``, ``layers.1.blocks.0`` … → 0, 1, 2 …; a timm ResNet:
``layer1.0``, ``layer1.1``, … ``layer4.2``), so rank schedules and block selections work on all three.

A rank schedule is either a per-block list or a :data:`RankSchedule` — a callable from the backbone's
:class:`BlockLayout` (its blocks, grouped by stage) to such a list — because a plan is made from a
config before any backbone is seen; it is resolved here, where the backbone is.  A :data:`SitePlacement`
goes further: it decides each layer's rank from its :class:`Site` (block, stage, stem, downsample).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from .branches import BasisBank, Coefficients, Init, LoRAGroup, Routing
from .conv import AdaptedConv2d
from .layer import AdaptedLayer, AdaptedLinear
from .routing import RouteContext
from .subspace import Form, Relevance, Subspace, TruncationK, column_space, factor_dtype, weight_subspaces

Targets = Sequence[str] | str
RankSchedule = Callable[["BlockLayout"], Sequence[int]]
"""The backbone's block layout → rank per block (0 = no branch there)."""

_BLOCK = re.compile(r"^(.*?\b(?:blocks|layer\d+)\.\d+)\.")  # ViT / Swin blocks, timm ResNet stages' blocks


@dataclass
class OutputSubspaceSpec:
    """Confine ``B`` to the column space (``"column"``) or left null space (``"null"``) of ``W``,
    with the column space truncated at ``k`` (None: numerical rank; int; float: energy fraction)."""

    space: Literal["column", "null"]
    k: TruncationK = None
    form: Form = "coordinates"


@dataclass
class GroupSpec:
    """One branch group to place on every matching layer.

    ``rank`` is an int, a per-block list (0 = no branch in that block), or a :data:`RankSchedule`
    producing that list from the backbone's number of blocks.  ``scale`` overrides
    ``alpha / rank``.  ``targets`` overrides the injection's targets for this group only.
    """

    name: str
    routing: Routing
    n: int = 1
    rank: int | Sequence[int] | RankSchedule = 8
    alpha: float | None = None
    scale: float | None = None
    dropout: float = 0.0
    init: Init = "lora"
    targets: Targets | None = None
    output_subspace: OutputSubspaceSpec | None = None
    input_subspace: Literal["span", "complement"] | None = None  # A confined to a memory (basis set later)
    # without a task, weigh the (task-routed, input_subspace="span") branches by the input's relevance to each
    # task's bases: a row's [CLS] token or all its tokens (see core.subspace.Relevance)
    relevance: Literal["cls", "all"] | None = None
    relevance_temperature: float = 0.1
    train_A: bool = True
    bank_size: int = 0  # > 0: factors from a BasisBank of this many bases, one bank per module shape
    bank_coefficients: Coefficients = "module"  # each module's own Q, one Q in the bank, or diagonal Q (ARC)
    bank_tied: bool = False  # B_h = A_hᵀ (ARC): square modules only
    placement: SitePlacement | None = None  # when set, decides every layer's rank from its site (overrides rank)

    def rank_at(self, block: int | None, name: str, layout: BlockLayout) -> int:
        if self.placement is not None:
            return int(self.placement(Site.of(name, block, layout), layout))
        if isinstance(self.rank, int):
            return self.rank
        ranks = self.rank(layout) if callable(self.rank) else self.rank
        if block is None:
            raise ValueError(f"{name}: a per-block rank schedule needs a layer inside a '…blocks.<i>' container")
        if block >= len(ranks):
            raise ValueError(
                f"rank schedule of group {self.name!r} has {len(ranks)} entries; {name} is in block {block}"
            )
        return int(ranks[block])


@dataclass
class InjectionResult:
    layers: dict[str, AdaptedLinear] = field(default_factory=dict)
    banks: dict[str, BasisBank] = field(default_factory=dict)


@dataclass(frozen=True)
class BlockLayout:
    """Global block indices grouped by the container that holds them: one group for a ViT's
    ``blocks``, one per stage for Swin's ``layers.<s>.blocks`` or a ResNet's ``layer<s>`` (what "last block of
    each stage" needs); ``prefixes`` names each stage's module (``layers.1``, ``layer2``; empty for a ViT)."""

    stages: tuple[tuple[int, ...], ...]
    prefixes: tuple[str, ...] = ()

    @property
    def count(self) -> int:
        return sum(len(stage) for stage in self.stages)

    def stage_of(self, name: str, block: int | None) -> int | None:
        """The stage holding block ``block``, or for a layer outside every block (Swin's patch merging), the
        stage whose module holds it; None for the stem."""
        if block is not None:
            return next(s for s, blocks in enumerate(self.stages) if block in blocks)
        return next((s for s, p in enumerate(self.prefixes) if p and name.startswith(p + ".")), None)


@dataclass(frozen=True)
class Site:
    """Where an adapted layer sits: its block (None outside every block), its stage (None for the stem of a
    CNN or a ViT's patch embedding), and whether it is a downsampling layer between stages (a ResNet's
    projection shortcut ``downsample.0``, Swin's patch merging)."""

    name: str
    block: int | None
    stage: int | None
    downsample: bool

    @classmethod
    def of(cls, name: str, block: int | None, layout: BlockLayout) -> Site:
        return cls(name, block, layout.stage_of(name, block), "downsample" in name.split("."))


SitePlacement = Callable[[Site, BlockLayout], int]
"""A layer's site and the backbone's block layout → its rank (0 = no branch there)."""


def block_layout(model: nn.Module) -> BlockLayout:
    stages: dict[str, list[int]] = {}
    for name, index in block_indices(model).items():
        stages.setdefault(name.rsplit(".", 1)[0], []).append(index)
    prefixes = tuple(key.removesuffix("blocks").removesuffix(".") for key in stages)
    return BlockLayout(tuple(tuple(blocks) for blocks in stages.values()), prefixes)


def block_indices(model: nn.Module) -> dict[str, int]:
    """Map each ``…blocks.<i>`` container name to its global block index (registration order)."""
    order: dict[str, int] = {}
    for name, _ in model.named_modules():
        match = _BLOCK.match(name + ".")
        if match and match.group(1) not in order:
            order[match.group(1)] = len(order)
    return order


def block_of(name: str, blocks: dict[str, int]) -> int | None:
    match = _BLOCK.match(name + ".")
    return blocks.get(match.group(1)) if match else None


def matches(name: str, targets: Targets) -> bool:
    """Whether ``targets`` name the module ``name`` whole."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


SUB_MODULES = ("q", "k", "v")
"""What a target's last component may name inside a fused projection: the thirds of its output rows, in
timm's order.  A layer has no child modules, so ``attn.qkv.k`` never also names a module whole."""


def _sub_target(target: str) -> tuple[str, str] | None:
    """``"attn.qkv.k"`` → ``("attn.qkv", "k")``; None for a target that names no q / k / v part."""
    layer, _, part = target.rpartition(".")
    return (layer, part) if layer and part in SUB_MODULES else None


def sub_targets(name: str, targets: Targets) -> tuple[str, ...]:
    """The q / k / v parts of the layer ``name`` that ``targets`` name, in row order (a regular expression
    names whole modules only)."""
    if isinstance(targets, str):
        return ()
    named = {split[1] for split in map(_sub_target, targets) if split and matches(name, [split[0]])}
    return tuple(part for part in SUB_MODULES if part in named)


ADAPTABLE = (nn.Linear, nn.Conv2d, AdaptedLayer)


def find_targets(model: nn.Module, targets: Targets, blocks: Sequence[int] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` layers ``targets`` name, whole or by q / k / v part (and in
    ``blocks``, if given)."""
    index = block_indices(model)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, ADAPTABLE)
        and (matches(name, targets) or sub_targets(name, targets))
        and (blocks is None or block_of(name, index) in set(blocks))
    ]
    if not found:
        layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        sample = ", ".join(layers[:6]) + (" …" if len(layers) > 6 else "")
        where = f" in blocks {list(blocks)}" if blocks is not None else ""
        subs = [split for split in map(_sub_target, targets) if split] if not isinstance(targets, str) else []
        hint = ""
        if subs:
            layer, part = subs[0]
            hint = f" ('{layer}.{part}' names the {part} rows of a fused q, k, v nn.Linear named like '…{layer}')"
        raise ValueError(
            f"target_modules {targets!r} matched no nn.Linear or nn.Conv2d{where} of {type(model).__name__}; "
            f"its layers are named like: {sample or 'none'}{hint}"
        )
    return found


def adapt(module: nn.Module, name: str, context: RouteContext) -> AdaptedLayer:
    """``module`` as an adapted layer (itself if it already is one)."""
    if isinstance(module, AdaptedLayer):
        return module
    if isinstance(module, nn.Linear):
        return AdaptedLinear(module, name, context)
    return AdaptedConv2d(module, name, context)


def _output_space(spec: OutputSubspaceSpec, layer: AdaptedLayer, group: GroupSpec, rank: int, svd: dict) -> Subspace:
    """The subspace ``B`` may use; ``svd`` caches this layer's bases so groups share one SVD."""
    if spec.space not in ("column", "null"):
        raise ValueError(f"unknown output subspace {spec.space!r}; choose 'column' or 'null'")
    weight = layer.base.weight
    out, inp = weight.shape
    if spec.space == "null" and spec.form == "coordinates":  # the only case needing U_⊥ itself
        key = ("full", spec.k)
        if key not in svd:
            svd[key] = weight_subspaces(weight, spec.k)
        column, null = svd[key]
        space = Subspace(null.clone(), form="coordinates")  # a private copy: adapter files refuse shared memory
    else:
        key = ("thin", spec.k)
        if key not in svd:
            svd[key] = column_space(weight, spec.k)
        column = svd[key]
        complement = spec.space == "null"
        form = "projection" if complement else spec.form
        space = Subspace(column.clone(), complement=complement, form=form, rebuilt=form == "projection")
    if rank > space.dim:
        k = column.shape[1]
        if spec.space == "column":
            hint = f" Lower the rank to ≤ {k}, or raise the truncation k."
        elif k == min(out, inp) == out:
            hint = (
                " W is square (or wide) and full-rank, so its exact left null space is empty: set a truncation"
                " (k < out, or an energy fraction) or target a tall layer such as the fused attn.qkv or mlp.fc1."
            )
        else:
            hint = f" Lower the rank to ≤ {space.dim}, set a smaller truncation k (< {k}), or target a taller layer."
        what = "column space" if spec.space == "column" else "left null space"
        raise ValueError(
            f"{layer.name}: group {group.name!r} has rank {rank} but the {what} of its {out}×{inp} weight "
            f"(k={k}) has dimension {space.dim}.{hint}"
        )
    return space


def inject(
    model: nn.Module,
    targets: Targets,
    groups: Sequence[GroupSpec],
    context: RouteContext,
    blocks: Sequence[int] | None = None,
) -> InjectionResult:
    """Replace every targeted layer with an adapted layer carrying ``groups``."""
    result = InjectionResult()
    index = block_indices(model)
    layout = block_layout(model)
    names = set()
    for group in groups:
        names.update(find_targets(model, group.targets or targets, blocks))
    for name in [n for n, _ in model.named_modules() if n in names]:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        module = getattr(parent, attr)
        layer = adapt(module, name, context)
        block = block_of(name, index)
        svd: dict = {}
        for group in groups:
            whole, parts = matches(name, group.targets or targets), sub_targets(name, group.targets or targets)
            if not (whole or parts):
                continue
            rows = _row_slices(group, layer, whole, parts)
            rank = group.rank_at(block, name, layout)
            if rank <= 0:
                continue
            result.layers[name] = layer
            layer.groups[group.name] = _build_group(group, layer, rank, result.banks, svd, rows)
        if name in result.layers:
            setattr(parent, attr, layer)
    if not result.layers:
        raise ValueError("every matched layer got rank 0 from the rank schedules: nothing to adapt")
    return result


def _row_slices(
    group: GroupSpec, layer: AdaptedLayer, whole: bool, parts: tuple[str, ...]
) -> tuple[tuple[int, int], ...] | None:
    """The output rows of each q / k / v part a group targets (None: the whole layer), or why this layer cannot
    be split so."""
    if not parts:
        return None
    where = f"{layer.name}: group {group.name!r} targets {', '.join(f'{layer.name}.{p}' for p in parts)}"
    if whole:
        raise ValueError(f"{where} and the whole layer at once: adapt the layer whole or by q / k / v parts, not both")
    if not isinstance(layer, AdaptedLinear):
        raise ValueError(f"{where}, but it is a convolution: q / k / v sub-targets name rows of a fused nn.Linear")
    out = layer.out_features
    if out % 3:
        raise ValueError(
            f"{where}, but its out_features {out} is not divisible by 3: q / k / v sub-targets name the thirds of "
            "a fused q, k, v projection such as timm's attn.qkv"
        )
    if group.output_subspace is not None:
        raise ValueError(f"{where} with an output subspace of W: sub-targets cannot be confined to one")
    d = out // 3
    return tuple((SUB_MODULES.index(p) * d, (SUB_MODULES.index(p) + 1) * d) for p in parts)


def _build_group(
    group: GroupSpec,
    layer: AdaptedLayer,
    rank: int,
    banks: dict[str, BasisBank],
    svd: dict,
    row_slices: tuple[tuple[int, int], ...] | None = None,
) -> LoRAGroup:
    if isinstance(layer, AdaptedConv2d):
        _check_conv_group(group, layer)
    out, inp = layer.out_features, layer.in_features
    nominal, rank = rank, rank * layer.rank_factor  # a conv branch of rank r has r·k factor rows (loralib's format)
    bank = None
    if group.bank_size > 0:  # one bank per module shape (a q / k / v part is a module of its rows)
        rows = out if row_slices is None else row_slices[0][1] - row_slices[0][0]
        key = f"{group.name}_{rows}x{inp}"
        if key not in banks:
            try:
                made = BasisBank(group.bank_size, rank, inp, rows, tied=group.bank_tied,
                                 coefficients=group.bank_coefficients)  # fmt: skip
            except ValueError as err:
                raise ValueError(f"{layer.name}: {err}") from err
            banks[key] = made.to(layer.base.weight.device)
        bank = banks[key]
        if bank.rank != rank:
            raise ValueError(f"{layer.name}: a shared bank needs one rank per shape; got {rank} and {bank.rank}")
    output_space = _output_space(group.output_subspace, layer, group, rank, svd) if group.output_subspace else None
    # a conv branch in loralib's format may exceed its reshaped matrix's rank (MoLA's 7×7 stem at r = 8 does):
    # the paper's parameter counts include it, so only linear layers are held to the bound (each part's rows)
    rows = out if row_slices is None else row_slices[0][1] - row_slices[0][0]
    if rank > min(rows, inp) and isinstance(layer, AdaptedLinear):
        what = f"its {out}×{inp} weight has" if row_slices is None else f"each of its {rows}×{inp} q / k / v parts has"
        raise ValueError(
            f"{layer.name}: group {group.name!r} has rank {rank}, but {what} rank at most {min(rows, inp)}: a larger "
            f"rank adds parameters and no capacity; choose a rank ≤ {min(rows, inp)}"
        )
    input_space = None
    if group.input_subspace is not None:
        if group.input_subspace not in ("span", "complement"):
            raise ValueError(f"unknown input subspace {group.input_subspace!r}; choose 'span' or 'complement'")
        # empty until a FeatureMemory fills it: a span then allows nothing, a complement everything
        complement = group.input_subspace == "complement"
        weight = layer.base.weight
        input_space = Subspace(weight.new_zeros(inp, 0, dtype=factor_dtype(weight)), complement=complement)
    effective_rank = nominal * max(group.bank_size, 1)
    scale = group.scale if group.scale is not None else (group.alpha or effective_rank) / effective_rank
    return LoRAGroup(
        group.n,
        rank,
        inp,
        out,
        routing=group.routing,
        scale=scale,
        dropout=group.dropout,
        init=group.init,
        output_space=output_space,
        input_space=input_space,
        train_A=group.train_A,
        bank=bank,
        row_slices=row_slices,
        relevance=Relevance(group.n, group.relevance == "cls", group.relevance_temperature)
        if group.relevance
        else None,
    ).to(layer.base.weight.device)


def _check_conv_group(group: GroupSpec, layer: AdaptedConv2d) -> None:
    """What a conv branch cannot do, said before anything is built."""
    unsupported = {
        "an output subspace of W": group.output_subspace is not None,
        "an input subspace": group.input_subspace is not None,
        "a shared basis bank": group.bank_size > 0,
        "a fixed down-projection": not group.train_A,
        "dropout": group.dropout > 0,
    }
    found = [what for what, used in unsupported.items() if used]
    if found:
        raise ValueError(
            f"{layer.name}: group {group.name!r} asks for {', '.join(found)} on a convolution; conv LoRA supports "
            "plain branches only (target linear layers for the rest)"
        )


def freeze(model: nn.Module, modules_to_save: Targets = ()) -> list[str]:
    """Freeze every parameter, then unfreeze the modules (or bare parameters, such as a ViT's
    ``cls_token``) whose names match ``modules_to_save``.

    Returns the outermost matching names, so the adapter file can carry exactly those tensors."""
    for p in model.parameters():
        p.requires_grad_(False)
    if not modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    chosen = sorted({n for n in names if matches(n, modules_to_save)})
    if not chosen:
        raise ValueError(f"modules_to_save {modules_to_save!r} matched no module of {type(model).__name__}")
    for name, p in model.named_parameters():
        if any(name == c or name.startswith(c + ".") for c in chosen):
            p.requires_grad_(True)
    return [c for c in chosen if not any(c.startswith(o + ".") for o in chosen)]
