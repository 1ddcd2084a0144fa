"""The continual regime: a sequence of tasks through the one training loop, scored after every task.

A run directory holds one sub-run per task (``task<i>/``: the loop's own checkpoints, logs and results, so a task
killed half-way resumes inside itself) and, after each task, the model and the method's state as they were once
that task was learned (``task<i>/after/``).  ``continual.json`` — written atomically after every task — holds the
sequence (names and classes, which a resumed run must share) and the accuracy matrix so far; ``results.json`` the
matrix and its metrics (:mod:`loraplex.eval.continual`) when the sequence is done.

Each task trains the method on that task's samples alone, through that task's head with its own classes (local
labels: earlier classes are not in the loss — the rehearsal-free convention of InfLoRA and the methods it is
compared with), with the method's hooks before and after (:class:`~loraplex.methods.registry.Continual`).  After
task ``i`` every seen task ``j ≤ i`` is scored on its test set:

* ``class`` — task unknown: the method's task-free route, one classifier over every class seen (the seen tasks'
  heads side by side), right when the arg-max is the sample's own class;
* ``domain`` — task unknown, one label space: the latest head (each task's head starts from its predecessor's);
* ``task`` — the task id given: task ``j``'s route and head.

``train.joint`` is the upper bound: every task at once, ``train.steps × tasks`` steps, one classifier over every
class (class: the heads side by side; domain: the last head), scored once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from ..config import ConfigError, RunConfig, incremental_setting
from ..core.model import AdaptedModel
from ..core.state import atomic_write, count_parameters, load_tensors
from ..data import DomainData, to_model_input
from ..data.augment import Augment
from ..data.loader import eval_loader
from ..data.sequence import ContinualTask
from ..eval.continual import summarise
from ..methods.registry import Continual, get_method, make_config
from .dist import Dist
from .loop import RESULTS, dumps, fit
from .placement import Placement
from .regimes import StreamRegime

STATE = "continual.json"
AFTER = "after"
METHOD_STATE = "continual_state.safetensors"
MATRIX_FIGURE = "accuracy_matrix.png"


class TaskRegime(StreamRegime):
    """Training on task ``task`` of a sequence — or, with ``joint``, on all of them (``splits`` then lists every
    task) with one classifier over every class.  Validation scores what is trained, the way it is trained."""

    selection_metric = "acc/task"

    def __init__(
        self,
        splits: dict[str, list[DomainData]],
        task: int,
        *,
        joint: str | None,
        img_size: int,
        augment: bool,
        label_smoothing: float,
        **stream,
    ) -> None:
        super().__init__(splits, **stream)
        self.task, self.joint, self.img_size = task, joint, img_size
        self.label_smoothing = label_smoothing
        self.augment = Augment(size=img_size, channels=3) if augment else None
        self.offsets = torch.tensor([0] + [d.num_classes for d in splits["train"]]).cumsum(0)[:-1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, domains = self.next_samples()
        x = self.augment(images) if self.augment else to_model_input(images, self.img_size)
        return x, labels, domains

    def batch_images(self, batch) -> int:
        return int(batch[1].shape[0])

    def scored(self, model: nn.Module, x: torch.Tensor, domains: torch.Tensor, labels: torch.Tensor):
        """Per-sample losses and predictions, and the targets they are scored against."""
        smoothing = self.label_smoothing
        if self.joint is None:
            logits, targets = model(x, task=self.task), labels
        else:
            out = model(x, task=domains)  # every head on every sample, one forward (DDP-safe)
            if self.joint == "task":  # the task id given: each sample through its own head
                return out.sample_losses(labels, smoothing), out.predictions(), labels
            if self.joint == "domain":  # one label space: the last head
                logits, targets = out.outputs[list(out.outputs)[-1]], labels
            else:  # one classifier over every class: the heads side by side
                logits = torch.cat(list(out.outputs.values()), 1)
                targets = labels + self.offsets.to(labels.device)[domains]
        losses = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction="none")
        return losses, logits.argmax(1), targets

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, labels, domains = batch
        losses, predicted, targets = self.scored(model, x, domains, labels)
        return losses.mean(), {"acc": (predicted == targets).float().mean()}

    def evaluate(self, model: AdaptedModel, split: str) -> dict[str, float]:
        correct, total = torch.zeros((), dtype=torch.long, device=self.placement.device), 0
        for d, domain in enumerate(self.splits[split]):
            for images, labels in self.eval_samples(domain):
                x = to_model_input(images, self.img_size)
                _, predicted, targets = self.scored(model, x, torch.full_like(labels, d), labels)
                correct += (predicted == targets).sum()
                total += len(labels)
        return {"acc/task": int(correct) / max(total, 1)}


Samples = Callable[[DomainData], Iterator[tuple[torch.Tensor, torch.Tensor]]]
"""A split's (samples, labels) batches in order, on the run's device."""


class Scorer:
    """Accuracy of the model on one seen task's test set under the run's setting (see the module's docstring)."""

    def __init__(self, setting: str, tasks: list[DomainData], hooks: Continual, samples: Samples, img_size: int):
        self.setting, self.tasks, self.hooks, self.samples, self.img_size = setting, tasks, hooks, samples, img_size
        self.offsets = [sum(t.num_classes for t in tasks[:j]) for j in range(len(tasks))]

    @torch.no_grad()
    def row(self, model: AdaptedModel, learned: int) -> list[float | None]:
        """``R[learned][j]`` for every task: scored for ``j ≤ learned``, None beyond."""
        if self.setting != "task":
            self.hooks.unknown_task(model)
        return [self.score(model, learned, j) if j <= learned else None for j in range(len(self.tasks))]

    def score(self, model: AdaptedModel, learned: int, j: int) -> float:
        route = j if self.setting == "task" else None
        merge = model.merged(task=route) if model.mergeable else contextlib.nullcontext()
        correct = torch.zeros((), dtype=torch.long, device=model.device)
        with merge:
            for images, labels in self.samples(self.tasks[j]):
                x = to_model_input(images, self.img_size)
                if self.setting == "class":
                    logits = self.hooks.class_logits(model, x, learned)
                    predicted, target = logits.argmax(1), labels + self.offsets[j]
                else:
                    head = model._head(j if self.setting == "task" else learned, model.forward_features(x, task=route))
                    predicted, target = head.argmax(1), labels
                correct += (predicted == target).sum()
        return int(correct) / len(self.tasks[j])


def _inputs(regime: StreamRegime, domain: DomainData, img_size: int, limit: int | None):
    """What hooks read: a task's training images as model input, batch by batch, at most ``limit`` of them."""

    def batches() -> Iterator[torch.Tensor]:
        seen = 0
        for images, _ in regime.eval_samples(domain):
            if limit is not None and seen >= limit:
                return
            take = images if limit is None else images[: limit - seen]
            seen += len(take)
            yield to_model_input(take, img_size)

    return batches


def _sequence_record(tasks: list[ContinualTask]) -> list[dict[str, Any]]:
    return [{"name": t.name, "domain": t.domain, "classes": list(t.classes) if t.classes else None} for t in tasks]


def _read_state(run_dir: Path, tasks: list[ContinualTask]) -> dict[str, Any]:
    """The sequence's progress so far (a fresh one when nothing is done); refuses another sequence."""
    path = run_dir / STATE
    if not path.exists():
        return {"sequence": _sequence_record(tasks), "done": 0, "matrix": [], "task_seconds": []}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is corrupted ({err}); restore it or start over in a new output.dir") from err
    if state.get("sequence") != _sequence_record(tasks):
        before = [(t["name"], t["classes"]) for t in state.get("sequence", [])]
        now = [(t.name, list(t.classes) if t.classes else None) for t in tasks]
        raise ConfigError(
            f"{run_dir} holds a sequence with another task order or other classes ({before} → {now}); resume it "
            "with its own sequence (data.seed, data.sequence, data.domains), or choose another output.dir"
        )
    return state


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(dumps(payload, indent=2) + "\n"))


def train_continual(
    config: RunConfig,
    model: AdaptedModel,
    tasks: list[ContinualTask],
    parts: list[dict[str, DomainData]],
    hooks: Continual,
    dist: Dist,
    stream: dict[str, Any],
    *,
    progress: bool,
    say,
    regulariser=None,
) -> dict[str, Any]:
    """Train (or resume) the sequence ``tasks`` whose train / val / test are ``parts``; returns the results (a method's
    ``regulariser`` is added to every step's loss, as in the other regimes)."""
    run_dir = Path(config.output.dir)
    setting = incremental_setting(config.data, config.train)
    if setting == "domain":
        classes = {t.name: p["train"].num_classes for t, p in zip(tasks, parts, strict=True)}
        if len(set(classes.values())) > 1:
            raise ConfigError(f"train.incremental domain needs one label space; the tasks' class counts: {classes}")
    state = _read_state(run_dir, tasks)
    regime_kw = {
        "img_size": config.backbone.img_size,
        "augment": config.data.augment,
        "label_smoothing": config.train.label_smoothing,
        **stream,
    }
    tests = [p["test"] for p in parts]
    if config.train.joint:
        return _train_joint(config, model, parts, tests, setting, hooks, dist, regime_kw, progress, say, regulariser)
    done = state["done"]
    if done:
        after = run_dir / f"task{done - 1}" / AFTER
        load_tensors(model, after)
        hooks.load_state_dict(load_file(after / METHOD_STATE) if (after / METHOD_STATE).exists() else {})
        say(f"resuming the sequence after task {done} of {len(tasks)} ({tasks[done - 1].name})")
    for t in range(done, len(tasks)):
        say(f"task {t + 1}/{len(tasks)}: {tasks[t].name}")
        started = time.perf_counter()
        regime = TaskRegime({k: [v] for k, v in parts[t].items()}, t, joint=None, **regime_kw)
        try:
            if setting == "domain" and t:  # one classifier carried along: this task's head starts as the last one
                model.heads[t].load_state_dict(model.heads[t - 1].state_dict())
            inputs = _inputs(regime, parts[t]["train"], config.backbone.img_size, None)
            model.eval()
            hooks.before_task(model, t, inputs)
            fit(model, regime, config.train, run_dir / f"task{t}", dist=dist, tensorboard=config.output.tensorboard,
                progress=progress, regulariser=regulariser)  # fmt: skip
            model.eval()
            hooks.after_task(model, t, inputs)
            row = Scorer(setting, tests, hooks, regime.eval_samples, config.backbone.img_size).row(model, t)
        finally:
            regime.close()
        state["matrix"].append(row)  # every rank keeps the state (they all report the results); rank 0 writes it
        state["task_seconds"].append(time.perf_counter() - started)
        state["done"] = t + 1
        if dist.is_main:
            after = run_dir / f"task{t}" / AFTER
            model.save(after)
            method_state = {k: v.detach().cpu().contiguous() for k, v in hooks.state_dict().items()}
            atomic_write(after / METHOD_STATE, lambda tmp, s=method_state: save_file(s, tmp))
            _write_json(run_dir / STATE, state)
        seen = " · ".join(f"{tasks[j].name} {row[j]:.3f}" for j in range(t + 1))
        say(f"after task {t + 1}: {seen}")
    return _results(config, model, tests, state, hooks, setting, dist)


def _train_joint(config, model, parts, tests, setting, hooks, dist, regime_kw, progress, say, regulariser):
    """Every task at once for ``steps × tasks`` steps; the one row of the matrix is the last."""
    run_dir = Path(config.output.dir)
    splits = {split: [p[split] for p in parts] for split in ("train", "val", "test")}
    last = len(parts) - 1
    regime = TaskRegime(splits, last, joint=setting, **regime_kw)
    train_cfg = dataclasses.replace(config.train, steps=config.train.steps * len(parts))
    started = time.perf_counter()
    try:
        fit(model, regime, train_cfg, run_dir / "joint", dist=dist, tensorboard=config.output.tensorboard,
            progress=progress, regulariser=regulariser)  # fmt: skip
        model.eval()
        row = Scorer(setting, tests, hooks, regime.eval_samples, config.backbone.img_size).row(model, last)
    finally:
        regime.close()
    say("joint: " + " · ".join(f"{d.name} {a:.3f}" for d, a in zip(tests, row, strict=True)))
    state = {"matrix": [row], "task_seconds": [time.perf_counter() - started], "joint": True}
    return _results(config, model, tests, state, hooks, setting, dist)


def _results(config, model, tests, state, hooks, setting, dist) -> dict[str, Any]:
    sizes = [len(d) for d in tests]
    matrix = state["matrix"]
    if state.get("joint"):
        accuracy = sum(a * n for a, n in zip(matrix[0], sizes, strict=True)) / sum(sizes)
        metrics: dict[str, Any] = {"A_T": accuracy, "avg_incremental": None, "A_t": [accuracy]}
    else:
        metrics = summarise(matrix, sizes)
    results = {
        "method": model.method_name,
        "regime": "continual",
        "setting": setting,
        "joint": bool(state.get("joint")),
        "tasks": [d.name for d in tests],
        "test_sizes": sizes,
        "matrix": matrix,
        **metrics,
        "task_seconds": state["task_seconds"],
        "train_seconds": sum(state["task_seconds"]),
        "params": count_parameters(model) | {"per_task": hooks.per_task_parameters(model)},
    }
    if dist.is_main:
        run_dir = Path(config.output.dir)
        _write_json(run_dir / RESULTS, results)
        if not results["joint"]:
            from ..eval.plots import accuracy_matrix  # matplotlib only when the figure is made

            png = accuracy_matrix(matrix, results["tasks"], f"{model.method_name} ({setting}-incremental)")
            atomic_write(run_dir / MATRIX_FIGURE, lambda tmp: Path(tmp).write_bytes(png))
    return results


def score_learned(config: RunConfig, model: AdaptedModel, parts: list[DomainData], learned: int) -> dict[str, float]:
    """Tasks ``0 … learned`` of a finished (or stopped) sequence scored as after its last task: ``acc/<task>`` and
    their sample-weighted mean ``acc/mean`` (``A_T`` when ``parts`` are the test sets)."""
    placement = Placement(model.device, config.train.precision)

    def samples(domain: DomainData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in eval_loader(domain, config.train.eval_batch_size):
            yield placement.put(images), placement.put(labels)

    hooks = get_method(config.method_name).continual(make_config(config.method_name, **config.method_kwargs()))
    setting = incremental_setting(config.data, config.train)
    with torch.inference_mode(), placement.autocast():
        row = Scorer(setting, parts, hooks, samples, config.backbone.img_size).row(model, learned)
    metrics = {f"acc/{d.name}": a for d, a in zip(parts, row, strict=True) if a is not None}
    seen = parts[: learned + 1]
    metrics["acc/mean"] = sum(a * len(d) for d, a in zip(seen, row, strict=False)) / sum(len(d) for d in seen)
    return metrics
