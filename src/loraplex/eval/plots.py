"""Report figures: plain numbers in, PNG bytes out.

Figures are built on ``matplotlib.figure.Figure`` (rendered by the Agg canvas), never through pyplot, so
importing loraplex does not switch a user's backend (e.g. in a notebook) and no figure stays alive in
pyplot's global registry after it is written.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

DPI = 100
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
LINESTYLES = ["-", "--", ":", "-."]
LEGEND_FONTSIZE = 9
MARKER_MAX_POINTS = 30  # sparse curves (validation) get markers so single evaluations stay visible


@dataclass
class Line:
    """One run's curve; lines of one ``group`` share a colour so that seeds of a method read as one family."""

    label: str
    group: str
    steps: list[float]
    values: list[float]


@dataclass
class Panel:
    title: str
    ylabel: str
    lines: list[Line]


def palette(groups: list[str]) -> dict[str, str]:
    """One colour per group, shared by every figure of a report so a method keeps its colour throughout."""
    return {g: PALETTE[i % len(PALETTE)] for i, g in enumerate(groups)}


def running_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean: per-step training losses of mixed batches are too noisy to compare runs by eye."""
    if window <= 1:
        return list(values)
    sums = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return list((sums[idx] - sums[lo]) / (idx - lo))


def _text(s: str) -> str:
    """Matplotlib reads ``$...$`` as mathtext and drops legend labels starting with ``_``: neutralise both."""
    s = s.replace("$", r"\$")
    return " " + s if s.startswith("_") else s


def _legend(fig: Figure, handles: list, labels: list[str], width_inches: float) -> None:
    """A legend below the axes with as many columns as fit the figure's width, so no label is cut off."""
    chars = width_inches * 72 / (LEGEND_FONTSIZE * 0.62)  # average glyph width of DejaVu Sans ≈ 0.6 em
    per_entry = max(len(label) for label in labels) + 6  # the line sample and the spacing
    ncols = max(1, min(len(labels), int(chars // per_entry)))
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=LEGEND_FONTSIZE)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def curves(panels: list[Panel], colors: dict[str, str], xlabel: str = "step") -> bytes:
    """Side-by-side line panels with one shared legend below them (one entry per run)."""
    width = 5.5 * len(panels)
    fig = Figure(figsize=(width, 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    handles: dict[str, object] = {}
    styles: dict[str, str] = {}
    per_group: dict[str, int] = {}
    for ax, panel in zip(axes, panels, strict=True):
        for line in panel.lines:
            if line.label not in styles:
                k = per_group[line.group] = per_group.get(line.group, -1) + 1
                styles[line.label] = LINESTYLES[k % len(LINESTYLES)]
            marker = "o" if len(line.values) <= MARKER_MAX_POINTS else None
            (handle,) = ax.plot(
                line.steps,
                line.values,
                color=colors[line.group],
                linestyle=styles[line.label],
                marker=marker,
                markersize=3.5,
                linewidth=1.6,
            )
            handles.setdefault(line.label, handle)
        ax.set_title(_text(panel.title), fontsize=11)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_text(panel.ylabel))
        ax.grid(alpha=0.3)
    if handles:
        _legend(fig, list(handles.values()), [_text(label) for label in handles], width)
    return _png(fig)


def grouped_bars(
    categories: list[str],
    series: list[tuple[str, list[float], list[float]]],
    colors: dict[str, str],
    ylabel: str,
    ylim: tuple[float, float] | None = None,
) -> bytes:
    """One group of bars per category, one bar per series ``(label, heights, errors)``; NaN draws nothing."""
    x = np.arange(len(categories))
    width = 0.8 / max(len(series), 1)
    width_inches = max(8.0, 1.1 + 0.45 * len(categories) * max(len(series), 2))
    fig = Figure(figsize=(width_inches, 4.4), layout="constrained")
    ax = fig.subplots()
    bars = []
    for i, (label, heights, errors) in enumerate(series):
        bar = ax.bar(
            x + (i - (len(series) - 1) / 2) * width,
            heights,
            width * 0.92,
            yerr=None if all(math.isnan(e) for e in errors) else errors,
            capsize=3,
            color=colors[label],
        )
        bars.append(bar)
    ax.set_xticks(x, [_text(c) for c in categories])
    ax.set_ylabel(_text(ylabel))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if series:
        _legend(fig, bars, [_text(label) for label, _, _ in series], width_inches)
    return _png(fig)


def dense_maps(images: np.ndarray, columns: list[tuple[str, np.ndarray, str]]) -> bytes:
    """A grid of maps: one row per image, its input first, then each ``(title, maps [N, H, W] or
    [N, H, W, 3], kind)`` column; ``kind`` is ``labels`` (tab20 colours, class 0 first),
    ``mask`` / ``scalar`` (grey, per-column range) or ``rgb`` (already in [0, 1])."""
    rows, cols = len(images), 1 + len(columns)
    fig = Figure(figsize=(1.5 * cols, 1.5 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(images[r], cmap="gray", vmin=0, vmax=255)
        for c, (_, maps, kind) in enumerate(columns, start=1):
            if kind == "labels":
                axes[r, c].imshow(maps[r], cmap="tab20", vmin=0, vmax=20, interpolation="nearest")
            elif kind == "rgb":
                axes[r, c].imshow(np.clip(maps[r], 0.0, 1.0))
            else:
                axes[r, c].imshow(maps[r], cmap="gray", vmin=float(maps.min()), vmax=float(maps.max()))
    for c, title in enumerate(["input", *[title for title, _, _ in columns]]):
        axes[0, c].set_title(_text(title), fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return _png(fig)


def grouped_heatmap(
    values: np.ndarray,
    groups: list[tuple[str, int]],
    column_labels: list[str],
    *,
    title: str,
    xlabel: str,
    colorbar_label: str,
    vmin: float = 0.0,
    vmax: float = 1.0,
) -> bytes:
    """A rows × columns heat-map whose consecutive rows form labelled groups ``(label, count)`` (in row order),
    split by white lines: many samples' gate vectors at once, a task's block next to the others."""
    cols = values.shape[1]
    fig = Figure(figsize=(min(12.0, 2.6 + 0.55 * cols), 6.0), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax)
    ticks, start = [], 0
    for i, (_, count) in enumerate(groups):
        ticks.append(start + (count - 1) / 2)
        start += count
        if i < len(groups) - 1:
            ax.axhline(start - 0.5, color="white", linewidth=2.0)
    ax.set_yticks(ticks, [_text(label) for label, _ in groups])
    ax.set_xticks(np.arange(cols), [_text(c) for c in column_labels])
    ax.set_xlabel(_text(xlabel))
    ax.set_title(_text(title), fontsize=11)
    fig.colorbar(image, ax=ax, label=_text(colorbar_label), fraction=0.08)
    return _png(fig)


@dataclass
class Matrix:
    """One annotated matrix panel: small tables (task × task similarities, task × expert means) read as colours."""

    title: str
    values: np.ndarray
    row_labels: list[str]
    column_labels: list[str]
    vmin: float = 0.0
    vmax: float = 1.0


ANNOTATE_MAX_CELLS = 256  # beyond this, numbers in cells are unreadable


def matrices(panels: list[Matrix]) -> bytes:
    """Side-by-side matrix heat-maps, each cell annotated with its value (2 decimals) when they fit."""
    widths = [1.2 + 0.55 * max(p.values.shape[1], 2) for p in panels]
    height = 1.6 + 0.45 * max(max(p.values.shape[0], 2) for p in panels)
    fig = Figure(figsize=(sum(widths) + 0.8 * len(panels), height), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, width_ratios=widths)[0]
    for ax, panel in zip(axes, panels, strict=True):
        image = ax.imshow(panel.values, cmap="viridis", vmin=panel.vmin, vmax=panel.vmax, interpolation="nearest")
        rows, cols = panel.values.shape
        if rows * cols <= ANNOTATE_MAX_CELLS:
            middle = (panel.vmin + panel.vmax) / 2
            for r in range(rows):
                for c in range(cols):
                    v = float(panel.values[r, c])
                    if math.isnan(v):  # not scored (a task not yet learned)
                        continue
                    color = "white" if v < middle else "black"
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(np.arange(cols), [_text(s) for s in panel.column_labels], rotation=30, ha="right")
        ax.set_yticks(np.arange(rows), [_text(s) for s in panel.row_labels])
        ax.set_title(_text(panel.title), fontsize=11)
        fig.colorbar(image, ax=ax, fraction=0.05)
    return _png(fig)


def accuracy_matrix(matrix: list[list[float | None]], tasks: list[str], title: str) -> bytes:
    """A continual run's ``R[i, j]`` (accuracy on task j after learning task i) as an annotated heat-map; tasks not
    yet learned are left blank."""
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    rows = [f"after {t}" for t in tasks[: len(matrix)]]
    return matrices([Matrix(title, values, rows, list(tasks))])


@dataclass
class Curve:
    """One method's points in order of size; an error is NaN where a point has a single seed."""

    label: str
    params: list[float]
    values: list[float]
    errors: list[float]


def accuracy_vs_parameters(curves: list[Curve], colors: dict[str, str], title: str, ylabel: str) -> bytes:
    """Score against trainable parameters on a log axis (sizes grow by factors), one curve per method; a method
    of one size is a marker alone, a line needing two points."""
    width = 7.5
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    ax = fig.subplots()
    handles = []
    for curve in curves:
        handle = ax.errorbar(
            curve.params,
            curve.values,
            yerr=None if all(math.isnan(e) for e in curve.errors) else curve.errors,
            color=colors[curve.label],
            linestyle="-" if len(curve.params) > 1 else "none",
            marker="o",
            markersize=5,
            linewidth=1.6,
            capsize=3,
        )
        handles.append(handle)
    ax.set_xscale("log")
    ax.set_title(_text(title), fontsize=11)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(_text(ylabel))
    ax.grid(alpha=0.3)
    ax.grid(alpha=0.12, which="minor")  # a log axis: minor lines mark 2×, 3× … of a decade
    if curves:
        _legend(fig, handles, [_text(c.label) for c in curves], width)
    return _png(fig)
