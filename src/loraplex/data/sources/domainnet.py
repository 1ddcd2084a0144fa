"""``domainnet:<domain>``: a domain of DomainNet (``clipart``, ``infograph``, ``painting``, ``quickdraw``, ``real``,
``sketch``) in its distributed layout, with the official train / test file lists.

``data.roots.domainnet`` holds each domain's unzipped folder and its two lists (from the DomainNet page)::

    clipart/aircraft_carrier/clipart_001_000018.jpg …    clipart_train.txt  clipart_test.txt
    quickdraw/…                                          quickdraw_train.txt  quickdraw_test.txt  …

A list line is a path relative to the root and the label (``clipart/aircraft_carrier/clipart_001_000018.jpg 0``);
the 345 labels are shared by every domain (one label space), and each label's name is its class folder. Files in
the folders but in neither list are ignored. In a run the domain keeps the lists' split (test: the test list, or a
stratified seeded draw of ``data.test_per_domain`` from it; validation carved from the train list by seed), every
listed file checked to exist at start-up (a stat per file: the lists name ~590k images, too many to decode first;
one that cannot be decoded stops the run when it is read), and its images decoded on demand.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .common import DataError, ImageSource, SourceMissingError, require_two_classes
from .folder import folder_path, keep_readable, read_image
from .registry import Request, register_source

DOMAINNET = "domainnet"
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DOMAINNET_CLASSES = 345
DOMAINNET_PAGE = "https://ai.bu.edu/M3SDA/"
LIST_PARTS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class DomainFiles:
    """One domain's listed files: the classes (folder names; a label no list names keeps its number), the files
    (absolute), their labels and which are the official test list's."""

    classes: list[str]
    paths: list[Path]
    labels: torch.Tensor  # int64 [N]
    official_test: torch.Tensor  # bool [N]


def parse_domain(name: str) -> str:
    """The domain of ``domainnet:<domain>`` (case does not matter); another is a ValueError listing the six."""
    _, _, spelling = name.partition(":")
    if spelling.lower() in DOMAINNET_DOMAINS:
        return spelling.lower()
    what = f"unknown DomainNet domain {spelling!r}" if spelling else "DomainNet needs a domain"
    raise ValueError(f"{name!r}: {what}; the domains are {', '.join(f'{DOMAINNET}:{d}' for d in DOMAINNET_DOMAINS)}")


def domainnet_classes(argument: str | None) -> int:
    """Class count of a DomainNet domain, without reading the disk (the domain is checked)."""
    parse_domain(f"{DOMAINNET}:{argument or ''}")
    return DOMAINNET_CLASSES


def _base(name: str, domain: str, root: str | Path | None) -> Path:
    """The root, checked to hold the domain's folder and lists."""
    if root is None:
        raise SourceMissingError(
            f"{name!r} reads DomainNet from disk: set data.roots.{DOMAINNET} to the directory holding the domain "
            f"folders and their file lists ({domain}/, {domain}_train.txt, {domain}_test.txt; e.g. "
            f"--set data.roots.{DOMAINNET}=/data/domainnet); they are on {DOMAINNET_PAGE}"
        )
    base = folder_path(root)
    if not base.is_dir():
        raise SourceMissingError(f"DomainNet root {base} (data.roots.{DOMAINNET}) is not a directory")
    absent = [f"{domain}_{part}.txt" for part in LIST_PARTS if not (base / f"{domain}_{part}.txt").is_file()]
    if absent:
        raise SourceMissingError(
            f"DomainNet's file list{'s' * (len(absent) > 1)} {' and '.join(absent)} for {name!r} "
            f"{'are' if len(absent) > 1 else 'is'} not in {base} (data.roots.{DOMAINNET}): download "
            f"{domain}_train.txt and {domain}_test.txt from {DOMAINNET_PAGE} into it"
        )
    if not (base / domain).is_dir():
        raise SourceMissingError(
            f"DomainNet's {domain} images are not in {base} (data.roots.{DOMAINNET}): no folder {domain}/; unzip "
            f"{domain}.zip from {DOMAINNET_PAGE} there"
        )
    return base


def read_list(path: Path) -> list[tuple[str, int, int]]:
    """``(relative path, label, line number)`` of each non-empty line of a file list, labels checked."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) >= DOMAINNET_CLASSES:
            raise DataError(
                f"{path} line {number}: {line.strip()!r} is not '<relative path> <label>' with a label in "
                f"0..{DOMAINNET_CLASSES - 1}"
            )
        entries.append((fields[0], int(fields[1]), number))
    return entries


def domainnet_files(name: str, root: str | Path | None, *, skip_unreadable: bool = False) -> DomainFiles:
    """The domain's two lists read and checked: each label names one class folder, and every listed file exists
    (a missing one is a :class:`DataError` naming the first, unless ``skip_unreadable`` leaves them out, as
    :func:`~.folder.keep_readable` does)."""
    domain = parse_domain(name)
    base = _base(name, domain, root)
    names: dict[int, tuple[str, str]] = {}  # label -> (class folder, where it was first seen)
    paths, labels, problems, in_test = [], [], [], []
    for part in LIST_PARTS:
        listed = base / f"{domain}_{part}.txt"
        for relative, label, number in read_list(listed):
            where = f"{listed.name} line {number}"
            folder = Path(relative).parent.name
            seen = names.setdefault(label, (folder, where))
            if seen[0] != folder:
                raise DataError(
                    f"{listed} line {number}: label {label} is class folder {folder!r}, but {seen[0]!r} in {seen[1]}: "
                    f"a label is one class (are the lists {domain}'s own?)"
                )
            path = base / relative
            paths.append(path)
            labels.append(label)
            problems.append(None if path.is_file() else f"no such file, listed in {where}")
            in_test.append(part == "test")
    where = f"DomainNet domain {domain} ({base})"
    keep = keep_readable(where, paths, problems, skip_unreadable=skip_unreadable, base=base)
    classes = [names[k][0] if k in names else str(k) for k in range(DOMAINNET_CLASSES)]
    kept = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    require_two_classes(where, classes, kept, hint=f" (listed in {domain}_train.txt and {domain}_test.txt)")
    return DomainFiles(classes, [paths[i] for i in keep], kept, torch.tensor([in_test[i] for i in keep]))


@register_source(DOMAINNET, argument="<domain>", classes=domainnet_classes)
def load_domainnet(request: Request) -> ImageSource:
    """Every listed image decoded into memory (resized to ``request.size``, which their different sizes need), the
    test list's marked ``official_test``."""
    files = domainnet_files(request.name, request.root)
    images = [read_image(path, request.size) for path in files.paths]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"images of {request.name} have different sizes {sorted(shapes)}; pass size= to resize them")
    return ImageSource(request.name, torch.stack(images), files.labels, files.classes, files.official_test)
