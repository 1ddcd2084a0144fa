"""Formula-driven fractal images for offline pre-training (after FractalDB, Kataoka et al., ACCV 2020).

Each class is a random 2D iterated function system (IFS) of 2–4 affine maps ``x -> A_k x + b_k``.
Systems are drawn with the σ-factor criterion of Anderson & Farrell (WACV 2022): with ``s_k1 >= s_k2``
the singular values of ``A_k``, ``σ = Σ_k (s_k1 + 2 s_k2)`` must lie in a target range.  Too small a σ
gives dust (a few isolated points), too large gives a filled blob; the range ``[(5+N)/2, (6+N)/2]``
for ``N`` maps gives line-and-branch structures.  Singular values are sampled *directly* so that σ hits
the range (no rejection loop), then rotations and a reflection complete each map.

Images are rendered with the chaos game, vectorised over many images and many chains at once with
numpy, into uint8 grey images (``H x W``, light fractal on a black background).  Instances of a class
differ by a random per-map scaling of the linear parts (FractalDB's "weight augmentation"), a random
flip and a random foreground grey level; further augmentation (random resized crop to 32 px,
inversion, ...) belongs to the training objective.  Everything is deterministic from a seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "IFS",
    "make_fractal_dataset",
    "render_fractals",
    "sample_ifs",
    "sample_systems",
    "sigma_factor",
]


@dataclass(frozen=True)
class IFS:
    """One iterated function system: ``linear[k] @ x + shift[k]`` chosen with probability ``prob[k]``."""

    linear: np.ndarray  # [m, 2, 2]
    shift: np.ndarray  # [m, 2]
    prob: np.ndarray  # [m], sums to 1


def sigma_factor(linear: np.ndarray) -> float:
    """Anderson & Farrell's σ-factor ``Σ_k (s_k1 + 2 s_k2)`` of the maps' linear parts ``[m, 2, 2]``."""
    s = np.linalg.svd(np.asarray(linear, dtype=np.float64), compute_uv=False)  # [m, 2], descending
    return float((s[:, 0] + 2.0 * s[:, 1]).sum())


def default_sigma_range(n_maps: int) -> tuple[float, float]:
    """The range Anderson & Farrell found to give the most useful fractals for ``n_maps`` maps."""
    return 0.5 * (5 + n_maps), 0.5 * (6 + n_maps)


def _sample_singular_values(rng: np.random.Generator, n_maps: int, total: float) -> np.ndarray:
    """``[n_maps, 2]`` singular values in [0, 1], ``s1 >= s2``, with ``Σ (s1 + 2 s2) == total``.

    Maps are filled one at a time; each map's share ``c = s1 + 2 s2`` is drawn uniformly from the
    interval that still lets the remaining maps (each contributing at most 3) reach the total.
    """
    out = np.zeros((n_maps, 2))
    remaining = total
    for k in range(n_maps):
        left = n_maps - k - 1
        lo, hi = max(0.0, remaining - 3.0 * left), min(3.0, remaining)
        c = hi if left == 0 else rng.uniform(lo, hi)
        # s2 = (c - s1) / 2 with 0 <= s2 <= min(s1, 1): s1 in [max(c/3, c-2), min(1, c)]
        s1 = rng.uniform(max(c / 3.0, c - 2.0), min(1.0, c))
        out[k] = s1, (c - s1) / 2.0
        remaining -= c
    return out


def _rotation(theta: np.ndarray) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def sample_ifs(
    rng: np.random.Generator,
    n_maps: tuple[int, int] = (2, 4),
    sigma_range: tuple[float, float] | None = None,
) -> IFS:
    """Draw one IFS: ``m`` maps (uniform in ``n_maps``, inclusive) with σ-factor in ``sigma_range``.

    ``sigma_range=None`` uses Anderson & Farrell's ``[(5+m)/2, (6+m)/2]`` for the drawn ``m``.
    Map probabilities are proportional to ``|det A_k|`` (FractalDB), so small maps are not over-drawn.
    """
    m = int(rng.integers(n_maps[0], n_maps[1] + 1))
    lo, hi = sigma_range if sigma_range is not None else default_sigma_range(m)
    lo, hi = max(lo, 0.0), min(hi, 3.0 * m)
    sv = _sample_singular_values(rng, m, rng.uniform(lo, hi))
    rot_u = _rotation(rng.uniform(-math.pi, math.pi, m))
    rot_v = _rotation(rng.uniform(-math.pi, math.pi, m))
    reflect = np.ones((m, 2))
    reflect[:, 1] = rng.choice([-1.0, 1.0], m)
    linear = rot_u @ (sv[:, :, None] * np.eye(2)) @ rot_v @ (reflect[:, :, None] * np.eye(2))
    shift = rng.uniform(-1.0, 1.0, (m, 2))
    det = np.abs(np.linalg.det(linear)) + 1e-3
    return IFS(linear=linear, shift=shift, prob=det / det.sum())


def sample_systems(
    n_classes: int,
    seed: int = 0,
    n_maps: tuple[int, int] = (2, 4),
    sigma_range: tuple[float, float] | None = None,
) -> list[IFS]:
    """``n_classes`` IFS class prototypes, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_ifs(rng, n_maps, sigma_range) for _ in range(n_classes)]


def _pack(systems: list[IFS], max_maps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pad systems to ``max_maps`` maps (probability 0) and stack them."""
    n = len(systems)
    lin = np.zeros((n, max_maps, 2, 2))
    sh = np.zeros((n, max_maps, 2))
    cum = np.ones((n, max_maps))
    for i, s in enumerate(systems):
        m = len(s.prob)
        lin[i, :m], sh[i, :m] = s.linear, s.shift
        cum[i, :m] = np.cumsum(s.prob)
    cum[:, -1] = 1.0 + 1e-9
    return lin, sh, cum


def render_fractals(
    systems: list[IFS],
    size: int = 64,
    seed: int = 0,
    chains: int = 128,
    steps: int = 80,
    burn_in: int = 12,
    jitter: float = 0.1,
    flip: bool = True,
    grey_range: tuple[float, float] = (0.6, 1.0),
    density: bool = False,
) -> np.ndarray:
    """Render one image per system with the chaos game: uint8 ``[len(systems), size, size]``.

    ``chains`` independent points per image are iterated ``steps`` times (the first ``burn_in``
    positions are discarded), so each image gets ``chains * (steps - burn_in)`` points.  Per image,
    each map's linear part is scaled by ``1 + U(-jitter, jitter)`` (FractalDB's weight augmentation)
    and the picture is flipped with probability 1/2.  Points are centred and scaled to fit the canvas
    with a 1-pixel margin (aspect ratio kept).  ``density=True`` shades pixels by log hit count
    instead of drawing every hit pixel at the foreground grey level.
    """
    rng = np.random.default_rng(seed)
    n = len(systems)
    max_maps = max(len(s.prob) for s in systems)
    lin, sh, cum = _pack(systems, max_maps)
    lin = lin * (1.0 + rng.uniform(-jitter, jitter, (n, max_maps, 1, 1)))
    coef = np.concatenate([lin.reshape(n, max_maps, 4), sh], axis=-1).astype(np.float32)  # [n, m, 6]
    coef = coef.reshape(n * max_maps, 6)
    base = (np.arange(n) * max_maps)[:, None]  # row offset of each image's maps

    x = rng.uniform(-1, 1, (n, chains)).astype(np.float32)
    y = rng.uniform(-1, 1, (n, chains)).astype(np.float32)
    cum32 = cum.astype(np.float32)[:, None, :]  # [n, 1, m]
    kept = steps - burn_in
    xs = np.empty((kept, n, chains), np.float32)
    ys = np.empty((kept, n, chains), np.float32)
    for t in range(steps):
        u = rng.random((n, chains), dtype=np.float32)
        k = (u[:, :, None] >= cum32).sum(-1)  # chosen map per chain
        c = coef[base + k]  # [n, chains, 6]
        x, y = c[..., 0] * x + c[..., 1] * y + c[..., 4], c[..., 2] * x + c[..., 3] * y + c[..., 5]
        if t >= burn_in:
            xs[t - burn_in], ys[t - burn_in] = x, y

    xs = xs.transpose(1, 0, 2).reshape(n, -1)
    ys = ys.transpose(1, 0, 2).reshape(n, -1)
    if flip:
        xs = np.where(rng.random((n, 1)) < 0.5, -xs, xs)
    lo_x, hi_x = xs.min(1, keepdims=True), xs.max(1, keepdims=True)
    lo_y, hi_y = ys.min(1, keepdims=True), ys.max(1, keepdims=True)
    extent = np.maximum(np.maximum(hi_x - lo_x, hi_y - lo_y), 1e-6)
    scale = (size - 2) / extent
    px = ((xs - (lo_x + hi_x) / 2) * scale + size / 2).astype(np.int64).clip(0, size - 1)
    py = ((ys - (lo_y + hi_y) / 2) * scale + size / 2).astype(np.int64).clip(0, size - 1)
    flat = (np.arange(n)[:, None] * size + py) * size + px
    counts = np.bincount(flat.ravel(), minlength=n * size * size).reshape(n, size, size).astype(np.float32)
    if density:
        img = np.log1p(counts)
        img /= np.maximum(img.reshape(n, -1).max(1), 1e-6)[:, None, None]
    else:
        img = (counts > 0).astype(np.float32)
    grey = rng.uniform(grey_range[0], grey_range[1], (n, 1, 1)).astype(np.float32)
    return np.round(img * grey * 255.0).astype(np.uint8)


def make_fractal_dataset(
    n_classes: int = 1000,
    per_class: int = 50,
    size: int = 64,
    seed: int = 0,
    cache: str | Path | None = None,
    chunk: int = 2000,
    **render_kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """A labelled fractal set: (uint8 images ``[n_classes*per_class, size, size]``, int64 labels).

    Rendering goes in chunks of ``chunk`` images to bound memory.  With ``cache``, the arrays are
    loaded from / saved to that ``.npz`` file (the cache is keyed by the caller's file name only, so
    put the settings in the name).
    """
    if cache is not None and Path(cache).exists():
        with np.load(cache) as f:
            return f["images"], f["labels"]
    systems = sample_systems(n_classes, seed=seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    order = [systems[c] for c in labels]
    parts = []
    for i, start in enumerate(range(0, len(order), chunk)):
        chunk_seed = int(np.random.SeedSequence([seed, 1, i]).generate_state(1)[0])
        parts.append(render_fractals(order[start : start + chunk], size=size, seed=chunk_seed, **render_kwargs))
    images = np.concatenate(parts)
    if cache is not None:
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=images, labels=labels)
    return images, labels
