"""Method registry: a method is a config dataclass plus a ``plan`` that composes core pieces, and optionally
its own training objective (the default: mean cross-entropy over the batch's samples)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.inject import GroupSpec, Targets
from ..core.model import MixedOutput
from ..core.routing import MIXED_STRATEGIES

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_rank(key: str, value: object, least: int) -> None:
    """An int ≥ ``least``, or a non-empty per-block list of ints ≥ 0 (0: no branch in that block)."""
    if _is_int(value):
        if value < least:
            raise ValueError(f"config key {key!r} must be ≥ {least}, got {value}")
    elif not (isinstance(value, list | tuple) and value and all(_is_int(r) and r >= 0 for r in value)):
        raise ValueError(f"config key {key!r} must be an int ≥ {least} or a non-empty list of ints ≥ 0, got {value!r}")


def _check_open_unit(key: str, value: object) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        raise ValueError(f"config key {key!r} must lie in [0, 1), got {value!r}")


def _check_positive(key: str, value: object) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"config key {key!r} must be > 0, got {value!r}")


def _check_truncation(key: str, value: object) -> None:
    """A column-space size: an int ≥ 1, or an energy fraction in (0, 1]."""
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"config key {key!r} as an energy fraction must lie in (0, 1], got {value}")
    if not isinstance(value, float) and not (_is_int(value) and value >= 1):
        raise ValueError(f"config key {key!r} must be an int ≥ 1 or a fraction in (0, 1], got {value!r}")


OPTION_RULES = {
    "rank": lambda key, value, cfg: _check_rank(key, value, cfg.min_rank),
    "domain_rank": lambda key, value, cfg: _check_rank(key, value, 0),
    "task_rank": lambda key, value, cfg: _check_rank(key, value, 1),
    "alpha": lambda key, value, cfg: _check_positive(key, value),
    "scale": lambda key, value, cfg: _check_positive(key, value),
    "dropout": lambda key, value, cfg: _check_open_unit(key, value),
    "k": lambda key, value, cfg: _check_truncation(key, value),
}
"""The options several methods share, each checked here once for every method (None means "default")."""


@dataclass
class MethodConfig:
    """Fields every method shares.  ``tasks`` names the heads/branches; ``mixed_strategy`` picks the
    mixed-batch kernel (see BENCHMARKS.md for why ``bmm`` is the default).  Options named in
    :data:`OPTION_RULES` are validated here for every method; ``min_rank`` is 0 for methods where a rank of 0
    drops a kind of branch."""

    min_rank: ClassVar[int] = 1

    tasks: list[str] = field(default_factory=list)
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    blocks: list[int] | None = None
    modules_to_save: list[str] = field(default_factory=list)
    mixed_strategy: str = "bmm"

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("config key 'tasks' must name at least one task")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"config key 'tasks' has duplicates: {self.tasks}")
        if self.mixed_strategy not in MIXED_STRATEGIES:
            raise ValueError(
                f"config key 'mixed_strategy' must be one of {MIXED_STRATEGIES}, got {self.mixed_strategy!r}"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in OPTION_RULES and value is not None:
                OPTION_RULES[f.name](f.name, value, self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AdapterPlan:
    """What a method asks the engine to build."""

    groups: list[GroupSpec]
    targets: Targets
    blocks: list[int] | None = None
    modules_to_save: Targets = ()
    router: Callable[[nn.Module], nn.Module] | None = None  # backbone → the router driving soft-routed groups


Objective = Callable[[MethodConfig, MixedOutput, torch.Tensor, float], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``(config, mixed output, labels, label smoothing) → (loss, metrics)`` of one training batch."""


def sample_mean(config: MethodConfig, out: MixedOutput, labels: torch.Tensor, smoothing: float):
    """Mean cross-entropy over the batch's samples, each through its own task's head.  Every sample weighs the
    same, which keeps DDP exact: each rank's mean over ``B/w`` samples, averaged by DDP, is the global mean."""
    return out.sample_losses(labels, smoothing).mean(), {}


@dataclass
class Method:
    name: str
    config_cls: type[MethodConfig]
    plan: Callable[[MethodConfig], AdapterPlan]
    doc: str = ""
    objective: Objective = sample_mean


REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type[MethodConfig], objective: Objective = sample_mean):
    def decorator(plan: Callable[[MethodConfig], AdapterPlan]):
        REGISTRY[name] = Method(name, config_cls, plan, (plan.__doc__ or "").strip(), objective)
        return plan

    return decorator


def get_method(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(REGISTRY)}")
    return REGISTRY[name]


def method_of(config: MethodConfig) -> Method:
    for method in REGISTRY.values():
        if type(config) is method.config_cls:
            return method
    raise ValueError(f"{type(config).__name__} is not the config of a registered method")


def make_config(name: str, **kwargs) -> MethodConfig:
    """Build a method's config by name; an unknown key is an error that names it."""
    method = get_method(name)
    known = {f.name for f in dataclasses.fields(method.config_cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for method {name!r}; known keys: {sorted(known)}")
    return method.config_cls(**kwargs)
