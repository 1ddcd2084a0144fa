"""``clipart[-seen|-held]``: real human-made images no benchmark uses, Debian's ``openclipart-png`` (8,121 clip-art
PNGs).

Files live under ``/usr/share/openclipart/png/<category>/<sub-category>/...``.  Labels come from the
first two directory levels (``level=2``): ``animals/birds``, ``food/fruit``, ...; files sitting directly
in a category get the category itself (``animals``).  Classes with fewer than ``min_per_class`` images
are merged into their top-level category, and what is still too small is dropped.  With the defaults
(``level=2``, ``min_per_class=20``) this gives 61 classes over 8,068 of the 8,121 images (heavily
unbalanced: 21 to 1,853 images, ``computer/icons`` and ``shapes/stars`` 1,378 being the giants);
``level=1`` gives 19 top-level categories over 8,095 images.

Ten sub-categories of everyday things are held out of pre-training for downstream use
(:data:`HELD_OUT`, 757 images from 34 to 126 each): ``clipart-seen`` is the other 51 classes, ``clipart-held``
those ten; ``clipart`` (what the first zoo backbones saw) is all 61.

Images are composited onto white (clip art is dark-on-light; the objective's random inversion covers
the light-on-dark benchmarks), fitted into a square with the aspect ratio kept, and stored as uint8.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .common import PRETRAIN_SIZE, ImageSource, cache_dir, directory_key
from .registry import Request, missing, register_source

CLIPART_ROOT = Path("/usr/share/openclipart/png")
INSTALL = "apt-get update && apt-get install -y openclipart-png"


HELD_OUT = (
    "animals/birds", "animals/mammals", "food/desserts", "food/fruit", "people/clothing",
    "plants/flowers", "recreation/music", "recreation/sports", "tools", "transportation/vehicles",
)  # fmt: skip
"""Classes a downstream task could ask about, 30+ images each, never shown to a ``clipart-seen`` backbone."""


def clipart_part(labels: np.ndarray, classes: list[str], part: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(positions, relabelled labels, class names) of one part of the default 61 classes: ``all``, ``seen`` or
    ``held`` (:data:`HELD_OUT`)."""
    if part not in ("all", "seen", "held"):
        raise ValueError(f"clip-art part must be all, seen or held, not {part!r}")
    if part == "all":
        return np.arange(len(labels)), labels, classes
    missing = sorted(set(HELD_OUT) - set(classes))
    if missing:
        raise ValueError(f"clip-art classes {missing} are held out but not among this collection's classes")
    chosen = [c for c in classes if (c in HELD_OUT) == (part == "held")]
    old = np.array([classes.index(c) for c in chosen])
    remap = np.full(len(classes), -1, dtype=np.int64)
    remap[old] = np.arange(len(chosen))
    positions = np.flatnonzero(remap[labels] >= 0)
    return positions, remap[labels[positions]], chosen


def list_clipart(
    root: str | Path = CLIPART_ROOT, level: int = 2, min_per_class: int = 20
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Sorted PNG paths, int64 labels and class names (labels index the sorted names)."""
    root = Path(root)
    paths = sorted(root.rglob("*.png")) if root.is_dir() else []
    if not paths:
        raise missing("clipart", f"no clip-art PNGs under {root}")
    rel = [p.relative_to(root).parts[:-1] for p in paths]
    names = ["/".join(parts[:level]) for parts in rel]
    counts = Counter(names)
    names = [n if counts[n] >= min_per_class else "/".join(parts[:1]) for n, parts in zip(names, rel, strict=True)]
    counts = Counter(names)
    keep = [i for i, n in enumerate(names) if counts[n] >= min_per_class]
    classes = sorted({names[i] for i in keep})
    index = {c: i for i, c in enumerate(classes)}
    return [paths[i] for i in keep], np.array([index[names[i]] for i in keep], dtype=np.int64), classes


MAX_PIXELS = 16_000_000  # a few PNGs are giant posters (one is 231 Mpx); decoding them costs minutes


def _load_one(path: Path, size: int, grey: bool) -> np.ndarray | None:
    """One image fitted into ``size`` px on white, or None if it is too large to decode cheaply."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            return None
    with im:
        if im.width * im.height > MAX_PIXELS:
            return None
        im = im.convert("RGBA")
        im.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        canvas.alpha_composite(im, ((size - im.width) // 2, (size - im.height) // 2))
        out = canvas.convert("L" if grey else "RGB")
        return np.asarray(out, dtype=np.uint8)


def load_clipart(
    size: int = 64,
    grey: bool = True,
    level: int = 2,
    min_per_class: int = 20,
    root: str | Path = CLIPART_ROOT,
    cache: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images ``[N, size, size]`` or ``[N, size, size, 3]``, int64 labels, class names).

    Images over ``MAX_PIXELS`` are skipped.  With ``cache`` (an ``.npz`` path), arrays are loaded
    from / saved to it, since decoding all PNGs takes minutes on one core.
    """
    if cache is not None and Path(cache).exists():
        with np.load(cache) as f:
            return f["images"], f["labels"], [str(c) for c in f["classes"]]
    paths, labels, classes = list_clipart(root, level, min_per_class)
    loaded = [_load_one(p, size, grey) for p in paths]
    keep = [i for i, im in enumerate(loaded) if im is not None]
    images = np.stack([loaded[i] for i in keep])
    labels = labels[keep]
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels, classes=np.array(classes))
    return images, labels, classes


@register_source("clipart", parts=True, install=INSTALL)
def load_clipart_source(request: Request) -> ImageSource:
    """The 61 sub-categories or one part of them, 64 px grey on white, from `request.root` (default
    :data:`CLIPART_ROOT`); the decoded arrays are cached, since decoding 8,000 PNGs takes minutes."""
    directory = Path(request.root or CLIPART_ROOT).resolve()
    cache = cache_dir() / f"clipart-{PRETRAIN_SIZE}-grey-{directory_key(directory)}.npz"  # one per source directory
    images, labels, classes = load_clipart(size=PRETRAIN_SIZE, root=directory, cache=cache)
    positions, labels, classes = clipart_part(labels, classes, request.part)
    return ImageSource(request.name, torch.from_numpy(images[positions]), torch.from_numpy(labels), classes)
