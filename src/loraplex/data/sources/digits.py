"""``digits``: scikit-learn's 1,797 8×8 digits, grey levels 0..16 scaled to 0..255 (no official test)."""

from __future__ import annotations

import numpy as np
import torch

from .common import ImageSource
from .registry import Request, register_source


@register_source("digits", classes=10)
def load_digits(request: Request) -> ImageSource:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 grey levels -> 0..255
    return ImageSource(
        name="digits",
        images=torch.from_numpy(images),
        labels=torch.from_numpy(digits.target.astype(np.int64)),
        classes=[str(d) for d in range(10)],
    )
