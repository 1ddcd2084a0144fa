"""``fractals[:<classes>x<per_class>]``: formula-driven fractals after FractalDB (default 1000x50), rendered by
:mod:`loraplex.data.fractals` deterministically (seed 0), 64 px grey, and cached."""

from __future__ import annotations

import torch

from ..fractals import make_fractal_dataset
from .common import PRETRAIN_SIZE, ImageSource, cache_dir
from .registry import Request, register_source

DEFAULT = "1000x50"


def _counts(argument: str | None) -> tuple[int, int]:
    """``(classes, per_class)`` of ``fractals:<classes>x<per_class>``."""
    try:
        n_classes, per_class = (int(v) for v in (argument or DEFAULT).split("x"))
    except ValueError as err:
        raise ValueError(
            f"source 'fractals:{argument}': expected fractals:<classes>x<per_class>, e.g. fractals:{DEFAULT}"
        ) from err
    return n_classes, per_class


@register_source("fractals", argument="<classes>x<per_class>", optional=True, classes=lambda arg: _counts(arg)[0])
def load_fractals(request: Request) -> ImageSource:
    n_classes, per_class = _counts(request.argument)
    cache = cache_dir() / f"fractals-{n_classes}x{per_class}-{PRETRAIN_SIZE}.npz"
    images, labels = make_fractal_dataset(n_classes, per_class, size=PRETRAIN_SIZE, seed=0, cache=cache)
    classes = [f"ifs{i}" for i in range(n_classes)]
    return ImageSource(request.name, torch.from_numpy(images), torch.from_numpy(labels), classes)
