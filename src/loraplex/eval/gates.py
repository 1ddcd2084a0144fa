"""What a router learned: how its gates over the experts differ between tasks (MoLA-Router's analysis).

A model with a router (:attr:`AdaptedModel.router`) gates its E experts with one vector per input, the same in
every adapted layer.  On a capped, seeded sample of each task's test split this module computes, per task:

* the **mean gate** (T × E) and the **cosine similarity** of those means between tasks (T × T): with TwD's
  contrastive loss the tasks' mean gates should separate (low off-diagonal cosine); without it the router is
  free to send every task to the same mixture;
* the **gate entropy** in nats, ``−Σ_e g_e log g_e`` (0 for a one-hot gate, ``log E`` for the uniform one),
  and divided by ``log E``: the mean over a task's samples (how decided each gate is) and the entropy of the
  task's mean gate (how many experts the task uses in all); "overall" weighs tasks equally;
* the **arg-max share** (T × E): the fraction of a task's samples whose largest gate is each expert (for top-1
  gates this is exactly the routing).

:func:`gate_statistics` is the pure part (gates in, JSON-ready numbers out); :func:`collect_gates` reads the
data and runs the router; :func:`analyze_gates` does both for a loaded run and writes the figures.  ``loraplex
analyze`` stores the result as the ``gates`` entry of ``analysis/analysis.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.model import AdaptedModel
from . import plots

GATE_SAMPLES = 200  # per task: enough for stable means, small enough to run on a CPU in seconds
HEATMAP_FILE, COSINE_FILE = "gates.png", "gate_cosine.png"
SETUP_KEYS = ("router", "gate", "experts", "twd", "twd_dim", "temperature")  # what shapes the gates
FIXED_ROUTINGS = ("always", "task")  # groups with one ΔW per task: what eval/analysis.py measures


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last dim, ``0 log 0 = 0`` (one-hot gates have entropy 0, not NaN)."""
    return -torch.where(p > 0, p * p.clamp(min=1e-300).log(), torch.zeros_like(p)).sum(-1)


def gate_statistics(gates: torch.Tensor, task_ids: torch.Tensor, tasks: Sequence[str]) -> dict[str, Any]:
    """Per-task gate statistics (see the module docstring) of ``gates [N, E]`` whose row ``i`` belongs to task
    ``task_ids[i]`` (an index into ``tasks``).  A task without samples gets ``None`` rows (not NaN: the result is
    JSON) and is left out of the overall numbers and of the cosine table's off-diagonal mean."""
    if gates.dim() != 2 or task_ids.shape != (gates.shape[0],):
        raise ValueError(
            f"gates must be [N, E] with one task id per row; got {tuple(gates.shape)}, {tuple(task_ids.shape)}"
        )
    gates, task_ids = gates.detach().double().cpu(), task_ids.detach().long().cpu()
    experts = gates.shape[1]
    log_e = math.log(experts)
    norm = (lambda h: h / log_e) if experts > 1 else (lambda h: h * 0.0)  # one expert: nothing to decide
    counts = [int((task_ids == t).sum()) for t in range(len(tasks))]
    present = [t for t, n in enumerate(counts) if n]

    means = torch.zeros(len(tasks), experts, dtype=torch.float64)
    shares = torch.zeros(len(tasks), experts, dtype=torch.float64)
    sample_entropy = torch.zeros(len(tasks), dtype=torch.float64)
    top = gates.argmax(dim=1)
    for t in present:
        rows = task_ids == t
        means[t] = gates[rows].mean(0)
        shares[t] = torch.bincount(top[rows], minlength=experts).double() / counts[t]
        sample_entropy[t] = _entropy(gates[rows]).mean()
    unit = means / means.norm(dim=1, keepdim=True).clamp(min=1e-12)
    cosine = unit @ unit.T
    mean_entropy = _entropy(means)
    overall_mean = means[present].mean(0) if present else torch.zeros(experts, dtype=torch.float64)
    offdiag = [float(cosine[a, b]) for a in present for b in present if a < b]
    seen = range(len(tasks))

    def per_task(values: torch.Tensor) -> list:
        return [values[t].tolist() if counts[t] else None for t in range(len(tasks))]

    def overall(values: torch.Tensor) -> float | None:
        return float(values[present].mean()) if present else None

    return {
        "tasks": list(tasks),
        "experts": experts,
        "samples": dict(zip(tasks, counts, strict=True)),
        "mean": per_task(means),
        "overall_mean": overall_mean.tolist() if present else None,
        "cosine": [[float(cosine[a, b]) if a in present and b in present else None for b in seen] for a in seen],
        "cosine_offdiag_mean": sum(offdiag) / len(offdiag) if offdiag else None,
        "argmax_share": per_task(shares),
        "entropy": {
            "max": log_e,
            "sample": per_task(sample_entropy),
            "sample_normalised": per_task(norm(sample_entropy)),
            "of_mean": per_task(mean_entropy),
            "of_mean_normalised": per_task(norm(mean_entropy)),
            "overall_sample": overall(sample_entropy),
            "overall_sample_normalised": overall(norm(sample_entropy)),
            "overall_of_mean": float(_entropy(overall_mean)) if present else None,
            "overall_of_mean_normalised": float(norm(_entropy(overall_mean))) if present else None,
        },
    }


def sample_rows(n: int, cap: int, seed: int) -> torch.Tensor:
    """Which of a split's ``n`` rows to analyse: all when ``n ≤ cap``, else a seeded choice of ``cap`` (sorted).
    A choice rather than the first rows: a split may be ordered by class."""
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap].sort().values


@torch.no_grad()
def collect_gates(
    model: AdaptedModel,
    domains: Sequence,
    *,
    img_size: int,
    frames: int | None = None,
    samples: int = GATE_SAMPLES,
    seed: int = 0,
    batch_size: int = 256,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's gates ``[N, E]`` (float32, CPU) on up to ``samples`` rows of each domain (``DomainData``, in
    task order) and each row's task index ``[N]``; ``autocast`` makes the run's precision context per batch."""
    from ..data import to_model_input

    if model.router is None:
        raise ValueError("this model has no router: there are no gates to analyse")
    gates, ids = [], []
    for t, domain in enumerate(domains):
        rows = sample_rows(len(domain), samples, seed + t)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            x = to_model_input(domain.take(chunk), img_size, frames).to(model.device)
            with autocast():
                g, _ = model.gated(x)
            gates.append(g.float().cpu())
            ids.append(torch.full((len(chunk),), t, dtype=torch.long))
    if not gates:
        return torch.zeros(0, model.experts), torch.zeros(0, dtype=torch.long)
    return torch.cat(gates), torch.cat(ids)


def heatmap_order(gates: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """Row order of the heat-map: by task, then by arg-max expert, then by that expert's gate (descending), so
    a task's samples that share an expert form one block instead of stripes."""
    top = gates.argmax(dim=1)
    peak = gates.gather(1, top.unsqueeze(1)).squeeze(1)
    return torch.from_numpy(np.lexsort((-peak.numpy(), top.numpy(), task_ids.numpy())))


def gate_figures(
    stats: dict[str, Any], gates: torch.Tensor, task_ids: torch.Tensor, out_dir: Path
) -> list[dict[str, str]]:
    """Write the heat-map and the mean-gate / cosine figure into ``out_dir``; returns their ``{file, caption}``."""
    tasks, experts = stats["tasks"], stats["experts"]
    if not len(gates):
        return []
    expert_labels = [f"e{e}" for e in range(experts)]
    order = heatmap_order(gates, task_ids)
    groups = [(task, n) for task, n in stats["samples"].items() if n]
    heat = plots.grouped_heatmap(
        gates[order].numpy(),
        groups,
        expert_labels,
        title=f"router gates of {len(gates)} test samples",
        xlabel="expert",
        colorbar_label="gate",
    )
    (out_dir / HEATMAP_FILE).write_bytes(heat)
    present = [t for t, task in enumerate(tasks) if stats["samples"][task]]
    labels = [tasks[t] for t in present]
    mean = np.array([stats["mean"][t] for t in present]).reshape(len(present), experts)
    cosine = np.array([[stats["cosine"][a][b] for b in present] for a in present]).reshape(len(present), -1)
    panels = [
        plots.Matrix("mean gate per task", mean, labels, expert_labels),
        plots.Matrix("cosine between tasks' mean gates", cosine, labels, labels),
    ]
    (out_dir / COSINE_FILE).write_bytes(plots.matrices(panels))
    return [
        {
            "file": HEATMAP_FILE,
            "caption": "Router gates of each test sample (rows, grouped by task; within a task sorted by arg-max "
            "expert) over the experts (columns). Tasks the router tells apart light different columns; one bright "
            "column in every task's block means all tasks share one mixture.",
        },
        {
            "file": COSINE_FILE,
            "caption": "Left: each task's mean gate. Right: cosine similarity between tasks' mean gates. With TwD "
            "the tasks' mean gates should separate: off-diagonal cosines well below 1; without it they may "
            "stay near 1 (every task uses the same mixture).",
        },
    ]


def analyze_gates(config: Any, model: AdaptedModel, out_dir: str | Path, samples: int = GATE_SAMPLES) -> dict[str, Any]:
    """The ``gates`` entry of ``analysis.json`` for a loaded run (``runner.load_run``): gates on each task's test
    split (up to ``samples`` per task, chosen with the run's data seed), their statistics, the figures written
    into ``out_dir``, and the method keys that shape the gates (``twd`` …), so runs can be compared."""
    from ..train.placement import Placement
    from ..train.runner import domain_splits

    if samples < 1:
        raise ValueError(f"the number of gate samples per task must be ≥ 1, got {samples}")
    test = domain_splits(config)["test"]
    gates, ids = collect_gates(
        model,
        test,
        img_size=config.backbone.img_size,
        frames=config.data.frames,
        samples=samples,
        seed=config.data.seed,
        batch_size=config.train.eval_batch_size,
        autocast=Placement(model.device, config.train.precision).autocast,
    )
    stats = gate_statistics(gates, ids, [d.name for d in test])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup = {k: model.method_config[k] for k in SETUP_KEYS if model.method_config.get(k) is not None}
    return {
        "split": "test",
        "sample_cap": samples,
        "setup": setup,
        **stats,
        "figures": gate_figures(stats, gates, ids, out),
    }


def has_fixed_deltas(model: AdaptedModel) -> bool:
    """Whether any adapted layer has a fixed-ΔW group (``always`` / ``task``): what the ΔW analysis measures; a
    model whose experts are all gated by a router has none."""
    return any(g.routing in FIXED_ROUTINGS for layer in model.adapted_layers().values() for g in layer.groups.values())


def write_without_deltas(model: AdaptedModel, out_dir: str | Path, **meta: Any) -> dict[str, Any]:
    """``analysis.json`` for a model without fixed-ΔW branches: the ΔW part empty, with a note saying why (the
    report reads ``summary`` and ``figures`` as for any analysis)."""
    from .analysis import ANALYSIS_FILE

    note = "no fixed-ΔW branches (the experts are gated per input by a router): ΔW analysis skipped"
    result = {**meta, "tasks": list(model.tasks), "k": None, "layers": [], "summary": [], "figures": []}
    result["notes"] = [note]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ANALYSIS_FILE).write_text(json.dumps(result, indent=2))
    return result


def gate_table(entry: dict[str, Any]) -> str:
    """A few lines for the terminal: per task the mean gate, the arg-max share and the entropies; then the
    cosine table of the mean gates."""
    tasks, experts = entry["tasks"], entry["experts"]
    setup = ", ".join(f"{k}={v}" for k, v in entry.get("setup", {}).items())
    width = max(8, *(len(t) for t in tasks))
    cells = 6 * experts
    header = f"{'task':{width}s} {'n':>5s}  {'mean gate':{cells}s}  {'arg-max share':{cells}s}"
    lines = [
        f"gates ({setup}): {experts} experts, {entry['split']} split, ≤ {entry['sample_cap']} samples per task",
        f"{header}  {'H/logE':>6s} {'H(mean)/logE':>12s}",
    ]
    h = entry["entropy"]
    for t, task in enumerate(tasks):
        n = entry["samples"][task]
        if not n:
            lines.append(f"{task:{width}s} {n:5d}  (no samples)")
            continue
        mean = "".join(f"{v:6.3f}" for v in entry["mean"][t])
        share = "".join(f"{v:6.2f}" for v in entry["argmax_share"][t])
        entropies = f"{h['sample_normalised'][t]:6.3f} {h['of_mean_normalised'][t]:12.3f}"
        lines.append(f"{task:{width}s} {n:5d}  {mean}  {share}  {entropies}")
    offdiag = entry["cosine_offdiag_mean"]
    lines.append(f"cosine of the tasks' mean gates (off-diagonal mean {'—' if offdiag is None else f'{offdiag:.3f}'}):")
    lines.append(" " * width + "".join(f" {t[:7]:>7s}" for t in tasks))
    for t, task in enumerate(tasks):
        row = "".join("       —" if v is None else f" {v:7.3f}" for v in entry["cosine"][t])
        lines.append(f"{task:{width}s}{row}")
    return "\n".join(lines)
