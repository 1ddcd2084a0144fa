"""Dense multi-task losses and metrics (MTLoRA / PASCAL-Context conventions, spec ``specs/mtlora.md``).

Losses: cross-entropy (ignore 255) for ``semseg`` and ``parts``; class-balanced BCE for ``saliency``
(positives weighted by the fraction of negatives in the batch, and vice versa); L1 between the
L2-normalised prediction and the target over valid pixels for ``normals``; L1 for ``depth``.

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
    """``pred [B, K, H, W]`` against ``target``: class ids or a mask ``[B, H, W]``, or maps ``[B, C, H, W]``."""
    if task in ("semseg", "parts"):
        return F.cross_entropy(pred, target.long(), ignore_index=IGNORE)
    if task == "saliency":
        valid = target != IGNORE
        y = target[valid].float()
        positive = y.mean()
        weight = torch.where(y > 0.5, 1.0 - positive, positive)  # the rarer side weighs more
        return F.binary_cross_entropy_with_logits(pred[:, 0][valid], y, weight=weight)
    if task == "normals":
        valid = target.abs().sum(1) > 0
        unit = F.normalize(pred, dim=1)
        return (unit - target).abs().sum(1)[valid].mean() if valid.any() else pred.sum() * 0
    if task == "depth":
        return F.l1_loss(pred, target)
    raise ValueError(f"unknown dense task {task!r}")


class DenseMeter:
    """Accumulates one task's metric state over batches; ``result()`` gives the task's metrics."""

    def __init__(self, task: str, outputs: int) -> None:
        self.task, self.outputs = task, outputs
        self.confusion = torch.zeros(outputs, outputs, dtype=torch.int64)
        self.jaccard = torch.zeros(len(THRESHOLDS), dtype=torch.float64)
        self.precision = torch.zeros(len(THRESHOLDS), dtype=torch.float64)
        self.recall = torch.zeros(len(THRESHOLDS), dtype=torch.float64)
        self.images = 0
        self.sum, self.sum_sq, self.count = 0.0, 0.0, 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if self.task in ("semseg", "parts"):
            labels, guess = target.long().flatten(), pred.argmax(1).flatten()
            keep = labels != IGNORE
            index = labels[keep] * self.outputs + guess[keep]
            self.confusion += torch.bincount(index, minlength=self.outputs**2).view(self.outputs, self.outputs)
        elif self.task == "saliency":
            prob = torch.sigmoid(pred[:, 0]).flatten(1)
            truth = (target.flatten(1) > 0.5).double()
            for i, tau in enumerate(THRESHOLDS):
                guess = (prob > tau).double()
                inter = (guess * truth).sum(1)
                union = ((guess + truth) > 0).double().sum(1)
                self.jaccard[i] += torch.where(union > 0, inter / union.clamp(min=1), 1.0).sum()
                self.precision[i] += (inter / guess.sum(1).clamp(min=1)).sum()
                self.recall[i] += (inter / truth.sum(1).clamp(min=1)).sum()
            self.images += prob.shape[0]
        elif self.task == "normals":
            valid = target.abs().sum(1) > 0
            cos = (F.normalize(pred, dim=1) * target).sum(1).clamp(-1.0, 1.0)
            angle = torch.rad2deg(torch.acos(cos))[valid].double()
            self.sum += angle.sum().item()
            self.sum_sq += (angle**2).sum().item()
            self.count += angle.numel()
        elif self.task == "depth":
            err = (pred - target).double()
            self.sum_sq += (err**2).sum().item()
            self.count += err.numel()
        else:
            raise ValueError(f"unknown dense task {self.task!r}")

    def result(self) -> dict[str, float]:
        if self.task in ("semseg", "parts"):
            c = self.confusion.double()
            union = c.sum(0) + c.sum(1) - c.diag()
            present = union > 0
            return {"miou": float((c.diag()[present] / union[present]).mean()) if present.any() else 0.0}
        if self.task == "saliency":
            n = max(self.images, 1)
            p, r = self.precision / n, self.recall / n
            f = (1 + BETA2) * p * r / (BETA2 * p + r).clamp(min=1e-12)
            return {"miou": float((self.jaccard / n).max()), "maxf": float(f.max())}
        if self.task == "normals":
            n = max(self.count, 1)
            return {"mean_angle": self.sum / n, "rmse_angle": math.sqrt(self.sum_sq / n)}
        return {"rmse": math.sqrt(self.sum_sq / max(self.count, 1))}


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
