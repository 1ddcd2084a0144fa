"""``vlcs:<domain>`` and ``officehome:<domain>``: the domain-generalisation datasets in their distributed layout,
one domain a task.

The root (``data.roots.vlcs`` / ``data.roots.officehome``) holds one folder per domain, each holding one folder per
class with the images (the layout DomainBed and the datasets' own archives use)::

    VLCS/Caltech101/bird/*.jpg …        OfficeHome/Art/Alarm_Clock/*.jpg …
    VLCS/LabelMe/…                      OfficeHome/Real World/…

A domain is a class-per-subdirectory image folder (:mod:`.folder`): in a run it is decoded on demand, split by seed
from its labels and its files checked at start-up, as ``folder:<path>`` is. What this module adds is the naming
(each domain's common spellings, on disk and in ``data.domains``: case, spaces, ``_`` and ``-`` do not matter) and
the shared label space: every domain of a dataset must hold the same class folders (so label ``k`` is one class in
every domain's head), which is checked against the dataset's other domains found under the root — and, for VLCS,
against its five known classes. Without ``data.test_per_domain``, a run holds out :data:`DOMAIN_SET_TEST` of each
domain as its test part.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import DataError, ImageSource, SourceMissingError
from .folder import folder_path, load_folder, readable_folder
from .registry import Request, register_source


@dataclass(frozen=True)
class DomainSet:
    """One multi-domain dataset: its name (the source name and the ``data.roots`` key), its domains (canonical name
    → other accepted spellings), its class count, and its class names when they are known (None: read from disk)."""

    name: str
    title: str
    domains: dict[str, tuple[str, ...]]
    classes: int
    class_names: tuple[str, ...] | None = None

    def domain(self, spelling: str) -> str | None:
        """The canonical domain a spelling stands for, or None."""
        wanted = _norm(spelling)
        return next(
            (d for d, others in self.domains.items() if wanted in {_norm(s) for s in (d, *others)}),
            None,
        )

    @property
    def names(self) -> list[str]:
        """Every domain as written in ``data.domains``: ``vlcs:Caltech101`` …"""
        return [f"{self.name}:{d}" for d in self.domains]


VLCS = DomainSet(
    "vlcs",
    "VLCS",
    {
        "Caltech101": ("CALTECH", "Caltech"),
        "LabelMe": ("LABELME",),
        "SUN09": ("SUN",),
        "VOC2007": ("VOC", "PASCAL", "PASCAL_VOC", "PASCALVOC2007"),
    },
    5,
    ("bird", "car", "chair", "dog", "person"),
)
OFFICE_HOME = DomainSet(
    "officehome",
    "Office-Home",
    {"Art": (), "Clipart": (), "Product": (), "RealWorld": ("Real World", "Real_World", "Real")},
    65,
)
DOMAIN_SETS = {ds.name: ds for ds in (VLCS, OFFICE_HOME)}
DOMAIN_SET_TEST = 0.2
"""The share of a domain a run holds out as its test part when ``data.test_per_domain`` is unset (the datasets have
no official test split; 20 % is DomainBed's hold-out), stratified and seeded."""


def _norm(spelling: str) -> str:
    return re.sub(r"[\s_\-]+", "", spelling).lower()


def parse_domain(name: str) -> tuple[DomainSet, str]:
    """(dataset, canonical domain) of ``vlcs:<domain>`` / ``officehome:<domain>``; anything else naming one of these
    datasets is a ValueError listing its valid domains."""
    stem, _, spelling = name.partition(":")
    ds = DOMAIN_SETS[stem]
    domain = ds.domain(spelling)
    if domain is None:
        what = f"unknown {ds.title} domain {spelling!r}" if spelling else f"{ds.title} needs a domain"
        raise ValueError(
            f"{name!r}: {what}; the domains are {', '.join(ds.names)} (case, spaces, '_' and '-' do not matter"
            + "".join(f"; {d} may also be written {' or '.join(o)}" for d, o in ds.domains.items() if o)
            + ")"
        )
    return ds, domain


def domain_set_classes(name: str) -> int:
    """Class count of a domain of VLCS or Office-Home, without reading the disk (the name is checked)."""
    return parse_domain(name)[0].classes


def _subfolders(path: Path) -> list[str]:
    return sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))


def domain_folders(ds: DomainSet, root: str | Path | None, name: str) -> dict[str, Path]:
    """Each domain of ``ds`` found directly under ``root`` (by any of its spellings), in the dataset's order."""
    if root is None:
        raise SourceMissingError(
            f"domain {name!r} reads {ds.title} from disk: set data.roots.{ds.name} to the directory holding its domain "
            f"folders {', '.join(ds.domains)} (e.g. --set data.roots.{ds.name}=/data/{ds.title})"
        )
    base = folder_path(root)
    if not base.is_dir():
        raise SourceMissingError(f"{ds.title} root {base} (data.roots.{ds.name}) is not a directory")
    found = {}
    for entry in _subfolders(base):
        domain = ds.domain(entry)
        if domain is not None and domain not in found:
            found[domain] = base / entry
    return {d: found[d] for d in ds.domains if d in found}


def _class_mismatch(classes: list[str], reference: list[str] | tuple[str, ...]) -> str:
    """What ``classes`` lacks and has beyond ``reference`` (case aside), for an error."""
    mine, theirs = {c.lower() for c in classes}, {c.lower() for c in reference}
    missing = [c for c in reference if c.lower() not in mine]
    extra = [c for c in classes if c.lower() not in theirs]
    parts = [f"missing {', '.join(missing)}"] * bool(missing) + [f"extra {', '.join(extra)}"] * bool(extra)
    return "; ".join(parts) or "the same names in another order"


def domain_classes_checked(ds: DomainSet, domain: str, folders: dict[str, Path]) -> list[str]:
    """The class folders of ``domain``, checked to be the dataset's shared label space: the known class names (VLCS)
    and count, and the class folders of every other domain found; a :class:`DataError` names what differs."""
    classes = _subfolders(folders[domain])
    folded = [c.lower() for c in classes]
    where = f"{ds.title} domain {domain} ({folders[domain]})"
    hint = f": every {ds.title} domain must hold the same class folders (one label space)"
    if ds.class_names is not None and folded != list(ds.class_names):
        raise DataError(f"{where} does not hold {ds.title}'s classes: {_class_mismatch(classes, ds.class_names)}{hint}")
    for other, path in folders.items():
        others = _subfolders(path)
        if other != domain and [c.lower() for c in others] != folded:
            raise DataError(
                f"{where} and domain {other} have different classes: {domain} has "
                f"{_class_mismatch(classes, others)} compared with {other}{hint}"
            )
    if len(classes) != ds.classes:
        raise DataError(f"{where} has {len(classes)} class folders; {ds.title} has {ds.classes}{hint}")
    return classes


def domain_set_folder(name: str, root: str | Path | None) -> Path:
    """The folder of one domain, its class folders checked (:func:`domain_classes_checked`)."""
    ds, domain = parse_domain(name)
    folders = domain_folders(ds, root, name)
    if domain not in folders:
        base = folder_path(root)
        present = _subfolders(base)
        nested = next((base / p for p in present if domain in domain_folders(ds, base / p, name)), None)
        raise SourceMissingError(
            f"{ds.title} domain {domain} ({name!r}) not found in {base} (data.roots.{ds.name}): it holds "
            f"{', '.join(present) or 'nothing'}; expected a folder per domain: {', '.join(ds.domains)}"
            + (f"; the domains seem to be in {nested}: set data.roots.{ds.name} to it" if nested else "")
        )
    domain_classes_checked(ds, domain, folders)
    return folders[domain]


def domain_set_files(
    name: str, root: str | Path | None, *, skip_unreadable: bool = False
) -> tuple[list[str], list[Path], torch.Tensor]:
    """Classes, image files and labels of one domain, checked as a run checks a folder (every file read,
    :func:`~.folder.readable_folder`) after its class folders are checked against the other domains'."""
    return readable_folder(domain_set_folder(name, root), skip_unreadable=skip_unreadable)


def _load(request: Request) -> ImageSource:
    """Every image of the domain decoded into memory (resized to ``request.size`` when given), as ``folder:``."""
    folder = domain_set_folder(request.name, request.root)
    loaded = load_folder(dataclasses.replace(request, argument=str(folder)))
    return dataclasses.replace(loaded, name=request.name)


for _ds in DOMAIN_SETS.values():
    register_source(_ds.name, argument="<domain>", classes=lambda arg, ds=_ds: domain_set_classes(f"{ds.name}:{arg}"))(
        _load
    )
