"""Reference floors every benchmark table carries: logistic regression on raw pixels.

(The other floor, a small CNN trained from scratch with the same step budget, is an ordinary run:
backbone ``resnet10t`` from timm, method ``full_finetune``; see ``benchmarks/three_domain.py``.)
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import DomainData, eval_batches

C_GRID = (0.01, 0.1, 1.0)


def _pixels(domain: DomainData) -> np.ndarray:
    """Every sample (image or whole clip, in evaluation form) as one flat row in [0, 1]."""
    samples = torch.cat([batch for batch, _ in eval_batches(domain, 1024)])
    return samples.reshape(len(domain), -1).numpy().astype(np.float32) / 255.0


def pixel_logistic_regression(
    train: list[DomainData], val: list[DomainData], test: list[DomainData]
) -> dict[str, float]:
    """Per-domain test accuracy of an L2 logistic regression on raw pixels, ``C`` chosen on validation."""
    from sklearn.linear_model import LogisticRegression  # heavy import, only when a floor is asked for

    metrics = {}
    for tr, va, te in zip(train, val, test, strict=True):
        fits = [LogisticRegression(C=c, max_iter=2000).fit(_pixels(tr), tr.labels.numpy()) for c in C_GRID]
        best = max(fits, key=lambda m: m.score(_pixels(va), va.labels.numpy()))
        metrics[f"acc/{te.name}"] = float(best.score(_pixels(te), te.labels.numpy()))
    metrics["acc/mean"] = sum(metrics.values()) / len(metrics)
    return metrics
