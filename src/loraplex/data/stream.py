"""Multi-domain batches: a seeded, resumable, rank-sharded stream of mixed-domain uint8 batches, plus the one
conversion from uint8 images to normalised model input.

Images stay uint8 at their native size until `to_tensor_batch`, so a 70k-image domain costs megabytes, not
gigabytes, whatever resolution the backbone wants.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

Sampling = Literal["proportional", "uniform", "temperature"]
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights for RGB -> grey


def to_tensor_batch(images_uint8: torch.Tensor, size: int, channels: int = 3) -> torch.Tensor:
    """uint8 `[B, H, W]` or `[B, H, W, C]` -> float `[B, channels, size, size]`, bilinear (antialiased) resize,
    normalised with mean 0.5 / std 0.5; grey is repeated to 3 channels, RGB reduced to luma for 1."""
    x = images_uint8 if images_uint8.dim() == 4 else images_uint8.unsqueeze(-1)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[1] == 1 and channels == 3:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 3 and channels == 1:
        x = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != channels:
        raise ValueError(f"cannot turn {x.shape[1]}-channel images into {channels} channels")
    return (x - 0.5) / 0.5


def to_model_input(samples_uint8: torch.Tensor, size: int, frames: int | None = None) -> torch.Tensor:
    """`to_tensor_batch` for images, or for clips `[B, T, H, W(, 3)]` when `frames` is set: frames are folded
    into the batch for the conversion and unfolded again, giving `[B, T, 3, size, size]`."""
    if frames is None:
        return to_tensor_batch(samples_uint8, size)
    batch = samples_uint8.shape[0]
    return to_tensor_batch(samples_uint8.flatten(0, 1), size).unflatten(0, (batch, -1))


def resize_uint8(images_uint8: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """`to_tensor_batch`'s resize and channel conversion, back to uint8 `[B, size, size]` / `[B, size, size, 3]`:
    how samples are brought to the run's input size once and kept small."""
    x = to_tensor_batch(images_uint8, size, channels)
    x = (x * 127.5 + 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return x.squeeze(-1) if channels == 1 else x


@dataclass
class DomainData:
    """One domain of a multi-domain run: CPU uint8 samples and int64 labels.

    Samples are images `[N, H, W]` / `[N, H, W, 3]`, or clips `[N, T, H, W]` / `[N, T, H, W, 3]` when `frames`
    is set.  Everything reads them through `take`, which is what lets a subclass decode on demand
    (:class:`loraplex.data.video.VideoDomain`) instead of holding every sample in memory.

    `on_demand` says which kind a domain is: True when `take` reads and decodes files (video, PASCAL, image
    folders), so reading batches in worker processes (:class:`loraplex.data.BatchLoader`) takes that work off
    the training thread; False for in-memory samples, which workers would only copy between processes.
    """

    on_demand: ClassVar[bool] = False

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    frames: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def rgb(self) -> bool:
        return len(self.sample_shape) == (4 if self.frames else 3)

    def take(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """The samples at `rows`; `step` is the training step drawing them (None in evaluation), for
        domains whose samples are random per draw (video segment offsets)."""
        return self.images.index_select(0, rows)

    def take_labels(self, rows: torch.Tensor) -> torch.Tensor:
        """The labels (class ids, or packed dense targets) at `rows`; read from disk by lazy domains."""
        return self.labels.index_select(0, rows)

    def resized(self, size: int, channels: int | None = None) -> DomainData:
        """The same domain at `size`×`size` uint8 (`channels` 1 or 3, default unchanged), so domains of different
        native sizes can share one stream.  An empty domain (a run's val part with ``data.val_per_domain: 0``)
        stays empty, at the new size."""
        channels = channels or (3 if self.rgb else 1)
        flat = self.images.flatten(0, 1) if self.frames else self.images
        starts = range(0, len(flat), 4096) or [0]  # one (empty) chunk for an empty domain: torch.cat needs one
        images = torch.cat([resize_uint8(flat[start : start + 4096], size, channels) for start in starts])
        if self.frames:
            images = images.unflatten(0, (len(self), self.frames))
        return DomainData(self.name, images, self.labels, self.num_classes, self.frames)


def eval_batches(domain: DomainData, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(samples, labels) batches of `domain` in order, every sample exactly once."""
    for span in eval_spans(len(domain), batch_size):
        yield eval_batch(domain, span)


def eval_spans(n: int, batch_size: int) -> list[range]:
    """The rows of each evaluation batch of a domain of `n` samples; ranges, so they pickle to workers as 3 ints."""
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def eval_batch(domain: DomainData, span: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, labels) at the rows of `span`: one evaluation batch, read inline or in a worker."""
    rows = torch.arange(span.start, span.stop)
    return domain.take(rows), domain.take_labels(rows)


@dataclass(frozen=True, eq=False)
class BatchPlan:
    """One rank's shard of one global batch, decided but not yet read: for each domain, the positions of the shard
    it fills and the rows it takes there.  A few small arrays, cheap to send to a worker process that reads the
    samples (:func:`materialise`).  `state` is the stream's `state_dict()` once this batch is consumed: what a
    checkpoint stores, however far a loader has read ahead."""

    step: int
    positions: tuple[np.ndarray, ...]  # per domain, int64
    rows: tuple[np.ndarray, ...]  # per domain, int64, aligned with its positions
    state: dict

    def __len__(self) -> int:
        return sum(len(p) for p in self.positions)


def materialise(domains: Sequence[DomainData], plan: BatchPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 samples, labels, int64 domain ids) of `plan`, read from the stream's `domains`: the slow half of a
    batch (decoding, for on-demand domains), and a function of the plan only, so any process can run it."""
    n = len(plan)
    images = torch.empty((n, *domains[0].sample_shape), dtype=torch.uint8)
    ids = torch.empty(n, dtype=torch.int64)
    labels: torch.Tensor | None = None  # class ids [n], or packed dense targets [n, C, H, W]
    for d, domain in enumerate(domains):  # index_copy_: far faster than advanced indexing
        positions, rows = torch.from_numpy(plan.positions[d]), torch.from_numpy(plan.rows[d])
        ids.index_fill_(0, positions, d)
        images.index_copy_(0, positions, domain.take(rows, step=plan.step))
        chunk = domain.take_labels(rows)
        if labels is None:
            labels = chunk.new_empty((n, *chunk.shape[1:]))
        labels.index_copy_(0, positions, chunk)
    assert labels is not None  # the stream has at least one domain
    return images, labels, ids


def _probabilities(sizes: list[int], sampling: Sampling, temperature: float) -> np.ndarray:
    n = np.asarray(sizes, dtype=np.float64)
    if sampling == "proportional":
        weights = n
    elif sampling == "uniform":
        weights = np.ones_like(n)
    elif sampling == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        weights = n ** (1.0 / temperature)
    else:
        raise ValueError(f"unknown sampling {sampling!r}; use 'proportional', 'uniform' or 'temperature'")
    return weights / weights.sum()


class MultiDomainStream:
    """Endless mixed-domain batches, identical for any number of ranks.

    Step k's global batch picks a domain per position with a generator seeded by (seed, k), then takes each
    domain's next images from a per-domain epoch permutation (seeded by (seed, domain, epoch)), so every
    training image is seen once per domain epoch. The state is the step plus one cursor and epoch per domain:
    plain ints, so a resumed run draws exactly the batches an uninterrupted one would. Every rank advances the
    full global state and keeps global positions rank, rank + world_size, ...
    """

    def __init__(
        self,
        domains: list[DomainData],
        *,
        batch_size: int,
        sampling: Sampling = "proportional",
        temperature: float = 2.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not domains or any(len(d) == 0 for d in domains):
            raise ValueError("MultiDomainStream needs at least one domain and no empty domains")
        shapes = {d.name: d.sample_shape for d in domains}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"domains have different image shapes {shapes}; bring them to one with DomainData.resized")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"need batch_size ({batch_size}) divisible by world_size ({world_size}), 0 <= rank < it")
        self.domains = domains
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.sizes = [len(d) for d in domains]
        self.probabilities = _probabilities(self.sizes, sampling, temperature)
        self._config = {"seed": seed, "batch_size": batch_size, "sampling": sampling, "temperature": temperature}
        self.step = 0
        self.cursor = [0] * len(domains)
        self.epoch = [0] * len(domains)
        self._perms = [self._permutation(d, 0) for d in range(len(domains))]

    def _permutation(self, domain: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, domain, epoch]).permutation(self.sizes[domain])

    def _draw(self, domain: int, k: int) -> np.ndarray:
        """The next `k` indices of `domain` without replacement, starting a new epoch permutation when one ends."""
        out = []
        while k > 0:
            if self.cursor[domain] == self.sizes[domain]:
                self.epoch[domain] += 1
                self.cursor[domain] = 0
                self._perms[domain] = self._permutation(domain, self.epoch[domain])
            start = self.cursor[domain]
            take = min(k, self.sizes[domain] - start)
            out.append(self._perms[domain][start : start + take])
            self.cursor[domain] += take
            k -= take
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def next_plan(self) -> BatchPlan:
        """Advance past the next global batch and return this rank's shard of it, not yet read (cheap)."""
        rng = np.random.default_rng([self.seed, 0, self.step, 0])
        domain_ids = rng.choice(len(self.domains), size=self.batch_size, p=self.probabilities)
        index = np.empty(self.batch_size, dtype=np.int64)
        for d in range(len(self.domains)):
            where = domain_ids == d
            index[where] = self._draw(d, int(where.sum()))
        self.step += 1
        ids, rows = domain_ids[self.rank :: self.world_size], index[self.rank :: self.world_size]
        positions = tuple(np.flatnonzero(ids == d) for d in range(len(self.domains)))
        return BatchPlan(self.step - 1, positions, tuple(rows[p] for p in positions), self.state_dict())

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's shard of the next global batch: (uint8 samples, labels, int64 domain ids)."""
        return materialise(self.domains, self.next_plan())

    def state_dict(self) -> dict:
        """JSON-serialisable position of the stream (the same on every rank)."""
        position = {"step": self.step, "cursor": list(self.cursor), "epoch": list(self.epoch)}
        return {**self._config, "sizes": list(self.sizes), **position}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`; refuses a state from a differently configured stream."""
        mine = {**self._config, "sizes": self.sizes}
        theirs = {key: state[key] for key in mine}
        if theirs != mine:
            raise ValueError(f"stream state is for {theirs}, this stream is {mine}")
        self.step = int(state["step"])
        self.cursor = [int(c) for c in state["cursor"]]
        self.epoch = [int(e) for e in state["epoch"]]
        self._perms = [self._permutation(d, e) for d, e in enumerate(self.epoch)]
