"""Training regimes: what the one loop trains on, and how it scores.

``multidomain``: every sample (an image, or a clip for a frame-wise video backbone) belongs to one
domain (task) with its own head; batches mix domains and run as one forward with per-sample task ids.
The loss is the method's objective (``methods.registry``): by default the mean cross-entropy over the
batch's samples (every sample weighs the same), so that the gradient of a batch sharded over ranks and
averaged by DDP equals the gradient of the whole batch in one process.

Batches are read (decoded, for on-demand sources) as uint8 by a :class:`~loraplex.data.BatchLoader` —
in ``data.workers`` processes when asked — and cross to the run's device as uint8 (a quarter of the
bytes of floats), where they become normalised model input and augmentation runs.  Losses, accuracies
and evaluation counts stay on the device: the loop reads a step's numbers once, evaluation once per
domain.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..core.model import AdaptedModel
from ..data import DomainData, MultiDomainStream, to_model_input, to_tensor_batch
from ..data.augment import Augment
from ..data.loader import BatchLoader, eval_loader
from ..eval.dense import DenseMeter, quality, task_loss
from ..methods.registry import sample_mean
from .placement import Placement


class StreamRegime:
    """What both regimes share: a resumable, rank-sharded stream read by a loader, and batches put on the
    run's device."""

    def __init__(
        self,
        splits: dict[str, list[DomainData]],
        *,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        sampling: str = "proportional",
        temperature: float = 2.0,
        rank: int = 0,
        world: int = 1,
        placement: Placement | None = None,
        workers: int = 0,
    ) -> None:
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the {world} processes")
        self.splits, self.eval_batch_size, self.workers = splits, eval_batch_size, workers
        self.placement = placement or Placement()
        stream = MultiDomainStream(
            splits["train"],
            batch_size=batch_size,
            sampling=sampling,
            temperature=temperature,
            seed=seed,
            rank=rank,
            world_size=world,
        )
        self.loader = BatchLoader(stream, workers=workers, pin_memory=self.placement.pin_memory)

    @property
    def validates(self) -> bool:
        """Whether there is a validation split to select on: ``data.val_per_domain: 0`` leaves every val part
        empty, and the loop then takes the last step as the model."""
        return any(len(domain) for domain in self.splits["val"])

    def next_samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next (uint8 samples, labels, domain ids) of this rank, on the run's device."""
        return tuple(self.placement.put(t) for t in self.loader.next_batch())

    def eval_samples(self, domain: DomainData) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A split's (samples, labels) batches in order, on the run's device; read by workers only where there
        is decoding to do (starting them for an in-memory split would cost more than it saves)."""
        workers = self.workers if domain.on_demand else 0
        for samples, labels in eval_loader(domain, self.eval_batch_size, workers, self.placement.pin_memory):
            yield self.placement.put(samples), self.placement.put(labels)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stop the loader's worker processes (training is over, or failed)."""
        self.loader.close()


@dataclass
class MultiDomainBatch:
    images: torch.Tensor
    labels: torch.Tensor
    domains: torch.Tensor
    partners: torch.Tensor | None = None  # mixup: the index of the image blended into each
    mix: torch.Tensor | None = None  # mixup: the blend weight of ``labels`` (a 0-d tensor on the device)


def within_domain_partners(domains: torch.Tensor) -> torch.Tensor:
    """For every sample, a random partner of the same domain (itself when alone there): mixup may only blend
    images whose labels belong to one head.  Two random orders sorted by domain line up group by group, so
    pairing them position by position permutes each domain at random, on the device, with no host sync."""
    first, second = (torch.argsort(domains + torch.rand(domains.shape, device=domains.device)) for _ in range(2))
    partners = torch.empty_like(first)
    partners[first] = second
    return partners


class MultiDomainRegime(StreamRegime):
    """Mixed batches from a :class:`MultiDomainStream`; per-domain accuracy on val/test."""

    selection_metric = "acc/mean"

    def __init__(
        self,
        splits: dict[str, list[DomainData]],
        *,
        img_size: int,
        augment: bool = False,
        frames: int | None = None,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        objective: Callable | None = None,
        **stream,
    ) -> None:
        super().__init__(splits, **stream)
        # (mixed output, labels, smoothing) → (loss, metrics): the method's own, bound to its config
        self.objective = objective or functools.partial(sample_mean, None)
        self.img_size = img_size
        self.frames = frames  # clips [B, T, ...] for a frame-wise backbone
        self.label_smoothing = label_smoothing
        self.augment = Augment(size=img_size, channels=3) if augment else None
        # one blend weight per batch, drawn from torch's generator (re-seeded every step: resumes replay it)
        alpha = torch.tensor(float(mixup), device=self.placement.device)
        self.mix_weight = torch.distributions.Beta(alpha, alpha) if mixup else None

    def next_batch(self) -> MultiDomainBatch:
        images, labels, domains = self.next_samples()
        x = self.augment(images) if self.augment else to_model_input(images, self.img_size, self.frames)
        if self.mix_weight is None:
            return MultiDomainBatch(x, labels, domains)
        partners = within_domain_partners(domains)
        mix = self.mix_weight.sample().to(x.dtype)
        return MultiDomainBatch(mix * x + (1 - mix) * x[partners], labels, domains, partners, mix)

    def batch_images(self, batch: MultiDomainBatch) -> int:
        return int(batch.labels.shape[0])

    def loss(self, model: nn.Module, batch: MultiDomainBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch.images, task=batch.domains)
        loss, metrics = self.objective(out, batch.labels, self.label_smoothing)
        if batch.mix is not None:  # mixup: the losses against both images' labels, blended as the images were
            partner_loss, _ = self.objective(out, batch.labels[batch.partners], self.label_smoothing)
            loss = batch.mix * loss + (1 - batch.mix) * partner_loss
        return loss, {"acc": (out.predictions() == batch.labels).float().mean(), **metrics}

    def evaluate(self, model: AdaptedModel, split: str) -> dict[str, float]:
        """Accuracy per domain (each domain through its own head) and their unweighted mean."""
        metrics = {}
        for domain in self.splits[split]:
            correct = torch.zeros((), dtype=torch.long, device=self.placement.device)
            # homogeneous batches: fold the domain's deltas into W and run at backbone speed
            with model.merged(task=domain.name) if model.mergeable else contextlib.nullcontext():
                for images, labels in self.eval_samples(domain):
                    logits = model(to_model_input(images, self.img_size, self.frames), task=domain.name)
                    correct += (logits.argmax(1) == labels).sum()
            metrics[f"acc/{domain.name}"] = int(correct) / len(domain)
        metrics["acc/mean"] = sum(metrics.values()) / len(metrics)
        return metrics


@dataclass
class MultiTaskBatch:
    images: torch.Tensor
    targets: torch.Tensor  # packed dense targets (see loraplex.data.scenes)


class MultiTaskRegime(StreamRegime):
    """Dense multi-task: every task's head on every image, one forward (``task="all"``), the weighted sum
    of the task losses; dense metrics accumulated over the split.  Selection uses the mean of each task's
    :func:`~loraplex.eval.dense.quality` on validation (Δm needs single-task runs, made separately)."""

    selection_metric = "score/mean"

    def __init__(
        self,
        splits: dict[str, list[DomainData]],
        tasks: list[str],
        *,
        target_of: Callable[[torch.Tensor, str], torch.Tensor],
        weights: dict[str, float],
        img_size: int,
        **stream,
    ) -> None:
        if len(splits["train"]) != 1:
            raise ValueError("the multitask regime trains on one dense dataset (data.domains: [scenes])")
        super().__init__(splits, **stream)
        self.tasks, self.img_size = tasks, img_size
        self.weights = {t: weights.get(t, 1.0) for t in tasks}
        self.target_of = target_of  # packed dense targets → one task's target (depends on the dataset)

    def next_batch(self) -> MultiTaskBatch:
        images, targets, _ = self.next_samples()
        return MultiTaskBatch(to_tensor_batch(images, self.img_size), targets)

    def batch_images(self, batch: MultiTaskBatch) -> int:
        return int(batch.images.shape[0])

    def loss(self, model: nn.Module, batch: MultiTaskBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(batch.images, task="all")
        losses = {t: task_loss(t, out[t].float(), self.target_of(batch.targets, t)) for t in self.tasks}
        total = sum(self.weights[t] * losses[t] for t in self.tasks)
        return total, {f"loss/{t}": v for t, v in losses.items()}

    def evaluate(self, model: AdaptedModel, split: str) -> dict[str, float]:
        (domain,) = self.splits[split]
        meters = {t: DenseMeter(t, model.head_outputs[t]) for t in self.tasks}
        for images, targets in self.eval_samples(domain):
            out = model(to_tensor_batch(images, self.img_size), task="all")
            for t, meter in meters.items():
                meter.update(out[t], self.target_of(targets, t))
        metrics: dict[str, float] = {}
        for t, meter in meters.items():
            result = meter.result()
            metrics |= {f"{t}/{k}": v for k, v in result.items()}
            metrics[f"score/{t}"] = quality(t, result)
        metrics["score/mean"] = sum(metrics[f"score/{t}"] for t in self.tasks) / len(self.tasks)
        return metrics

    @torch.no_grad()
    def prediction_figure(self, model: AdaptedModel, count: int = 4) -> bytes:
        """Input, then true and predicted maps of every task, for the first ``count`` test images."""
        from ..eval.plots import dense_maps  # matplotlib only when a figure is asked for

        (domain,) = self.splits["test"]
        rows = torch.arange(min(count, len(domain)))
        images, packed = domain.take(rows), domain.take_labels(rows)
        out = model(to_tensor_batch(self.placement.put(images), self.img_size), task="all")
        columns = []
        for t in self.tasks:
            truth, pred = self.target_of(packed, t), out[t].float().cpu()
            if t in ("semseg", "parts"):
                pair, kind = (truth.clamp(max=20), pred.argmax(1)), "labels"  # ignore (255) drawn as the last colour
            elif t == "saliency":
                pair, kind = (truth, torch.sigmoid(pred[:, 0])), "mask"
            elif t == "normals":
                pair, kind = ((truth + 1) / 2, (F.normalize(pred, dim=1) + 1) / 2), "rgb"
            else:
                pair, kind = (truth[:, 0], pred[:, 0]), "scalar"
            for label, maps in zip(("true", "predicted"), pair, strict=True):
                array = maps.permute(0, 2, 3, 1) if kind == "rgb" else maps
                columns.append((f"{t} {label}", array.float().numpy(), kind))
        return dense_maps(images.numpy(), columns)
