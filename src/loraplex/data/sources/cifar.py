"""``cifar100`` and ``cifar10``: CIFAR in its binary distribution (``cifar-100-binary.tar.gz`` /
``cifar-10-binary.tar.gz`` unpacked), with the official train / test split.

A record is its label byte(s) then 3072 pixel bytes: the red, green and blue planes of a 32×32 image, each row by
row. CIFAR-100 has two label bytes (coarse, then fine; the fine label is the class, as in the papers), CIFAR-10 one::

    cifar-100-binary/train.bin test.bin fine_label_names.txt coarse_label_names.txt
    cifar-10-batches-bin/data_batch_1.bin … data_batch_5.bin test_batch.bin batches.meta.txt

The files are read as bytes with ``np.frombuffer``. The python distribution (``cifar-100-python``) is never read: it
is pickled, and unpickling a file runs whatever code it holds. ``data.roots.<name>`` may be the folder holding the
``.bin`` files or its parent. Nothing is downloaded: the errors say where the binary archives are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import DataError, ImageSource, SourceMissingError
from .folder import folder_path
from .registry import Request, register_source

PIXELS = 3 * 32 * 32
CIFAR_PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
LISTED = 8  # entries of a root an error names


@dataclass(frozen=True)
class CifarLayout:
    """One CIFAR binary distribution: its source name (also the ``data.roots`` key), its folder, archive and the
    pickled distribution's folder, its files, the label bytes of a record (the class is the last) and the classes."""

    name: str
    title: str
    folder: str
    archive: str
    pickled: str
    train: tuple[str, ...]
    test: str
    names: str
    label_bytes: int
    classes: int

    @property
    def record(self) -> int:
        return self.label_bytes + PIXELS

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train, self.test)


CIFAR100 = CifarLayout(
    "cifar100",
    "CIFAR-100",
    "cifar-100-binary",
    "cifar-100-binary.tar.gz",
    "cifar-100-python",
    ("train.bin",),
    "test.bin",
    "fine_label_names.txt",
    2,
    100,
)
CIFAR10 = CifarLayout(
    "cifar10",
    "CIFAR-10",
    "cifar-10-batches-bin",
    "cifar-10-binary.tar.gz",
    "cifar-10-batches-py",
    tuple(f"data_batch_{k}.bin" for k in range(1, 6)),
    "test_batch.bin",
    "batches.meta.txt",
    1,
    10,
)
LAYOUTS = {layout.name: layout for layout in (CIFAR100, CIFAR10)}


def _fetch(layout: CifarLayout) -> str:
    return (
        f"get {layout.archive} (the binary version) from {CIFAR_PAGE}, unpack it (tar xzf {layout.archive}) and set "
        f"data.roots.{layout.name} to {layout.folder} or the directory holding it "
        f"(e.g. --set data.roots.{layout.name}=/data/{layout.folder})"
    )


def cifar_folder(layout: CifarLayout, root: str | Path | None) -> Path:
    """The folder holding the layout's ``.bin`` files: ``root`` itself or its ``cifar-…-binary`` subfolder. Missing
    files, a packed archive or only the pickled distribution are a :class:`SourceMissingError` saying so."""
    if root is None:
        raise SourceMissingError(f"{layout.name} reads {layout.title}'s binary files from disk: {_fetch(layout)}")
    base = folder_path(root)
    if not base.is_dir():
        raise SourceMissingError(f"{layout.title} root {base} (data.roots.{layout.name}) is not a directory")
    folder = base if any((base / f).is_file() for f in layout.files) else base / layout.folder
    absent = [f for f in layout.files if not (folder / f).is_file()]
    if not absent:
        return folder
    if base.name == layout.pickled or (base / layout.pickled).is_dir():
        raise SourceMissingError(
            f"{base} (data.roots.{layout.name}) holds {layout.title}'s python distribution ({layout.pickled}), "
            f"which is pickled and never read (unpickling runs code from the file): {_fetch(layout)}"
        )
    if (base / layout.archive).is_file():
        raise SourceMissingError(f"{base / layout.archive} is not unpacked: {_fetch(layout)}")
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    shown = ", ".join(present[:LISTED]) + (", …" if len(present) > LISTED else "")
    raise SourceMissingError(
        f"{layout.title}'s binary files {', '.join(absent)} are not in {folder} (data.roots.{layout.name}; it "
        f"{f'holds {shown}' if folder.is_dir() else 'does not exist'}): {_fetch(layout)}"
    )


def read_records(layout: CifarLayout, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, 32, 32, 3]`` and int64 class labels of one ``.bin`` file, its size and labels checked."""
    size = path.stat().st_size
    if size == 0 or size % layout.record:
        raise DataError(
            f"{path} is {size} bytes, not a whole number of {layout.title} records ({layout.record} bytes: "
            f"{layout.label_bytes} label byte{'s' * (layout.label_bytes > 1)}, then 3072 bytes of R, G, B planes): "
            f"truncated, or not the binary distribution; unpack {layout.archive} again"
        )
    records = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, layout.record)
    labels = records[:, layout.label_bytes - 1].astype(np.int64)
    if labels.max() >= layout.classes:
        row = int(np.argmax(labels >= layout.classes))
        raise DataError(
            f"{path}: record {row} has label {labels[row]}; {layout.title} has {layout.classes} classes "
            f"(is this {layout.title}'s file?)"
        )
    images = records[:, layout.label_bytes :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def class_names(layout: CifarLayout, folder: Path) -> list[str]:
    """The classes from the distribution's names file (one a line), or their numbers when it is absent."""
    path = folder / layout.names
    if not path.is_file():
        return [str(k) for k in range(layout.classes)]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != layout.classes:
        raise DataError(f"{path} names {len(names)} classes; {layout.title} has {layout.classes}")
    return names


def read_cifar(layout: CifarLayout, root: str | Path | None) -> ImageSource:
    """The training files then the test file, ``official_test`` marking the latter."""
    folder = cifar_folder(layout, root)
    parts = [read_records(layout, folder / f) for f in layout.files]
    test_rows = len(parts[-1][1])
    labels = np.concatenate([part[1] for part in parts])
    return ImageSource(
        name=layout.name,
        images=torch.from_numpy(np.concatenate([part[0] for part in parts])),
        labels=torch.from_numpy(labels),
        classes=class_names(layout, folder),
        official_test=torch.from_numpy(np.arange(len(labels)) >= len(labels) - test_rows),
    )


def _load(request: Request) -> ImageSource:
    """`request.root` is ``data.roots.<name>``; images stay at their 32 px (a run resizes them to its input size)."""
    return read_cifar(LAYOUTS[request.name], request.root)


for _layout in LAYOUTS.values():
    register_source(_layout.name, classes=_layout.classes)(_load)
