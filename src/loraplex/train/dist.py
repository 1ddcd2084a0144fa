"""Process-group plumbing for ``torchrun`` (PyTorch DDP): NCCL when the ranks compute on GPUs, gloo on CPUs.

One process = ``Dist(rank=0, world=1)``, and every collective below is then a no-op, so the loop has
one code path for both.  Collectives run on the ranks' device (NCCL only moves CUDA tensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as torch_dist

from .placement import resolve_device


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def device_ids(self) -> list[int] | None:
        """What ``DistributedDataParallel`` takes: this rank's GPU, or None on a CPU."""
        return [self.device.index] if self.device.type == "cuda" else None


def init_from_env(device: str = "auto") -> Dist:
    """This process's device (``train.device``) and, under ``torchrun``, the process group it joins."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    placed = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")), world)
    if world <= 1:
        return Dist(device=placed)
    if not torch_dist.is_initialized():
        if placed.type == "cuda":
            torch.cuda.set_device(placed)
            torch_dist.init_process_group("nccl", device_id=placed)
        else:
            torch_dist.init_process_group("gloo")
    return Dist(torch_dist.get_rank(), torch_dist.get_world_size(), placed)


def shutdown(dist: Dist) -> None:
    if dist.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.active:
        torch_dist.barrier(device_ids=dist.device_ids)


def any_rank(dist: Dist, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a non-finite loss)."""
    if not dist.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=dist.device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(dist: Dist, values: list[float]) -> list[float]:
    """Element-wise mean of ``values`` over the ranks, in one collective."""
    if not dist.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(t)
    return (t / dist.world).tolist()
