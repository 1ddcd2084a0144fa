"""``medmnist:<set>``: a MedMNIST 2D set from its official ``<set>.npz`` (``pathmnist``, ``dermamnist`` …; MedMNIST+'s
larger sizes as ``pathmnist_64`` … ``_224``).

The file holds ``{train,val,test}_images`` (uint8 ``[N, H, W]`` grey or ``[N, H, W, 3]`` RGB) and
``{train,val,test}_labels`` (``[N, 1]``). It is read with ``np.load(allow_pickle=False)`` only: the arrays, never
code. The directory is ``data.roots.medmnist``, by default ``~/.medmnist`` (where the ``medmnist`` package downloads
to). The file's own splits are kept: in a run, train / val / test are drawn (stratified, seeded, when counts are
given) from the file's train / val / test, never re-split. A ``data.val_per_domain`` fraction is, as for every
source, of the training pool (the train split), drawn from the file's val split and capped at all of it: 0.2 takes
the whole val split of every 2D set (theirs are 11–19 % of their train splits).

Class counts are known for the twelve 2D sets (:data:`MEDMNIST_CLASSES`, from MedMNIST v2's documentation), so heads
are sized before any file is read, and labels are checked against them. ``chestmnist`` is multi-label (14 findings,
any number per image): loraplex's heads are single-label classifiers, so it is refused, as is any file whose labels
have more than one column. Another ``<set>.npz`` loads as a source (its class count read from its labels) but cannot
size a run's head, which is made before the data are read.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import DataError, ImageSource, SourceMissingError
from .registry import Request, register_source

MEDMNIST = "medmnist"
MEDMNIST_ROOT = "~/.medmnist"
MEDMNIST_CLASSES = {
    "pathmnist": 9,
    "chestmnist": 14,
    "dermamnist": 7,
    "octmnist": 4,
    "pneumoniamnist": 2,
    "retinamnist": 5,
    "breastmnist": 2,
    "bloodmnist": 8,
    "tissuemnist": 8,
    "organamnist": 11,
    "organcmnist": 11,
    "organsmnist": 11,
}
"""Classes of the MedMNIST v2 2D sets (labels for ``chestmnist``), from medmnist.com's table."""
MULTI_LABEL = frozenset({"chestmnist"})
SIZES = ("64", "128", "224")  # MedMNIST+'s files <set>_<size>.npz; the 28 px ones have no suffix
PARTS = ("train", "val", "test")
INSTALL = "pip install medmnist"
PYTHON_CLASS = {
    "pathmnist": "PathMNIST",
    "chestmnist": "ChestMNIST",
    "dermamnist": "DermaMNIST",
    "octmnist": "OCTMNIST",
    "pneumoniamnist": "PneumoniaMNIST",
    "retinamnist": "RetinaMNIST",
    "breastmnist": "BreastMNIST",
    "bloodmnist": "BloodMNIST",
    "tissuemnist": "TissueMNIST",
    "organamnist": "OrganAMNIST",
    "organcmnist": "OrganCMNIST",
    "organsmnist": "OrganSMNIST",
}
"""The ``medmnist`` package's class of each set, whose ``download=True`` writes the file into ``~/.medmnist``."""


@dataclass
class MedMNISTSource(ImageSource):
    """A MedMNIST set: its three official splits concatenated (train, val, test), ``official_val`` and
    ``official_test`` marking the last two."""

    official_val: torch.Tensor | None = None  # bool [N]


def set_name(name: str) -> tuple[str, str]:
    """(the set as given, its base set without a size suffix) of ``medmnist:<set>``."""
    _, _, given = name.partition(":")
    if not given:
        raise ValueError(f"{name!r}: name a MedMNIST set, medmnist:<set>, one of {', '.join(MEDMNIST_CLASSES)}")
    return given, re.sub(rf"_({'|'.join(SIZES)})$", "", given)


def _refuse_multi_label(name: str, labels: int) -> DataError:
    return DataError(
        f"{name} is multi-label ({labels} findings per image, any number of them present): loraplex's heads are "
        f"single-label classifiers (one class per image, softmax cross-entropy), so it cannot be a domain; use one of "
        f"{', '.join(n for n in MEDMNIST_CLASSES if n not in MULTI_LABEL)}"
    )


def medmnist_classes(argument: str | None) -> int:
    """Class count of ``medmnist:<set>`` from :data:`MEDMNIST_CLASSES`, without reading the file."""
    name = f"{MEDMNIST}:{argument or ''}"
    _, base = set_name(name)
    if base in MULTI_LABEL:
        raise _refuse_multi_label(name, MEDMNIST_CLASSES[base])
    if base not in MEDMNIST_CLASSES:
        raise ValueError(
            f"{name!r} is not one of MedMNIST's 2D sets ({', '.join(MEDMNIST_CLASSES)}, optionally _64/_128/_224): "
            "its class count, which sizes a head before any data are read, is unknown"
        )
    return MEDMNIST_CLASSES[base]


def npz_path(name: str, root: str | Path | None) -> Path:
    """The file ``medmnist:<set>`` reads; a missing one is a :class:`SourceMissingError` naming the key to set and
    the ``.npz`` files the directory has."""
    given, base = set_name(name)
    directory = Path(root or MEDMNIST_ROOT).expanduser()
    path = directory / f"{given}.npz"
    if path.is_file():
        return path
    present = sorted(p.stem for p in directory.glob("*.npz")) if directory.is_dir() else []
    where = "data.roots.medmnist" if root is not None else f"the default {MEDMNIST_ROOT}, data.roots.medmnist unset"
    size = given.removeprefix(base).removeprefix("_")
    fetch = (
        f"; `{INSTALL} && python -c \"import medmnist; medmnist.{PYTHON_CLASS[base]}(split='test', download=True"
        f'{f", size={size}" if size else ""})"` downloads it into {MEDMNIST_ROOT}'
        if base in PYTHON_CLASS
        else f"; the 2D sets: {', '.join(MEDMNIST_CLASSES)}"
    )
    raise SourceMissingError(
        f"{name!r} reads MedMNIST's official {given}.npz, which is not in {directory} ({where}; it holds "
        f"{', '.join(present) or 'no .npz file'}): set data.roots.medmnist to the directory holding it "
        f"(e.g. --set data.roots.medmnist=/data/medmnist){fetch}"
    )


def _labels(path: Path, part: str, raw: np.ndarray, images: int, name: str) -> np.ndarray:
    """``[N]`` int64 labels from the file's ``[N]``, ``[N, 1]`` (or ``[N, 1, 1]``) array."""
    if raw.ndim == 0 or len(raw) != images:
        raise DataError(f"{path}: {part}_labels has shape {raw.shape} for {images} {part} images")
    flat = raw.reshape(len(raw), -1)
    if flat.shape[1] != 1:
        raise _refuse_multi_label(name, flat.shape[1])
    if not np.issubdtype(flat.dtype, np.integer):
        raise DataError(f"{path}: {part}_labels are {flat.dtype}, expected integer class indices")
    return flat[:, 0].astype(np.int64)


def read_medmnist(name: str, root: str | Path | None) -> MedMNISTSource:
    """Read and check ``medmnist:<set>``'s file (see the module's docstring)."""
    path = npz_path(name, root)
    _, base = set_name(name)
    wanted = [f"{p}_{k}" for p in PARTS for k in ("images", "labels")]
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = list(npz.files)
            arrays = {key: npz[key] for key in wanted if key in files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # not a zip, damaged, or pickled objects
        raise DataError(f"cannot read {path} as MedMNIST's .npz of arrays: {err}") from err
    absent = [key for key in wanted if key not in arrays]
    if absent:
        raise DataError(f"{path} is not a MedMNIST file: no {', '.join(absent)} (it has {', '.join(files)})")
    arrays = {p: (arrays[f"{p}_images"], arrays[f"{p}_labels"]) for p in PARTS}
    shapes = {tuple(images.shape[1:]) for images, _ in arrays.values()}
    for part, (images, _) in arrays.items():
        if images.dtype != np.uint8:
            raise DataError(f"{path}: {part}_images are {images.dtype}, expected uint8")
        rgb = images.ndim == 4 and images.shape[-1] == 3
        if images.ndim != 3 and not rgb:
            volume = " (a 3-D set's volumes: only the 2D sets are images)" if images.ndim == 4 else ""
            expected = "expected [N, H, W] or [N, H, W, 3]"
            raise DataError(f"{path}: {part}_images have shape {tuple(images.shape)}, {expected}{volume}")
    if len(shapes) > 1:
        raise DataError(f"{path}: the splits' images differ in shape: {sorted(shapes)}")
    labels = {p: _labels(path, p, raw, len(images), name) for p, (images, raw) in arrays.items()}
    everything = np.concatenate([labels[p] for p in PARTS])
    classes = MEDMNIST_CLASSES.get(base, int(everything.max(initial=-1)) + 1)
    if everything.size and (everything.min() < 0 or everything.max() >= classes):
        raise DataError(f"{path}: labels span {everything.min()}..{everything.max()}; {base} has {classes} classes")
    sizes = [len(labels[p]) for p in PARTS]
    part_of = np.repeat(np.arange(len(PARTS)), sizes)
    return MedMNISTSource(
        name=name,
        images=torch.from_numpy(np.concatenate([arrays[p][0] for p in PARTS])),
        labels=torch.from_numpy(everything),
        classes=[str(k) for k in range(classes)],
        official_test=torch.from_numpy(part_of == 2),
        official_val=torch.from_numpy(part_of == 1),
    )


@register_source(MEDMNIST, argument="<set>", classes=medmnist_classes, install=INSTALL)
def load_medmnist(request: Request) -> ImageSource:
    """`request.root` is the directory of the ``.npz`` files (default ``~/.medmnist``). Loaded eagerly, the official
    test split is marked (``official_test``) and the file's val split joins the training pool; a run keeps all three
    (``official_val``)."""
    return read_medmnist(request.name, request.root)
