"""Reference floors every benchmark table carries: logistic regression on raw pixels.

For dense tasks the floor predicts each pixel from the raw pixels of its ``PATCH × PATCH`` neighbourhood:
logistic regression for semseg (multinomial) and saliency (class-balanced, as the dense loss is), ridge
regression for normals and depth; the regularisation is chosen on validation like the classification
floor's ``C``.  (The other floor, a small CNN trained from scratch with the same step budget, is an
ordinary run: backbone ``resnet10t`` from timm, method ``full_finetune``, a ``TimmPyramid`` under the
dense heads; see ``benchmarks/three_domain.py`` and ``benchmarks/scenes.py``.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DomainData, eval_batches
from .dense import IGNORE, DenseMeter, quality

C_GRID = (0.01, 0.1, 1.0)
PATCH = 5  # raw-pixel neighbourhood a dense floor predicts each pixel from
FIT_PIXELS = 50_000  # pixels drawn from the training split to fit each dense floor model


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


def _pixel_patches(domain: DomainData) -> tuple[np.ndarray, torch.Tensor, tuple[int, int, int]]:
    """Per-pixel raw neighbourhoods ``[N·H·W, C·PATCH²]`` in [0, 1], the packed targets, and ``(N, H, W)``."""
    images, targets = zip(*eval_batches(domain, 256), strict=True)
    x = torch.cat(images).float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    patches = F.unfold(x, PATCH, padding=PATCH // 2).transpose(1, 2).reshape(n * h * w, -1)
    return patches.numpy(), torch.cat(targets), (n, h, w)


def _pixel_targets(task: str, target: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A task's per-pixel target rows and which pixels count (ignore labels, invalid normals)."""
    if target.dim() == 3:  # class ids or a mask [N, H, W]
        y = target.reshape(-1).numpy()
        return y, y != IGNORE
    y = target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]).numpy()
    return y, (np.abs(y).sum(1) > 0) if task == "normals" else np.ones(len(y), dtype=bool)


def _fit(task: str, strength: float, x: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression, Ridge

    if task in ("semseg", "parts"):
        return LogisticRegression(C=strength, max_iter=300).fit(x, y.astype(np.int64))
    if task == "saliency":
        return LogisticRegression(C=strength, class_weight="balanced", max_iter=300).fit(x, y > 0.5)
    return Ridge(alpha=1.0 / strength).fit(x, y)


def _predict(model, task: str, outputs: int, x: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
    """Predictions shaped like a dense head's output ``[N, K, H, W]``."""
    if task in ("semseg", "parts"):
        scores = np.full((len(x), outputs), -1e9, dtype=np.float32)  # classes never seen in the fit lose
        scores[:, model.classes_] = model.decision_function(x)
    elif task == "saliency":
        scores = model.decision_function(x)[:, None]
    else:
        scores = model.predict(x).reshape(len(x), -1)
    n, h, w = shape
    return torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).view(n, h, w, -1).permute(0, 3, 1, 2)


def dense_pixel_floor(
    splits: dict[str, DomainData],
    tasks: Sequence[str],
    outputs: dict[str, int],
    target_of: Callable[[torch.Tensor, str], torch.Tensor],
    seed: int = 0,
) -> dict[str, float]:
    """Test metrics (named as the multitask regime names them) of linear models on raw pixel patches."""
    (train,), (val,), (test,) = splits["train"], splits["val"], splits["test"]
    x_train, packed_train, _ = _pixel_patches(train)
    held_out = {"val": _pixel_patches(val), "test": _pixel_patches(test)}
    rng = np.random.default_rng(seed)
    metrics: dict[str, float] = {}
    for task in tasks:
        y, keep = _pixel_targets(task, target_of(packed_train, task))
        rows = rng.permutation(np.flatnonzero(keep))[:FIT_PIXELS]

        def evaluate(model, split: str, task: str = task) -> dict[str, float]:
            x, packed, shape = held_out[split]
            meter = DenseMeter(task, outputs[task])
            meter.update(_predict(model, task, outputs[task], x, shape), target_of(packed, task))
            return meter.result()

        fits = [_fit(task, c, x_train[rows], y[rows]) for c in C_GRID]
        best = max(fits, key=lambda m: quality(task, evaluate(m, "val")))
        metrics |= {f"{task}/{k}": v for k, v in evaluate(best, "test").items()}
    return metrics
