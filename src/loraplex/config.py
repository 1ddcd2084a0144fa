"""Run configuration: YAML with sections ``backbone``, ``method``, ``data``, ``train``, ``output``.

Every section is a dataclass whose type hints are the schema: an unknown key, a value of the wrong
type or an impossible value is a :class:`ConfigError` naming the dotted key.  The ``method`` section is
``name`` plus that method's own config fields (checked by the method registry).  Any key can be
overridden from the command line as ``--set section.key=value`` (the value is read as YAML, so
``--set train.steps=200`` is an int and ``--set method.rank=[4,8]`` a list).  Only ``yaml.safe_load``
is ever used.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data.dense import TASK_OUTPUTS
from .data.sequence import check_sequence, sequence_task_names
from .methods import get_method


class ConfigError(ValueError):
    """A configuration key that is unknown, of the wrong type, or impossible."""


@dataclass
class BackboneSection:
    """``name``: a zoo entry (``vit_fractal_tiny``), a timm architecture, or a local checkpoint path."""

    name: str = "vit_tiny_patch16_224"
    checkpoint: str | None = None  # local timm checkpoint file (safetensors, or a weights-only .pth)
    pretrained: bool = False  # timm's network weights: needs a network, refused offline
    img_size: int = 32
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    # clips (data.frames): "mean" = TSN's average consensus over frames (the paper setting); "concat" keeps
    # frame order (features side by side), which motion whose reverse is another class needs
    temporal_pooling: Literal["mean", "concat"] = "mean"
    # precision the frozen matmul weights are held in (bf16 / fp16 halve their memory on a GPU); trained tensors
    # stay fp32, and a low-precision backbone runs under the same train.precision
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def check(self) -> None:
        _positive("backbone.img_size", self.img_size)


@dataclass
class DataSection:
    domains: list[str] = field(default_factory=lambda: ["fashion", "mnist", "digits"])
    roots: dict[str, str] = field(default_factory=dict)  # per-source directory overrides
    train_per_domain: int | None = 1000  # None: every training image
    # a count, or a fraction of the training pool; 0 (the count): no validation split, the last step is the model
    val_per_domain: int | float = 0.1
    test_per_domain: int | None = None  # None: the whole test split
    sampling: Literal["proportional", "uniform", "temperature"] = "proportional"
    augment: bool = False  # random resized crops, flips, inversion, contrast (used for pre-training)
    class_balance: float = 0.0  # 0: classes as sampled; 0.5: class frequency ∝ sqrt(size); 1: uniform
    temperature: float = 2.0
    seed: int = 0
    frames: int | None = None  # clips of this many frames (video domains, frame-wise backbone); None: images
    tasks: list[str] = field(default_factory=list)  # dense tasks predicted on every image (regime multitask)
    workers: int = 0  # processes decoding batches (video, PASCAL, image folders); 0: on the training thread
    skip_unreadable: bool = False  # image files / clips that cannot be read: false stops at start-up, true skips them
    # regime continual: split the one source's classes into this many tasks (class order from data.seed), or name
    # each task's classes; null: each domain is a task (a domain sequence)
    sequence: int | list[list[int]] | None = None

    def check(self) -> None:
        if self.workers < 0:
            raise ConfigError(f"data.workers must be ≥ 0, got {self.workers}")
        if self.frames is not None:
            _positive("data.frames", self.frames)
        if not self.domains:
            raise ConfigError("data.domains must name at least one source")
        unknown = sorted(set(self.tasks) - set(TASK_OUTPUTS))
        if unknown:
            raise ConfigError(f"data.tasks has unknown dense task(s) {unknown}; known: {sorted(TASK_OUTPUTS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"data.tasks has duplicates: {self.tasks}")
        if len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"data.domains has duplicates: {self.domains}")
        if self.train_per_domain is not None:
            _positive("data.train_per_domain", self.train_per_domain)
        if isinstance(self.val_per_domain, float) and not 0.0 < self.val_per_domain < 1.0:
            # no validation is asked as the count 0, never as a fraction that rounds to nothing
            hint = "; for no validation split give the count 0" if self.val_per_domain == 0 else ""
            raise ConfigError(f"data.val_per_domain as a fraction must lie in (0, 1), got {self.val_per_domain}{hint}")
        if isinstance(self.val_per_domain, int) and self.val_per_domain < 0:
            raise ConfigError(
                f"data.val_per_domain must be ≥ 0 (0: no validation split, the last step is the model), "
                f"got {self.val_per_domain}"
            )
        if self.test_per_domain is not None:
            _positive("data.test_per_domain", self.test_per_domain)
        _positive("data.temperature", self.temperature)
        if not 0.0 <= self.class_balance <= 1.0:
            raise ConfigError(f"data.class_balance must lie in [0, 1], got {self.class_balance}")


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
RESUMABLE_KEYS = {"train": ("threads", "device", "compile", "steps"), "data": ("workers",), "output": "*"}
"""What a run may change when it resumes: how it executes (threads, device, compile, workers), where it is
written (the whole ``output`` section, so a run directory may be moved), and how long it trains
(``train.steps``, raised to continue a finished run).  The rest is the recipe, which a run keeps."""


@dataclass
class TrainSection:
    # multidomain: one domain (head) per sample; multitask: every data.tasks head on every image (dense)
    # continual: a sequence of tasks (data.sequence / data.domains), each trained for train.steps
    regime: Literal["multidomain", "multitask", "continual"] = "multidomain"
    # continual: class (task unknown at test, one classifier over every class seen), domain (same labels, task
    # unknown) or task (task id given); null: class for a class split, domain for a domain sequence
    incremental: Literal["class", "domain", "task"] | None = None
    joint: bool = False  # continual: train on every task at once (the upper bound), for steps × tasks steps
    task_weights: dict[str, float] = field(default_factory=dict)  # multitask loss weights (default 1 each)
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    head_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.05
    warmup_steps: int = 50
    clip_grad: float | None = 1.0
    eval_every: int = 100
    checkpoint_every: int = 100
    eval_batch_size: int = 256
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None leaves torch's default (not part of the recipe)
    label_smoothing: float = 0.0
    mixup: float = 0.0  # multidomain: α of mixup's Beta(α, α) blend weight, pairs drawn within a domain; 0: off
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N; under torchrun each rank its LOCAL_RANK GPU
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast for forward passes (fp16 adds a gradient scaler)
    compile: bool | str = False  # torch.compile the routed backbone: true (inductor) or a backend name

    def check(self) -> None:
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:<index>, got {self.device!r}")
        if isinstance(self.compile, str) and not self.compile:
            raise ConfigError("train.compile must be true, false or a torch.compile backend name")
        for key in ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_batch_size"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        if self.head_lr is not None:
            _positive("train.head_lr", self.head_lr)
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be ≥ 0, got {self.weight_decay}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"train.warmup_steps must lie in [0, train.steps={self.steps}), got {self.warmup_steps}")
        if self.clip_grad is not None:
            _positive("train.clip_grad", self.clip_grad)
        if self.threads is not None:
            _positive("train.threads", self.threads)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.mixup < 0:
            raise ConfigError(f"train.mixup must be ≥ 0 (0 turns it off), got {self.mixup}")
        if self.mixup and self.regime != "multidomain":
            raise ConfigError(f"train.mixup applies to the multidomain regime only, not to {self.regime}")


@dataclass
class OutputSection:
    dir: str = "runs/run"
    tensorboard: bool = True
    zoo_name: str | None = None  # `loraplex pretrain` writes the trained backbone as this zoo entry


@dataclass
class RunConfig:
    backbone: BackboneSection = field(default_factory=BackboneSection)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    output: OutputSection = field(default_factory=OutputSection)

    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def tasks(self) -> list[str]:
        """The heads: ``data.tasks`` in the multitask regime, otherwise one per domain."""
        return task_names(self.data, self.train)

    def method_kwargs(self) -> dict[str, Any]:
        """The method's own hyper-parameters (resolved: every default filled in, ``tasks`` = the heads)."""
        return {k: v for k, v in self.method.items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _type_name(annotation: Any) -> str:
    """Readable type names for error messages: ``one of ['a', 'b']``, ``int or null``, ``list[str]``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a type hint (int accepted where float is asked; bool is not an int)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(v, args[1]) for v in value.values())
    return isinstance(value, annotation)


def _coerce(value: Any, annotation: Any) -> Any:
    """YAML reads ``1e-3`` as a string and ``2`` as an int: give float fields a float."""
    if isinstance(value, str) and _matches(1.0, annotation) and not _matches(value, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and annotation is float:
        return float(value)
    return value


def build_section(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate a section dataclass from a mapping, naming any bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{prefix}.{k}' for k in unknown]}; known: {sorted(known)}")
    values = {}
    for key, value in data.items():
        value = _coerce(value, hints[key])
        if not _matches(value, hints[key]):
            raise ConfigError(
                f"{prefix}.{key} must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})"
            )
        values[key] = value
    section = cls(**values)
    if hasattr(section, "check"):
        section.check()
    return section


def task_names(data: DataSection, train: TrainSection) -> list[str]:
    if train.regime == "continual":
        return sequence_task_names(data.domains, data.sequence)
    return list(data.tasks) if train.regime == "multitask" else list(data.domains)


def incremental_setting(data: DataSection, train: TrainSection) -> str:
    """The continual setting: as set, or class for a class split and domain for a domain sequence."""
    return train.incremental or ("class" if data.sequence is not None else "domain")


def check_precision(backbone: BackboneSection, train: TrainSection) -> None:
    if backbone.dtype != "fp32" and train.precision != backbone.dtype:
        raise ConfigError(
            f"backbone.dtype={backbone.dtype} holds the frozen weights in {backbone.dtype}: run it under "
            f"train.precision={backbone.dtype} (got {train.precision})"
        )


def check_tasks(data: DataSection, train: TrainSection) -> None:
    if train.regime == "multitask" and not data.tasks:
        raise ConfigError(f"train.regime multitask needs data.tasks (some of {sorted(TASK_OUTPUTS)})")
    if train.regime != "multitask" and data.tasks:
        raise ConfigError("data.tasks is for train.regime multitask; multidomain runs have one head per domain")
    if train.regime == "continual":
        try:
            check_sequence(data.domains, data.sequence)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if incremental_setting(data, train) == "domain" and data.sequence is not None:
            raise ConfigError("train.incremental domain keeps one label space across tasks: a class split "
                              "(data.sequence) gives each task its own classes; use class or task")  # fmt: skip
    else:
        for key, value in (("data.sequence", data.sequence), ("train.incremental", train.incremental)):
            if value is not None:
                raise ConfigError(f"{key} is for train.regime continual")
        if train.joint:
            raise ConfigError("train.joint is for train.regime continual")
    stray = sorted(set(train.task_weights) - set(data.tasks))
    if stray:
        raise ConfigError(f"train.task_weights names {stray}, which are not in data.tasks {data.tasks}")
    for task, weight in train.task_weights.items():
        _positive(f"train.task_weights.{task}", weight)


def check_validation(data: DataSection, train: TrainSection) -> None:
    """``data.val_per_domain: 0`` trains without a validation split, the last step being the selected model (what
    VTAB-1K's final stage does: train on all 1,000 images for the steps chosen before).  Only the multidomain regime
    is built and tested for it; the multitask and continual regimes keep a validation split."""
    if data.val_per_domain == 0 and train.regime != "multidomain":
        raise ConfigError(
            f"data.val_per_domain: 0 (no validation split) is for train.regime multidomain, not {train.regime}: "
            "give a count or a fraction"
        )


def check_method(method: Any, tasks: list[str]) -> dict[str, Any]:
    """Validate the ``method`` section through the registry: unknown method or key, wrong types."""
    if not isinstance(method, dict) or "name" not in method:
        raise ConfigError("method must be a mapping with a 'name' (e.g. {name: lora, rank: 8})")
    try:
        registered = get_method(method["name"])
    except ValueError as err:
        raise ConfigError(f"method.name: {err}") from err
    fields = {f.name for f in dataclasses.fields(registered.config_cls)}  # not class constants such as min_rank
    hints = {k: v for k, v in typing.get_type_hints(registered.config_cls).items() if k in fields}
    kwargs = {k: v for k, v in method.items() if k != "name"}
    for key, value in kwargs.items():
        if key not in hints:
            raise ConfigError(
                f"unknown key 'method.{key}' for method {method['name']!r}; known: {sorted(set(hints) - {'tasks'})}"
            )
        kwargs[key] = value = _coerce(value, hints[key])
        if not _matches(value, hints[key]):
            raise ConfigError(f"method.{key} must be {_type_name(hints[key])}, got {value!r}")
    kwargs.setdefault("tasks", list(tasks))
    if kwargs["tasks"] != list(tasks):
        raise ConfigError(f"method.tasks {kwargs['tasks']} must equal the run's heads {list(tasks)} (one each)")
    try:
        resolved = registered.config_cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method: {err}") from err
    return {"name": method["name"], **resolved.to_dict()}


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` → (``["section", "key"]``, YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    path = dotted.strip().split(".")
    if len(path) < 2 or path[0] not in SECTIONS:
        raise ConfigError(f"--set {dotted}: the key must start with one of {sorted(SECTIONS)} and name a key in it")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {part} is not a mapping")
        node[path[-1]] = value
    return raw


def from_dict(raw: dict[str, Any]) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError("a config file must hold a mapping with sections " + ", ".join(SECTIONS))
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; known: {list(SECTIONS)}")
    sections = {
        name: build_section(typing.get_type_hints(RunConfig)[name], raw.get(name), name)
        for name in SECTIONS
        if name != "method"
    }
    check_tasks(sections["data"], sections["train"])
    check_precision(sections["backbone"], sections["train"])
    check_validation(sections["data"], sections["train"])
    method = check_method(raw.get("method", {"name": "lora"}), task_names(sections["data"], sections["train"]))
    return RunConfig(method=method, **sections)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (safe loader only), apply ``--set`` overrides, validate every key; an error about
    a key given with ``--set`` names that ``--set``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    try:
        return from_dict(apply_overrides(raw, list(overrides)))
    except ConfigError as err:
        culprit = next((o for o in overrides if o.split("=", 1)[0].strip() in str(err)), None)
        if culprit is None or str(err).startswith("--set"):
            raise
        raise ConfigError(f"--set {culprit}: {err}") from err


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
