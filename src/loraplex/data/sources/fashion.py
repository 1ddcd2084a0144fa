"""``fashion``: Fashion-MNIST from the IDX files Debian's ``dataset-fashion-mnist`` installs (70,000 28 px grey
images, the official 10,000-image test split marked); torchvision downloads them only when asked."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from .common import ImageSource, cache_dir
from .registry import Request, missing, register_source

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
"""Where Debian's `dataset-fashion-mnist` installs the IDX files."""
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"

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

# IDX type codes (http://yann.lecun.com/exdb/mnist/): multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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


@register_source("fashion", classes=len(FASHION_CLASSES), install=FASHION_INSTALL)
def load_fashion(request: Request) -> ImageSource:
    """`request.root` is the directory of the IDX files (default `FASHION_ROOT`; with `download`, where they are
    downloaded to, default the cache directory)."""
    directory = Path(request.root or FASHION_ROOT)
    if request.download:
        directory = _download_fashion(Path(request.root).expanduser() if request.root else cache_dir())
    stems = [f"{part}-{kind}" for part in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    found = {stem: _find_idx(directory, stem) for stem in stems}
    absent = [f"{stem}(.gz)" for stem, path in found.items() if path is None]
    if absent:
        raise missing(
            "fashion",
            f"Fashion-MNIST IDX files not found in {directory}: missing {', '.join(absent)} (pass root= a directory "
            f"holding them; the Debian package installs them into {FASHION_ROOT})",
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
        raise missing(
            "fashion",
            f"could not download Fashion-MNIST into {root} ({err}); without network, install it ({FASHION_ROOT})",
        ) from err
    return Path(dataset.raw_folder)
