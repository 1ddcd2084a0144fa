"""Process-group plumbing for ``torchrun`` (PyTorch DDP; gloo on CPU, NCCL on GPU).

One process = ``Dist(rank=0, world=1)``, and every collective below is then a no-op, so the loop has
one code path for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_from_env() -> Dist:
    """Join the process group ``torchrun`` describes in the environment, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size())


def shutdown(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.active:
        torch_dist.barrier()


def any_rank(dist: Dist, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a non-finite loss)."""
    if not dist.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(dist: Dist, value: float) -> float:
    if not dist.active:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch_dist.all_reduce(t)
    return float(t.item()) / dist.world
