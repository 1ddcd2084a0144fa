"""``vtab:<task>`` and ``vtab:<task>:final``: a VTAB-1K task in the layout the PEFT papers (NOAH, CLoRA, ARC …) use.

``data.roots.vtab`` is the ``vtab-1k`` folder that NOAH's ``data/vtab-source/get_vtab1k.py`` writes: one folder per
task (:data:`VTAB_CLASSES`: ``cifar``, ``caltech101`` … ``smallnorb_ele``), each holding its images and four lists::

    dtd/images/…   dtd/train800.txt   dtd/val200.txt   dtd/train800val200.txt   dtd/test.txt

A list line is an image path relative to the task folder and an integer label (``images/train800/000000.jpg 3``);
the tasks have no class names, so class ``k`` is named ``"k"``. The protocol (benchmarks.md #5) picks
hyper-parameters training on train800 and scoring on val200, then trains on all of train800val200 and reports on
test. The name picks the step (:data:`PROTOCOLS`):

* ``vtab:<task>`` (the search): train = ``train800``, val = ``val200``, test = ``test``;
* ``vtab:<task>:final``: train = ``train800val200``, val = ``val200``, test = ``test``. Its validation images are
  inside its training set: the final protocol has no held-out validation (as in the papers, which pick nothing on
  it), so its val scores are training scores, not a model-selection signal.

In a run every part comes from its own list, never re-split: the whole list (``data.train_per_domain`` /
``test_per_domain``: null), or a stratified seeded draw of the count given (more than the list holds is an error).
``data.val_per_domain`` is a count drawn from the val list, or, as for every source, a fraction of the training
part (its list's size), drawn from the val list and capped at all of it: 0.25 and above take all of val200 in the
search. All four lists are read and checked at start-up (labels integers ≥ 0, an image listed twice with one label,
the largest label + 1 the task's class count) and every listed image checked to exist (a stat per file, as for
DomainNet; one that cannot be decoded stops the run when it is read); images are decoded on demand. Class counts
are known per task, so a run sizes its heads before it reads a list.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .common import DataError, ImageSource, SourceMissingError
from .folder import folder_path, keep_readable, read_image
from .registry import Request, register_source

VTAB = "vtab"
VTAB_CLASSES = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}
"""The 19 tasks (their folder names) and their class counts, in VTAB's order: natural, specialized, structured."""
VTAB_LISTS = ("train800", "val200", "train800val200", "test")
FINAL = "final"
PROTOCOLS = {
    "search": {"train": "train800", "val": "val200", "test": "test"},
    FINAL: {"train": "train800val200", "val": "val200", "test": "test"},
}
"""The list each part of a run comes from, per protocol step (``vtab:<task>`` searches, ``vtab:<task>:final``)."""
VTAB_PAGE = "https://github.com/ZhangYuanhan-AI/NOAH (data/vtab-source/get_vtab1k.py)"


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """Every line of a task's four lists, in :data:`VTAB_LISTS` order: the image (absolute; the same one twice when
    two lists name it), its label and the list naming it (an index into :data:`VTAB_LISTS`)."""

    classes: list[str]
    paths: list[Path]
    labels: torch.Tensor  # int64 [N]
    listed: torch.Tensor  # int64 [N]


def parse_task(name: str) -> tuple[str, str]:
    """(task, protocol step) of ``vtab:<task>[:final]`` (case does not matter); another name is a ValueError
    listing the 19 tasks."""
    _, _, argument = name.partition(":")
    task, colon, step = argument.lower().partition(":")
    if task in VTAB_CLASSES and (not colon or step == FINAL):
        return task, step or "search"
    if task in VTAB_CLASSES:
        what = f"the only protocol step after the task is ':{FINAL}' (train800val200, then test), not {step!r}"
    else:
        what = f"unknown VTAB-1K task {argument.partition(':')[0]!r}" if task else "VTAB-1K needs a task"
    tasks = ", ".join(f"{VTAB}:{task}" for task in VTAB_CLASSES)
    raise ValueError(f"{name!r}: {what}; the tasks are {tasks} (each also as {VTAB}:<task>:{FINAL})")


def vtab_classes(argument: str | None) -> int:
    """Class count of a VTAB-1K task, without reading the disk (the name is checked)."""
    return VTAB_CLASSES[parse_task(f"{VTAB}:{argument}" if argument else VTAB)[0]]


def protocol_lists(name: str) -> dict[str, str]:
    """The list each part (train / val / test) of ``name`` comes from (:data:`PROTOCOLS`)."""
    return PROTOCOLS[parse_task(name)[1]]


def _task_folder(name: str, task: str, root: str | Path | None) -> Path:
    """The task's folder under the root, checked to hold the four lists."""
    lists = ", ".join(f"{stem}.txt" for stem in VTAB_LISTS)
    if root is None:
        raise SourceMissingError(
            f"{name!r} reads VTAB-1K from disk: set data.roots.{VTAB} to the directory holding the task folders "
            f"({task}/ with images/ and {lists}; e.g. --set data.roots.{VTAB}=/data/vtab-1k); {VTAB_PAGE} writes them"
        )
    base = folder_path(root)
    if not base.is_dir():
        raise SourceMissingError(f"VTAB-1K root {base} (data.roots.{VTAB}) is not a directory")
    folder = base / task
    if not folder.is_dir():
        found = [t for t in VTAB_CLASSES if (base / t).is_dir()]
        holds = f"it holds {', '.join(found)}" if found else f"it holds none of the {len(VTAB_CLASSES)} task folders"
        raise SourceMissingError(
            f"VTAB-1K's task folder {task}/ for {name!r} is not in {base} (data.roots.{VTAB}; {holds}): the root is "
            f"the vtab-1k folder that {VTAB_PAGE} writes"
        )
    absent = [f"{stem}.txt" for stem in VTAB_LISTS if not (folder / f"{stem}.txt").is_file()]
    if absent:
        raise SourceMissingError(
            f"VTAB-1K's list{'s' * (len(absent) > 1)} {', '.join(absent)} for {name!r} "
            f"{'are' if len(absent) > 1 else 'is'} not in {folder}: a task folder holds {lists} and the images "
            f"they name, as {VTAB_PAGE} writes them"
        )
    return folder


def read_list(path: Path, task: str) -> list[tuple[str, int, int]]:
    """``(relative path, label, line number)`` of each non-empty line of a list, each label checked to be one of
    the task's; a list naming no image is a :class:`DataError`."""
    classes = VTAB_CLASSES[task]
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdigit()):
            raise DataError(
                f"{path} line {number}: {line.strip()!r} is not '<image path> <label>' (a path relative to {task}/ "
                f"and an integer label ≥ 0)"
            )
        if int(fields[1]) >= classes:
            raise DataError(
                f"{path} line {number}: label {fields[1]} is out of range: VTAB-1K's {task} has {classes} classes "
                f"(labels 0..{classes - 1}); are these {task}'s lists?"
            )
        entries.append((fields[0], int(fields[1]), number))
    if not entries:
        raise DataError(f"{path} lists no images: regenerate {task}/ with {VTAB_PAGE}")
    return entries


def vtab_files(name: str, root: str | Path | None, *, skip_unreadable: bool = False) -> TaskFiles:
    """The task's four lists read and checked: an image listed twice has one label, the largest label is the
    task's last class (so the class count is the largest label + 1), and every listed image exists (a missing one is
    a :class:`DataError` naming the first, unless ``skip_unreadable`` leaves them out, as
    :func:`~.folder.keep_readable` does)."""
    task, _ = parse_task(name)
    folder = _task_folder(name, task, root)
    seen: dict[Path, tuple[int, str]] = {}  # image -> (label, where it was first listed)
    paths, labels, listed, problems = [], [], [], []
    for k, stem in enumerate(VTAB_LISTS):
        path = folder / f"{stem}.txt"
        for relative, label, number in read_list(path, task):
            where = f"{path.name} line {number}"
            image = folder / relative
            first = seen.setdefault(image, (label, where))
            if first[0] != label:
                raise DataError(
                    f"{path} line {number}: {relative} is labelled {label}, but {first[0]} in {first[1]}: an image "
                    f"has one label"
                )
            paths.append(image)
            labels.append(label)
            listed.append(k)
            problems.append(None if image.is_file() else f"no such file, listed in {where}")
    classes = VTAB_CLASSES[task]
    if max(labels) != classes - 1:
        raise DataError(
            f"VTAB-1K task {task} ({folder}): no list labels an image {classes - 1}, though {task} has {classes} "
            f"classes (the largest label + 1); are these {task}'s complete lists?"
        )
    keep = keep_readable(
        f"VTAB-1K task {task} ({folder})", paths, problems, skip_unreadable=skip_unreadable, base=folder
    )
    return TaskFiles(
        [str(k) for k in range(classes)],
        [paths[i] for i in keep],
        torch.tensor([labels[i] for i in keep], dtype=torch.int64),
        torch.tensor([listed[i] for i in keep], dtype=torch.int64),
    )


@register_source(VTAB, argument="<task>[:final]", classes=vtab_classes)
def load_vtab(request: Request) -> ImageSource:
    """The task's train800val200 and test lists decoded into memory (resized to ``request.size``, which their
    different sizes need), the test list's marked ``official_test``: every labelled image once, whichever protocol
    step the name picks (the steps differ only in how a run parts the lists)."""
    files = vtab_files(request.name, request.root)
    wanted = (VTAB_LISTS.index("train800val200"), VTAB_LISTS.index("test"))
    rows = torch.nonzero(torch.isin(files.listed, torch.tensor(wanted))).flatten()
    images = [read_image(files.paths[i], request.size) for i in rows.tolist()]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"images of {request.name} have different sizes {sorted(shapes)}; pass size= to resize them")
    official_test = files.listed[rows] == VTAB_LISTS.index("test")
    return ImageSource(request.name, torch.stack(images), files.labels[rows], files.classes, official_test)
