"""Task sequences for continual learning: which classes of which source each task holds.

Two shapes, both from the run config (``train.regime: continual``):

* **a class split of one source** (``data.domains: [fashion]`` with ``data.sequence``): ``sequence: 5`` cuts the
  source's classes into 5 tasks of equal size in an order drawn from ``data.seed`` (Split-Fashion, Split-MNIST; the
  papers' "class orders" are seeds), ``sequence: [[0, 1], [2, 3], …]`` names them.  Each task's head and labels
  are its own classes in the order listed (local labels); a class-incremental classifier is the concatenation of
  the seen tasks' heads;
* **a domain sequence** (several ``data.domains``, no ``data.sequence``): each domain is a task, in the order given.

A task's data are a :class:`TaskView` of the source's seeded train / val / test parts: rows and relabelling only,
so on-demand sources stay on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .stream import DomainData

SEPARATOR = "#"


@dataclass(frozen=True)
class ContinualTask:
    """One task of a sequence: its name (the head it trains), its source, and the source classes it holds, in local
    label order (None: every class of its source — a domain sequence)."""

    name: str
    domain: str
    classes: tuple[int, ...] | None = None
    total: int = 0  # the source's class count

    @property
    def classes_count(self) -> int:
        return len(self.classes) if self.classes is not None else self.total


def sequence_task_names(domains: list[str], sequence: int | list[list[int]] | None) -> list[str]:
    """The tasks' names, known from the config alone (heads are built before any data is read)."""
    if sequence is None:
        return list(domains)
    count = sequence if isinstance(sequence, int) else len(sequence)
    return [f"{domains[0]}{SEPARATOR}{t}" for t in range(count)]


def check_sequence(domains: list[str], sequence: int | list[list[int]] | None) -> None:
    """What the config alone can tell is wrong with a sequence (ValueError naming it)."""
    if sequence is None:
        if len(domains) < 2:
            raise ValueError("a continual run needs ≥ 2 tasks: several data.domains, or data.sequence to split one")
        return
    if len(domains) != 1:
        raise ValueError(f"data.sequence splits one source's classes into tasks; data.domains lists {domains}")
    if isinstance(sequence, int):
        if sequence < 2:
            raise ValueError(f"data.sequence must split the classes into ≥ 2 tasks, got {sequence}")
        return
    seen: dict[int, int] = {}
    for t, classes in enumerate(sequence):
        if not classes:
            raise ValueError(f"data.sequence task {t} holds no class")
        for c in classes:
            if c < 0:
                raise ValueError(f"data.sequence task {t} names class {c}: class ids are ≥ 0")
            if c in seen:
                what = "twice" if seen[c] == t else f"in tasks {seen[c]} and {t}"
                raise ValueError(f"data.sequence has class {c} {what}: tasks must hold disjoint classes")
            seen[c] = t
    if len(sequence) < 2:
        raise ValueError("data.sequence must list ≥ 2 tasks")


def build_sequence(
    domains: list[str], sequence: int | list[list[int]] | None, seed: int, num_classes: list[int]
) -> list[ContinualTask]:
    """The tasks, with their classes resolved (``num_classes``: each domain's class count)."""
    check_sequence(domains, sequence)
    if sequence is None:
        return [ContinualTask(d, d, None, n) for d, n in zip(domains, num_classes, strict=True)]
    (domain,), (total,) = domains, num_classes
    if isinstance(sequence, int):
        if total % sequence:
            raise ValueError(f"{domain} has {total} classes: they do not split into {sequence} equal tasks")
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
        size = total // sequence
        sequence = [order[t * size : (t + 1) * size] for t in range(sequence)]
    beyond = sorted(c for classes in sequence for c in classes if c >= total)
    if beyond:
        raise ValueError(f"data.sequence names classes {beyond}, but {domain} has classes 0…{total - 1}")
    names = sequence_task_names(domains, sequence)
    return [ContinualTask(name, domain, tuple(classes), total) for name, classes in zip(names, sequence, strict=True)]


class TaskView(DomainData):
    """The samples of ``base`` whose class is in ``classes``, relabelled ``classes[i] → i``."""

    def __init__(self, name: str, base: DomainData, classes: tuple[int, ...]) -> None:
        lookup = torch.full((base.num_classes,), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        local = lookup[base.labels]
        self.rows = torch.nonzero(local >= 0).flatten()
        super().__init__(name, torch.empty(0, dtype=torch.uint8), local[self.rows], len(classes), base.frames)
        self.base = base
        self.on_demand = base.on_demand

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.base.sample_shape

    def take(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        return self.base.take(self.rows[rows], step)

    def resized(self, size: int, channels: int | None = None) -> DomainData:
        view = TaskView.__new__(TaskView)
        view.__dict__.update(self.__dict__)
        view.base = self.base.resized(size, channels)
        return view


def task_parts(task: ContinualTask, parts: dict[str, DomainData]) -> dict[str, DomainData]:
    """A task's train / val / test from its source's parts (a domain task: the parts themselves, renamed)."""
    return {
        split: TaskView(task.name, domain, task.classes or tuple(range(domain.num_classes)))
        for split, domain in parts.items()
    }
