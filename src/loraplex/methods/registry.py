"""Method registry: a method is a config dataclass plus a ``plan`` that composes core pieces, and optionally
its own training objective (the default: mean cross-entropy over the batch's samples)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..core.branches import LoRAGroup
from ..core.inject import GroupSpec, Targets
from ..core.model import AdaptedModel, MixedOutput
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

Regulariser = Callable[[MethodConfig, "AdaptedModel"], tuple[torch.Tensor | None, dict[str, torch.Tensor]]]
"""``(config, model) → (term added to the loss or None, metrics)``: a penalty on the weights (CLoRA's SADE), added to
every regime's loss."""


def sample_mean(config: MethodConfig, out: MixedOutput, labels: torch.Tensor, smoothing: float):
    """Mean cross-entropy over the batch's samples, each through its own task's head.  Every sample weighs the
    same, which keeps DDP exact: each rank's mean over ``B/w`` samples, averaged by DDP, is the global mean."""
    return out.sample_losses(labels, smoothing).mean(), {}


Inputs = Callable[[], Iterator[torch.Tensor]]
"""A task's training images as model input, batch by batch (each call starts over): what hooks collect features on."""


class Continual:
    """How a method learns a sequence of tasks (``train.regime: continual``); the default is every baseline's.

    * :meth:`before_task` / :meth:`after_task` run around each task's training (collect features, set fixed
      factors, grow a memory).  The default trains one branch per task in every group that holds one branch per
      task (a task-routed group, or an always-on stack such as InfLoRA's), so earlier tasks' branches stay as they
      were (their factors are exempt from weight decay while this holds);
    * :meth:`unknown_task` is how the model runs when the task is not given (class- and domain-incremental
      evaluation): by default the shared route (always-on groups only); a model whose features need the task (a
      task-routed group) cannot be scored without it, unless its branches are gated by relevance;
      :meth:`class_logits` the class-incremental classifier (a method may calibrate it);
    * :meth:`state_dict` / :meth:`load_state_dict`: what the method keeps beside the model's tensors (a feature
      memory), written after every task so a killed sequence resumes where it was.
    """

    def __init__(self, config: MethodConfig) -> None:
        self.config = config
        self.tasks = len(config.tasks)

    def before_task(self, model: AdaptedModel, task: int, inputs: Inputs) -> None:
        for group in per_task_groups(model, self.tasks):
            group.train_only(task)

    def after_task(self, model: AdaptedModel, task: int, inputs: Inputs) -> None:
        for group in per_task_groups(model, self.tasks):
            group.train_only(None)

    def unknown_task(self, model: AdaptedModel) -> None:
        """Check the model can run without a task id (the route it then takes is the shared one)."""
        routed = sorted({name for name, layer in model.adapted_layers().items() for g in layer.groups.values()
                         if g.routing == "task" and g.relevance is None})  # fmt: skip
        if routed:
            raise ValueError(
                f"{model.method_name}'s features depend on the task ({routed[0]} has task-routed branches): it is "
                "scored with the task id given (train.incremental: task), not class- or domain-incrementally"
            )

    def class_logits(self, model: AdaptedModel, x: torch.Tensor, learned: int) -> torch.Tensor:
        """Class-incremental logits without a task id: the task-free features through the heads of tasks
        ``0 … learned`` side by side (one classifier over every class seen)."""
        features = model.forward_features(x)
        return torch.cat([model._head(t, features) for t in range(learned + 1)], 1)

    def per_task_parameters(self, model: AdaptedModel) -> int:
        """Parameters one task trains: a per-task group's share, every other trainable tensor whole (heads: one)."""
        groups = per_task_groups(model, self.tasks)
        per_group = {id(p): g.n for g in groups for p in g.parameters(recurse=False)}
        total = 0
        for name, p in model.named_parameters():
            if not p.requires_grad or name.startswith("heads."):
                continue
            total += p.numel() // per_group.get(id(p), 1)
        return total + max(sum(p.numel() for p in head.parameters()) for head in model.heads)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def per_task_groups(model: AdaptedModel, tasks: int) -> list[LoRAGroup]:
    """The groups holding one branch per task of a ``tasks``-long sequence (trained one at a time)."""
    return [
        g
        for layer in model.adapted_layers().values()
        for g in layer.groups.values()
        if g.n == tasks and g.routing in ("task", "always") and tasks > 1
    ]


@dataclass
class Method:
    name: str
    config_cls: type[MethodConfig]
    plan: Callable[[MethodConfig], AdapterPlan]
    doc: str = ""
    objective: Objective = sample_mean
    continual: type[Continual] = Continual
    regulariser: Regulariser | None = None


REGISTRY: dict[str, Method] = {}


def register(
    name: str,
    config_cls: type[MethodConfig],
    objective: Objective = sample_mean,
    continual: type[Continual] = Continual,
    regulariser: Regulariser | None = None,
):
    def decorator(plan: Callable[[MethodConfig], AdapterPlan]):
        doc = (plan.__doc__ or "").strip()
        REGISTRY[name] = Method(name, config_cls, plan, doc, objective, continual, regulariser)
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
