"""Where the learned updates live (seed 000's "analysis of the dimensions of LoRA weights").

Per adapted layer and per fixed-ΔW branch (``always`` groups and each task's branch of ``task``
groups; soft-routed groups have no fixed ΔW and are skipped):

* **column-space energy** ``‖U_cᵀ ΔW‖²_F / ‖ΔW‖²_F`` with ``U_c`` the first ``k`` left singular
  vectors of the frozen W (``k``: the run's truncation, else the numerical rank); the rest lies in
  the left null space.  A subspace-constrained run shows 1 / 0 by construction; an unconstrained
  one shows where training put the updates on its own;
* **effective rank** ``exp(H(σ / Σσ))`` of ΔW (Roy & Vetterli, EUSIPCO 2007) and its numerical rank;
* **principal angles** between the output subspaces (column spaces) of the domains' ΔW, and
  between the shared ΔW and each domain's.

``loraplex analyze RUN_DIR`` (:func:`write_analysis`) writes ``RUN_DIR/analysis/analysis.json`` and PNG
figures over depth; the JSON's ``summary`` rows and ``figures`` list are what ``loraplex report`` shows.
"""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from ..core.inject import block_indices, block_of
from ..core.model import AdaptedModel
from ..core.subspace import TruncationK, column_space
from . import plots

ANALYSIS_DIR = "analysis"
ANALYSIS_FILE = "analysis.json"
_BLOCK_PREFIX = re.compile(r"^.*?\bblocks\.\d+\.")  # what is left is the layer's kind: attn.qkv, mlp.fc1


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values."""
    total = singular_values.sum()
    if total <= 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    if singular_values.numel() == 0 or singular_values.max() <= 0:
        return 0
    tol = max(shape) * torch.finfo(torch.float32).eps * singular_values.max()
    return int((singular_values > tol).sum())


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Principal angles in degrees (ascending) between the spans of orthonormal ``a`` and ``b``."""
    if a.shape[1] == 0 or b.shape[1] == 0:
        return []
    cosines = torch.linalg.svdvals(a.T @ b).clamp(-1.0, 1.0)
    return [math.degrees(math.acos(float(c))) for c in cosines]


def _branches(model: AdaptedModel, layer) -> dict[str, torch.Tensor]:
    """Branch label → ΔW (float64, ``out × in``; a conv's kernel as ``C_out × C_in·k²``) for every fixed-ΔW
    branch of one layer."""
    deltas = {}
    for name, group in layer.groups.items():
        if group.routing == "always":  # every branch fires
            deltas[name] = group.delta_weight(None)
        elif group.routing == "task":
            for t, task in enumerate(model.tasks):
                deltas[f"{name}/{task}"] = group.delta_weight(t)
    out = layer.base.weight.shape[0]
    return {label: layer.to_weight_shape(d).reshape(out, -1).detach().double() for label, d in deltas.items()}


@torch.no_grad()
def analyze_model(model: AdaptedModel, k: TruncationK = None) -> dict[str, Any]:
    """The per-layer numbers (see the module docstring) as a JSON-ready dict."""
    layers = []
    blocks = block_indices(model.backbone)  # global indices, counted across Swin stages
    for name, layer in model.adapted_layers().items():
        weight = layer.base.weight.detach().double().flatten(1)  # a conv kernel as C_out × C_in·k²
        u_c = column_space(weight, k)
        entry: dict[str, Any] = {
            "layer": name,
            "kind": _BLOCK_PREFIX.sub("", name, count=1),
            "block": block_of(name, blocks),
            "shape": list(weight.shape),
            "k": int(u_c.shape[1]),
            "branches": {},
            "angles": {},
        }
        bases = {}
        for label, delta in _branches(model, layer).items():
            u, s, _ = torch.linalg.svd(delta, full_matrices=False)
            rank = numerical_rank(s, tuple(delta.shape))
            energy = float(delta.square().sum())
            entry["branches"][label] = {
                "norm": math.sqrt(energy),
                "energy_column": float((u_c.T @ delta).square().sum()) / energy if energy > 0 else None,
                "effective_rank": effective_rank(s),
                "numerical_rank": rank,
                "singular_values": [float(v) for v in s[:rank]],
            }
            bases[label] = u[:, :rank]  # the branch's output subspace
        for a, b in combinations(bases, 2):
            same_kind = a.split("/")[0] == b.split("/")[0]
            if same_kind or "/" not in a or "/" not in b:  # domain vs domain, shared vs domain
                angles = principal_angles(bases[a], bases[b])
                if angles:
                    entry["angles"][f"{a} | {b}"] = {"degrees": angles, "mean": sum(angles) / len(angles)}
        layers.append(entry)
    return {"tasks": list(model.tasks), "k": k, "layers": layers}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summary_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per branch: means over layers (what the report's table shows)."""
    labels = list(dict.fromkeys(label for layer in result["layers"] for label in layer["branches"]))
    rows = []
    for label in labels:
        found = [layer["branches"][label] for layer in result["layers"] if label in layer["branches"]]
        rows.append(
            {
                "branch": label,
                "layers": len(found),
                "energy_column": _mean([b["energy_column"] for b in found if b["energy_column"] is not None]),
                "effective_rank": _mean([b["effective_rank"] for b in found]),
                "numerical_rank": _mean([float(b["numerical_rank"]) for b in found]),
            }
        )
    return rows


def _depth_panels(result: dict[str, Any], key: str, metric: str, title: str, ylabel: str) -> list[plots.Panel]:
    """One panel per layer kind (``attn.qkv`` …), one line per ``layer[key]`` label, x = block index."""
    panels = []
    rows = [layer for layer in result["layers"] if layer["block"] is not None]
    for kind in dict.fromkeys(layer["kind"] for layer in rows):
        of_kind = [layer for layer in rows if layer["kind"] == kind]
        lines = []
        for label in dict.fromkeys(label for layer in of_kind for label in layer[key]):
            points = [(layer["block"], layer[key][label][metric]) for layer in of_kind if label in layer[key]]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                lines.append(plots.Line(label, label, [x for x, _ in points], [y for _, y in points]))
        if lines:
            panels.append(plots.Panel(f"{title}: {kind}", ylabel, lines))
    return panels


# (file stem, layer key, metric, panel title, y label, caption)
FIGURES = (
    (
        "energy_column",
        "branches",
        "energy_column",
        "column-space energy",
        "‖U_cᵀΔW‖² / ‖ΔW‖²",
        "Fraction of each ΔW's energy in the column space of W (the rest is in its left null space), over depth.",
    ),
    (
        "effective_rank",
        "branches",
        "effective_rank",
        "effective rank",
        "exp(entropy of σ/Σσ)",
        "Effective rank (Roy & Vetterli 2007) of each ΔW, over depth.",
    ),
    (
        "principal_angles",
        "angles",
        "mean",
        "mean principal angle",
        "degrees",
        "Mean principal angle between the output subspaces of two branches' ΔW, over depth (90° = orthogonal).",
    ),
)


def write_analysis(model: AdaptedModel, out_dir: str | Path, k: TruncationK = None, **meta: Any) -> dict[str, Any]:
    """Analyse ``model`` and write ``analysis.json`` (numbers, ``summary`` rows, ``figures``) and the
    PNGs into ``out_dir``; ``meta`` (run, method, …) is stored alongside.  Returns the JSON dict."""
    result = {**meta, **analyze_model(model, k)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [label for key in ("branches", "angles") for layer in result["layers"] for label in layer[key]]
    colors = plots.palette(list(dict.fromkeys(labels)))
    figures = []
    for stem, key, metric, title, ylabel, caption in FIGURES:
        if panels := _depth_panels(result, key, metric, title, ylabel):
            (out / f"{stem}.png").write_bytes(plots.curves(panels, colors, xlabel="block"))
            figures.append({"file": f"{stem}.png", "caption": caption})
    result["summary"] = summary_rows(result)
    result["figures"] = figures
    (out / ANALYSIS_FILE).write_text(json.dumps(result, indent=2))
    return result
