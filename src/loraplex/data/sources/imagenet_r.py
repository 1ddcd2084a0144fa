"""``imagenet_r``: ImageNet-R(endition) in its distributed layout, one folder per WordNet id (``imagenet-r.tar``
unpacked: ``imagenet-r/n01443537/*.jpg`` …, 200 classes, ~30k images of different sizes).

``data.roots.imagenet_r`` is the ``imagenet-r`` folder or the directory holding it. It is a class-per-subdirectory
image folder (:mod:`.folder`): in a run decoded on demand at the input size, every file checked at start-up, split
by seed from its labels. The classes are the WordNet ids, sorted; there must be 200 of them (heads are sized before
the data are read).

ImageNet-R has no official train / test split. The continual-learning papers (CODA-Prompt, InfLoRA) draw 80 % of
the images for training and 20 % for test; here, without ``data.test_per_domain``, a run holds out
:data:`IMAGENET_R_TEST` of the images as its test part, stratified by class and drawn with ``data.seed`` (so every
class is in both parts in proportion, and a seed names the split); validation is then carved from the training 80 %.
Splitting the 200 classes into continual tasks is the run's business, not the loader's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .common import CLASSES_SHOWN, DataError, ImageSource, SourceMissingError
from .folder import folder_path, load_folder, readable_folder
from .registry import Request, register_source

IMAGENET_R = "imagenet_r"
IMAGENET_R_CLASSES = 200
IMAGENET_R_FOLDER = "imagenet-r"
IMAGENET_R_TEST = 0.2
"""The share of the images a run holds out as its test part when ``data.test_per_domain`` is unset: the papers'
80 / 20 split, stratified and seeded."""
IMAGENET_R_SOURCE = "https://github.com/hendrycks/imagenet-r (imagenet-r.tar)"


def imagenet_r_folder(root: str | Path | None) -> Path:
    """The folder of the 200 class folders: ``root`` or its ``imagenet-r`` subfolder, its class count checked (the
    files are not: see :func:`imagenet_r_files`)."""
    if root is None:
        raise SourceMissingError(
            f"{IMAGENET_R} reads ImageNet-R from disk: set data.roots.{IMAGENET_R} to the {IMAGENET_R_FOLDER} folder "
            f"(one folder per WordNet id) or the directory holding it (e.g. --set data.roots.{IMAGENET_R}="
            f"/data/{IMAGENET_R_FOLDER}); it is distributed at {IMAGENET_R_SOURCE}"
        )
    base = folder_path(root)
    if not base.is_dir():
        raise SourceMissingError(f"ImageNet-R root {base} (data.roots.{IMAGENET_R}) is not a directory")
    folder = base / IMAGENET_R_FOLDER if (base / IMAGENET_R_FOLDER).is_dir() else base
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) != IMAGENET_R_CLASSES:
        shown = ", ".join(classes[:CLASSES_SHOWN]) + (", …" if len(classes) > CLASSES_SHOWN else "")
        raise DataError(
            f"ImageNet-R folder {folder} (data.roots.{IMAGENET_R}) has {len(classes)} class folders "
            f"({shown or 'none'}); ImageNet-R has {IMAGENET_R_CLASSES}, one per WordNet id (n01443537 …), as "
            f"{IMAGENET_R_FOLDER}.tar unpacks"
        )
    return folder


def imagenet_r_files(
    root: str | Path | None, *, skip_unreadable: bool = False
) -> tuple[list[str], list[Path], torch.Tensor]:
    """Classes, image files and labels, every file read as a run reads a folder (:func:`~.folder.readable_folder`)."""
    return readable_folder(imagenet_r_folder(root), skip_unreadable=skip_unreadable)


@register_source(IMAGENET_R, classes=IMAGENET_R_CLASSES)
def load_imagenet_r(request: Request) -> ImageSource:
    """Every image decoded into memory (resized to ``request.size``, which their different sizes need), as
    ``folder:``."""
    loaded = load_folder(dataclasses.replace(request, argument=str(imagenet_r_folder(request.root))))
    return dataclasses.replace(loaded, name=IMAGENET_R)
