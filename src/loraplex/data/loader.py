"""Reading batches in worker processes, so that decoding (video, PASCAL, image folders) does not hold up training.

The stream decides each batch in the main process (:meth:`MultiDomainStream.next_plan`: a few ints of state) and a
DataLoader worker reads it (:func:`materialise`).  Plans are made in stream order and what a batch holds is a
function of (seed, step, rows) only, so the batches are bit-identical for any number of workers, a resumed run
reads exactly what an uninterrupted one would, and rank shards still interleave into the global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .stream import BatchPlan, DomainData, MultiDomainStream, eval_batch, eval_batches, eval_spans, materialise

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class BatchLoader:
    """`stream.next_batch()`, read ahead by `workers` processes (0: read inline, exactly as the stream does).

    `state_dict()` is the stream's state after the last batch *returned*, not after those read ahead, so it is what
    a checkpoint stores; `load_state_dict` rewinds the stream there and the workers restart at the next batch.
    `pin_memory` (for training on CUDA) page-locks batches in the DataLoader's pinning thread, so only with workers.
    """

    def __init__(self, stream: MultiDomainStream, *, workers: int = 0, pin_memory: bool = False) -> None:
        if workers < 0:
            raise ValueError(f"workers must be ≥ 0, got {workers}")
        self.stream, self.workers, self.pin_memory = stream, workers, pin_memory
        self._read = functools.partial(_read_plan, stream.domains)
        self._state = stream.state_dict()
        self._ahead: Iterator[tuple[dict, Batch]] | None = None  # created by the first next_batch, so lazily

    def next_batch(self) -> Batch:
        """This rank's shard of the next global batch: (uint8 samples, labels, int64 domain ids)."""
        if self.workers == 0:
            self._state, batch = self._read(self.stream.next_plan())
            return batch
        if self._ahead is None:
            plans = _Plans(self.stream)
            self._ahead = iter(_worker_loader(self._read, plans, self.workers, self.pin_memory, persistent=True))
        self._state, batch = next(self._ahead)
        return batch

    def state_dict(self) -> dict:
        """The stream's state once the last batch returned is consumed (JSON-serialisable)."""
        return self._state

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`: batches read ahead are dropped and reading restarts from `state`."""
        self.close()
        self.stream.load_state_dict(state)
        self._state = self.stream.state_dict()

    def close(self) -> None:
        """Stop the workers and rewind the stream to the last batch returned; `next_batch` may go on afterwards."""
        if self._ahead is not None:
            self._ahead._shutdown_workers()  # what the iterator runs when deleted; stops and joins the processes
            self._ahead = None
            self.stream.load_state_dict(self._state)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_loader(
    domain: DomainData, batch_size: int, workers: int = 0, pin_memory: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`eval_batches(domain, batch_size)` (in order, every sample once), read by `workers` processes when > 0; the
    workers start at the first batch and stop at the last (or when the iterator is dropped)."""
    if workers == 0:
        yield from eval_batches(domain, batch_size)
        return
    spans = [[span] for span in eval_spans(len(domain), batch_size)]
    yield from _worker_loader(functools.partial(eval_batch, domain), spans, workers, pin_memory, persistent=False)


def _read_plan(domains: list[DomainData], plan: BatchPlan) -> tuple[dict, Batch]:
    """A plan's batch with the stream state after it, which travels with the batch to tell the loader's position."""
    return plan.state, materialise(domains, plan)


class _Plans:
    """The DataLoader's batch sampler: one plan per batch, made in the main process, hence in stream order."""

    def __init__(self, stream: MultiDomainStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[list[BatchPlan]]:
        while True:
            yield [self.stream.next_plan()]


class _Jobs(Dataset):
    """A dataset whose indices are whole jobs (a plan, a span of rows), done by `read` in a worker."""

    def __init__(self, read: Callable[[Any], Any]) -> None:
        self.read = read

    def __getitem__(self, job: Any) -> Any:
        return self.read(job)


def _only(results: list[Any]) -> Any:
    return results[0]


def _worker_loader(
    read: Callable[[Any], Any], jobs: Iterable[list[Any]], workers: int, pin_memory: bool, *, persistent: bool
) -> DataLoader:
    """A DataLoader doing `read(job)` in `workers` processes, one job a batch, results in job order.

    Workers run one torch thread each (DataLoader sets that).  The loader gets its own generator because making
    the workers' seeds would otherwise draw from the global torch RNG, which training seeds per step (augmentation,
    dropout): a run must not depend on when its workers started."""
    return DataLoader(
        _Jobs(read),
        batch_sampler=jobs,
        collate_fn=_only,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=persistent,
        generator=torch.Generator(),
    )
