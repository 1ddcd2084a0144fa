"""Source registry: a source is one module whose loader is registered under a name with :func:`register_source`.

A name maps to its source in one of three forms: the exact name (``fashion``), ``<name>:<argument>``
(``folder:<path>``; the bare name too when the argument is optional, ``fractals``), or, for sources with parts,
``<name>-seen`` / ``<name>-held`` (what pre-training may use / the downstream part; ``<name>`` is all of it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from .common import ImageSource, SourceMissingError

PART_SUFFIXES = {"-seen": "seen", "-held": "held"}


@dataclass(frozen=True)
class Request:
    """What a loader is asked: the name as given, taken apart (``argument`` after ``<name>:``, None without one;
    ``part`` all / seen / held), and `load_source`'s options."""

    name: str
    argument: str | None = None
    part: str = "all"
    root: str | None = None
    size: int | None = None
    download: bool = False


@dataclass(frozen=True)
class Source:
    """A registered source. ``argument`` is the placeholder of ``<name>:<argument>`` (None: it takes none), which
    ``optional`` lets the bare name omit; ``parts`` adds ``-seen`` / ``-held``. ``classes`` is the class count when
    it is known without loading: a number, or a function of the argument. ``install`` is the command that installs
    the source's data, which its errors name."""

    name: str
    load: Callable[[Request], ImageSource]
    argument: str | None = None
    optional: bool = False
    parts: bool = False
    classes: int | Callable[[str | None], int] | None = None
    install: str | None = None

    @property
    def spelling(self) -> str:
        """How the names it takes are written: ``fashion``, ``clipart[-seen|-held]``, ``folder:<path>`` …"""
        if self.argument is not None:
            return f"{self.name}[:{self.argument}]" if self.optional else f"{self.name}:{self.argument}"
        return f"{self.name}[{'|'.join(PART_SUFFIXES)}]" if self.parts else self.name


SOURCES: dict[str, Source] = {}
KNOWN_CLASSES: dict[str, int] = {"ucf101": 101, "kinetics400": 400, "hmdb51": 51}
"""Class counts known without loading anything (heads can be sized before the data exist): the video datasets'
(read by :mod:`..video`) and every registered source's that is a number."""


def register_source(
    name: str,
    *,
    argument: str | None = None,
    optional: bool = False,
    parts: bool = False,
    classes: int | Callable[[str | None], int] | None = None,
    install: str | None = None,
):
    """Register the decorated ``load(request) -> ImageSource`` as source ``name`` (see :class:`Source`)."""

    def decorator(load: Callable[[Request], ImageSource]) -> Callable[[Request], ImageSource]:
        if name in SOURCES or ":" in name or name.endswith(tuple(PART_SUFFIXES)):
            raise ValueError(f"cannot register source {name!r}: taken, or not a plain name")
        SOURCES[name] = Source(name, load, argument, optional, parts, classes, install)
        if isinstance(classes, int):
            KNOWN_CLASSES[name] = classes
        return load

    return decorator


def known_sources() -> list[str]:
    """Every registered source, spelled as in :attr:`Source.spelling`."""
    return [source.spelling for source in SOURCES.values()]


def source_of(name: str) -> tuple[Source, Request]:
    """The registered source a name stands for, and the name taken apart; an unknown name is a ValueError listing
    the known ones."""
    stem, colon, argument = name.partition(":")
    source = SOURCES.get(stem)
    if source is not None and (source.argument is not None if colon else source.argument is None or source.optional):
        return source, Request(name, argument if colon else None)
    for suffix, part in PART_SUFFIXES.items():
        source = SOURCES.get(name.removesuffix(suffix))
        if name.endswith(suffix) and source is not None and source.parts:
            return source, Request(name, part=part)
    raise ValueError(f"unknown source {name!r}; known sources: {', '.join(known_sources())}")


@functools.cache
def load_source(name: str, root: str | None = None, *, size: int | None = None, download: bool = False) -> ImageSource:
    """Load a source by name (:func:`known_sources`: ``fashion``, ``mnist``, ``digits``, ``folder:<path>`` …).

    `root` is the directory of a source's files where it reads them from disk (Fashion-MNIST IDX files, clip art,
    icon themes), each with its own default. `size` resizes folder images to `size`×`size`. `download=True` lets
    `fashion` fetch its files with torchvision into `root` (default `~/.cache/loraplex`); nothing is ever downloaded
    otherwise. Results are cached in-process.
    """
    source, request = source_of(name)
    return source.load(dataclasses.replace(request, root=root, size=size, download=download))


def num_classes(name: str) -> int:
    """Class count of a source: from `KNOWN_CLASSES` or its registration when they tell it (a folder: its
    subdirectories), otherwise by loading it."""
    if name in KNOWN_CLASSES:
        return KNOWN_CLASSES[name]
    source, request = source_of(name)
    if callable(source.classes):
        return source.classes(request.argument)
    return len(load_source(name).classes)


def missing(name: str, what: str) -> SourceMissingError:
    """The error for source ``name`` whose data are not here: ``what`` is missing, and the command installing it."""
    return SourceMissingError(f"{what}. Install with `{SOURCES[name].install}`")
