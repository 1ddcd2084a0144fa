"""What every image source shares: the `ImageSource` they return, their errors, the cache directory and the
``loraplex.data`` logger."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DOWNLOAD_ROOT = "~/.cache/loraplex"
"""Where sources cache what they decode or render (and where `fashion` downloads to on request)."""
PRETRAIN_SIZE = 64  # pre-training sources are rendered at 64 px; augmentation crops them down
CLASSES_SHOWN = 10

log = logging.getLogger("loraplex.data")
"""Where the data layer reports what it skipped; with logging unconfigured (the CLI) Python prints the bare message
on stderr."""


class SourceMissingError(FileNotFoundError):
    """The data of a source are not on this machine; the message says what is missing and how to install it."""


class DataError(ValueError):
    """The data are there but cannot be used as they are (an unreadable image or video, a folder with fewer than two
    classes); the message names the file or folder and what to do about it."""


@dataclass
class ImageSource:
    """One labelled image collection. `official_test` marks the source's own test split, if it has one.

    Loaded sources are cached and shared: treat the tensors as read-only.
    """

    name: str
    images: torch.Tensor  # uint8 [N, H, W] (grey) or [N, H, W, 3]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    official_test: torch.Tensor | None = None  # bool [N]

    def __len__(self) -> int:
        return len(self.labels)


def cache_dir() -> Path:
    return Path(DOWNLOAD_ROOT).expanduser()


def directory_key(directory: Path) -> str:
    """A short key of a source directory, so that a cache holds what one directory gave."""
    return hashlib.sha1(str(directory).encode()).hexdigest()[:10]


def require_two_classes(
    where: str, classes: Sequence[str], labels: torch.Tensor, *, noun: str = "images", after: str = "", hint: str = ""
) -> None:
    """A classifier needs two classes with samples (a one-class one scores 100%): otherwise a :class:`DataError`
    naming ``where`` and the classes found."""
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    filled = [c for c, n in zip(classes, counts, strict=True) if n]
    if len(filled) >= 2:
        return
    listed = ", ".join(map(repr, classes[:CLASSES_SHOWN])) + (", …" if len(classes) > CLASSES_SHOWN else "")
    found = f"{len(classes)} class{'es' if len(classes) != 1 else ''} ({listed})"
    state = "" if len(classes) < 2 else f" but {f'only {filled[0]!r}' if filled else 'none'} holds {noun}{after}"
    raise DataError(f"{where} has {found}{state}: a classifier needs at least two classes with {noun}{hint}")
