"""Dense multi-task losses and metrics (MTLoRA / PASCAL-Context conventions, spec ``specs/mtlora.md``).

Losses: cross-entropy (ignore 255) for ``semseg`` and ``parts``; class-balanced BCE for ``saliency``
(positives weighted by the fraction of negatives in the batch, and vice versa); L1 between the
L2-normalised prediction and the target, averaged over the valid elements (three per valid pixel, as the
official MTLoRA code does — a mean over pixels would be 3× larger and triple the task's weight), for
``normals``; L1 for ``depth``.

Metrics, accumulated over a whole split (not averaged per batch):

* ``semseg`` / ``parts``: ``miou`` from one confusion matrix (background included);
* ``saliency``: ``miou`` — the best over thresholds ``linspace(0.2, 0.9, 15)`` of the mean per-image
  Jaccard of the foreground — and ``maxf`` — the best over the same thresholds of F_β (β² = 0.3) from
  per-image precision and recall averaged over images;
* ``normals``: ``mean_angle`` (degrees, what the paper's "rmse" column holds) **and** ``rmse_angle``
  (the true root-mean-square angular error), over pixels with a non-zero target;
* ``depth``: ``rmse``.

``delta_m`` is the multi-task score ``(1/T) Σ s_t (M_t − M_single,t) / M_single,t × 100``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE = 255
THRESHOLDS = torch.linspace(0.2, 0.9, 15)
BETA2 = 0.3
PRIMARY = {  # the metric a task is judged by, and whether higher is better
    "semseg": ("miou", True),
    "parts": ("miou", True),
    "saliency": ("maxf", True),
    "normals": ("mean_angle", False),
    "depth": ("rmse", False),
}


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``pred [B, K, H, W]`` against ``target``: class ids or a mask ``[B, H, W]``, or maps ``[B, C, H, W]``.

    Invalid pixels are weighted out rather than selected, so no loss reads the device from the host."""
    if task in ("semseg", "parts"):
        return F.cross_entropy(pred, target.long(), ignore_index=IGNORE)
    if task == "saliency":
        valid = (target != IGNORE).float()
        y = torch.where(target != IGNORE, target.float(), 0.0)
        count = valid.sum().clamp(min=1)
        positive = (y * valid).sum() / count
        weight = torch.where(y > 0.5, 1.0 - positive, positive) * valid  # the rarer side weighs more
        return F.binary_cross_entropy_with_logits(pred[:, 0], y, weight=weight, reduction="sum") / count
    if task == "normals":  # the mean over valid *elements* (3 a pixel), as MTLoRA's code averages its L1
        valid = target.abs().sum(1) > 0
        error = (F.normalize(pred, dim=1) - target).abs().sum(1)
        return torch.where(valid, error, 0.0).sum() / (target.shape[1] * valid.sum()).clamp(min=1)
    if task == "depth":
        return F.l1_loss(pred, target)
    raise ValueError(f"unknown dense task {task!r}")


class DenseMeter:
    """Accumulates one task's metric state over batches; ``result()`` gives the task's metrics.

    The state lives on the predictions' device and ``update`` never reads it on the host (no masks of
    data-dependent size, no ``.item()``), so an evaluation on a GPU waits for the device once, in ``result``."""

    def __init__(self, task: str, outputs: int) -> None:
        if task not in PRIMARY:
            raise ValueError(f"unknown dense task {task!r}")
        self.task, self.outputs = task, outputs
        self.state: dict[str, torch.Tensor | int] = {}  # sums on the device; counts known from shapes as ints

    def _add(self, key: str, value: torch.Tensor | int) -> None:
        self.state[key] = self.state[key] + value if key in self.state else value

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if self.task in ("semseg", "parts"):
            labels, guess = target.long().flatten(), pred.argmax(1).flatten()
            keep = labels != IGNORE
            index = torch.where(keep, labels * self.outputs + guess, 0)
            counts = torch.zeros(self.outputs**2, dtype=torch.int64, device=pred.device)
            self._add("confusion", counts.index_add_(0, index, keep.long()).view(self.outputs, self.outputs))
        elif self.task == "saliency":
            prob = torch.sigmoid(pred[:, 0].float()).flatten(1)
            truth = (target.flatten(1) > 0.5).double()
            sums: dict[str, list[torch.Tensor]] = {"jaccard": [], "precision": [], "recall": []}
            for tau in THRESHOLDS.tolist():  # one at a time: a [thresholds, B, pixels] mask is ~1 GB at 448 px
                guess = (prob > tau).double()
                inter = (guess * truth).sum(1)
                union = ((guess + truth) > 0).double().sum(1)
                sums["jaccard"].append(torch.where(union > 0, inter / union.clamp(min=1), 1.0).sum())
                sums["precision"].append((inter / guess.sum(1).clamp(min=1)).sum())
                sums["recall"].append((inter / truth.sum(1).clamp(min=1)).sum())
            for key, values in sums.items():
                self._add(key, torch.stack(values))
            self._add("images", prob.shape[0])
        elif self.task == "normals":
            valid = target.abs().sum(1) > 0
            cos = (F.normalize(pred.float(), dim=1) * target).sum(1).clamp(-1.0, 1.0)
            angle = torch.where(valid, torch.rad2deg(torch.acos(cos)), 0.0).double()
            self._add("sum", angle.sum())
            self._add("sum_sq", (angle**2).sum())
            self._add("count", valid.sum())
        else:
            err = (pred.float() - target).double()
            self._add("sum_sq", (err**2).sum())
            self._add("count", err.numel())

    def result(self) -> dict[str, float]:
        s = {k: torch.as_tensor(v).cpu().double() for k, v in self.state.items()}
        if self.task in ("semseg", "parts"):
            c = s.get("confusion", torch.zeros(self.outputs, self.outputs, dtype=torch.float64))
            union = c.sum(0) + c.sum(1) - c.diag()
            present = union > 0
            return {"miou": float((c.diag()[present] / union[present]).mean()) if present.any() else 0.0}
        if self.task == "saliency":
            if not s:
                return {"miou": 0.0, "maxf": 0.0}
            n = float(s["images"])
            p, r = s["precision"] / n, s["recall"] / n
            f = (1 + BETA2) * p * r / (BETA2 * p + r).clamp(min=1e-12)
            return {"miou": float((s["jaccard"] / n).max()), "maxf": float(f.max())}
        n = max(float(s.get("count", 0)), 1.0)
        if self.task == "normals":
            return {"mean_angle": float(s.get("sum", 0)) / n, "rmse_angle": math.sqrt(float(s.get("sum_sq", 0)) / n)}
        return {"rmse": math.sqrt(float(s.get("sum_sq", 0)) / n)}


def quality(task: str, metrics: dict[str, float]) -> float:
    """A task's primary metric mapped to "higher is better, about [0, 1]", so that one validation score
    (their mean) can select a checkpoint without single-task baselines: 1 − angle / 90° for normals,
    1 − RMSE for depth (scene depths lie in [0, 1])."""
    name, higher_better = PRIMARY[task]
    value = metrics[name]
    if higher_better:
        return value
    return 1.0 - value / 90.0 if task == "normals" else 1.0 - value


def delta_m(metrics: dict[str, float], single: dict[str, float]) -> float:
    """Δm (%) of ``{task: primary metric}`` against single-task baselines, signs from :data:`PRIMARY`."""
    terms = []
    for task, value in metrics.items():
        higher_better = PRIMARY[task][1]
        terms.append((1 if higher_better else -1) * (value - single[task]) / single[task])
    return 100.0 * sum(terms) / len(terms)
