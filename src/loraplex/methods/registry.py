"""Method registry: a method is a config dataclass plus a ``plan`` that composes core pieces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.inject import GroupSpec, Targets
from ..core.routing import MIXED_STRATEGIES

DEFAULT_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


@dataclass
class MethodConfig:
    """Fields every method shares.  ``tasks`` names the heads/branches; ``mixed_strategy`` picks the
    mixed-batch kernel (see BENCHMARKS.md for why ``bmm`` is the default)."""

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class AdapterPlan:
    """What a method asks the engine to build."""

    groups: list[GroupSpec]
    targets: Targets
    blocks: list[int] | None = None
    modules_to_save: Targets = ()


@dataclass
class Method:
    name: str
    config_cls: type[MethodConfig]
    plan: Callable[[MethodConfig], AdapterPlan]
    doc: str = ""


REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type[MethodConfig]):
    def decorator(plan: Callable[[MethodConfig], AdapterPlan]):
        REGISTRY[name] = Method(name, config_cls, plan, (plan.__doc__ or "").strip())
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
