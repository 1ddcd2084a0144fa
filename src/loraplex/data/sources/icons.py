"""``icons``: desktop icons from Debian's icon themes, labelled by the freedesktop context folder they sit in.

Themes (:data:`THEMES`): ``oxygen-icon-theme`` (KDE), ``gnome-icon-theme`` and ``mate-icon-theme`` (GNOME 2
lineage), each at 48×48 px, the largest size all three draw by hand.  The class is the context directory of the
icon-theme specification: ``actions``, ``apps``, ``categories``, ``devices``, ``emblems``, ``emotes``,
``mimetypes``, ``places``, ``status`` (``animations``, spinner frames, left out).  3,661 icons; the same name in
two themes is two different drawings and both are kept.  Icons are composited onto white and stored RGB.
Used for pre-training only: with nine broad contexts there is no held-out part worth a downstream table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import PRETRAIN_SIZE, ImageSource, cache_dir, directory_key
from .registry import Request, missing, register_source

ICON_ROOT = Path("/usr/share/icons")
THEMES = {"oxygen": "oxygen/base/48x48", "gnome": "gnome/48x48", "mate": "mate/48x48"}
CONTEXTS = ("actions", "apps", "categories", "devices", "emblems", "emotes", "mimetypes", "places", "status")
INSTALL = "apt-get update && apt-get install -y oxygen-icon-theme gnome-icon-theme mate-icon-theme"


def list_icons(root: str | Path = ICON_ROOT) -> tuple[list[Path], np.ndarray, list[str]]:
    """Sorted PNG paths of every theme, int64 labels indexing :data:`CONTEXTS`, the class names."""
    root = Path(root)
    absent = [theme for theme, sub in THEMES.items() if not (root / sub).is_dir()]
    if absent:
        raise missing("icons", f"icon themes {', '.join(absent)} not found under {root}")
    paths, labels = [], []
    for sub in THEMES.values():
        for label, context in enumerate(CONTEXTS):
            found = sorted((root / sub / context).glob("*.png"))
            paths += found
            labels += [label] * len(found)
    return paths, np.asarray(labels, dtype=np.int64), list(CONTEXTS)


def _load_one(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        icon = image.convert("RGBA")
    icon.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(icon, ((size - icon.width) // 2, (size - icon.height) // 2))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def load_icons(
    size: int = 64, root: str | Path = ICON_ROOT, cache: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 RGB images ``[N, size, size, 3]``, int64 labels, class names), decoded once into ``cache``."""
    paths, labels, classes = list_icons(root)
    if cache is not None and Path(cache).exists():
        with np.load(cache) as f:
            return f["images"], f["labels"], classes
    images = np.stack([_load_one(p, size) for p in paths])
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels)
    return images, labels, classes


@register_source("icons", classes=len(CONTEXTS), install=INSTALL)
def load_icons_source(request: Request) -> ImageSource:
    """The three themes by icon context, 64 px RGB on white, from `request.root` (default :data:`ICON_ROOT`),
    decoded once into the cache."""
    directory = Path(request.root or ICON_ROOT).resolve()
    cache = cache_dir() / f"icons-{PRETRAIN_SIZE}-{directory_key(directory)}.npz"
    images, labels, classes = load_icons(PRETRAIN_SIZE, directory, cache=cache)
    return ImageSource("icons", torch.from_numpy(images), torch.from_numpy(labels), classes)
