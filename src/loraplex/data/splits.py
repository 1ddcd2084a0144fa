"""Seeded, stratified train / val / test splits.

Test comes from the source's official test split when it has one, otherwise it is carved from the pool first;
validation is always carved from what remains for training, so model selection never sees test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .sources import ImageSource


@dataclass(frozen=True)
class Splits:
    """Index tensors (int64, ascending) into the source's images; disjoint."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def split(
    source: ImageSource, *, seed: int, train: int | None = None, val: int | float = 0.1, test: int | None = None
) -> Splits:
    """Split `source` deterministically from `seed`, each part stratified by label.

    `train=None` takes every image left after val (and test); `val` is a count or a fraction of the training
    pool; `test=None` takes the whole official test split (required as a count when the source has none).
    """
    labels = source.labels.numpy()
    rng = np.random.default_rng(seed)
    everything = np.arange(len(labels))
    if source.official_test is not None:
        is_test = source.official_test.numpy()
        pool, test_pool = everything[~is_test], everything[is_test]
        test_idx = test_pool if test is None else _take(test_pool, labels, test, rng, source.name, "test")[0]
    else:
        if test is None:
            raise ValueError(f"{source.name} has no official test split; pass test=<number of images> to carve one")
        test_idx, pool = _take(everything, labels, test, rng, source.name, "test")
    if isinstance(val, float) and not 0.0 <= val < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {val}")
    n_val = round(val * len(pool)) if isinstance(val, float) else val
    val_idx, rest = _take(pool, labels, n_val, rng, source.name, "val")
    train_idx = rest if train is None else _take(rest, labels, train, rng, source.name, "train")[0]
    return Splits(*(torch.from_numpy(np.sort(part)).long() for part in (train_idx, val_idx, test_idx)))


def _take(
    indices: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, name: str, part: str
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` of `indices` with per-class counts within ±1 of proportional (largest remainder); return
    (taken, rest)."""
    if not 0 <= n <= len(indices):
        raise ValueError(f"asked for {n} {part} images from {name}, but only {len(indices)} are available for {part}")
    classes, counts = np.unique(labels[indices], return_counts=True)
    exact = n * counts / len(indices)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact, kind="stable")[: n - quota.sum()]] += 1
    taken = [rng.permutation(indices[labels[indices] == c])[:q] for c, q in zip(classes, quota, strict=True)]
    chosen = np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)
    return chosen, np.setdiff1d(indices, chosen)


def class_balanced(labels: torch.Tensor, power: float) -> torch.Tensor:
    """Indices into ``labels`` with each image of class ``c`` repeated ``round((n_max / n_c) ** power)``
    times, so that class frequencies go from ``∝ n_c`` (power 0) towards uniform (power 1).

    Repeating (rather than weighted sampling) keeps the stream's without-replacement epochs, its
    resumable cursor and its exact rank sharding unchanged: an epoch is one pass over this pool.
    Why it matters: clip-art classes range from 21 to 1,853 images, and without re-weighting a
    supervised head learns the two giant classes and the backbone little else."""
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"class balance power must lie in [0, 1], got {power}")
    counts = torch.bincount(labels)
    repeats = ((counts.max() / counts.clamp(min=1)) ** power).round().long().clamp(min=1)
    return torch.arange(len(labels)).repeat_interleave(repeats[labels])
