"""What the memory-based continual methods (InfLoRA, DualLoRA) share: an energy threshold annealed across tasks, and
one :class:`~loraplex.core.subspace.FeatureMemory` per adapted layer kept as the method's state between tasks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.subspace import FeatureMemory
from .registry import Continual, MethodConfig


@dataclass
class MemoryConfig(MethodConfig):
    """``threshold_start`` / ``threshold_end``: the memory's energy threshold at the first task and the last, in
    (0, 1], annealed linearly as InfLoRA does (its ``lamb`` / ``lame``)."""

    threshold_start: float = 0.95
    threshold_end: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("threshold_start", "threshold_end"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"config key {key!r} (a memory energy threshold) must lie in (0, 1], got {value}")
        if self.threshold_end < self.threshold_start:
            raise ValueError(f"threshold_end {self.threshold_end} is below threshold_start {self.threshold_start}")

    def threshold(self, task: int) -> float:
        """``ε_t = ε_0 + (ε_1 − ε_0)·t/T`` (t from 0)."""
        return self.threshold_start + (self.threshold_end - self.threshold_start) * task / len(self.tasks)


class MemoryContinual(Continual):
    """Hooks holding one feature memory per adapted layer, made by :meth:`new_memory`; the memories are the state
    written after every task (so a resumed sequence goes on growing the same ones)."""

    def __init__(self, config: MemoryConfig) -> None:
        super().__init__(config)
        self.memories: dict[str, FeatureMemory] = {}

    def new_memory(self, dim: int) -> FeatureMemory:
        raise NotImplementedError

    def memory(self, name: str, dim: int) -> FeatureMemory:
        if name not in self.memories:
            self.memories[name] = self.new_memory(dim)
        return self.memories[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": t for name, m in self.memories.items() for key, t in m.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            name, part = key.rsplit(".", 1)
            by_layer.setdefault(name, {})[part] = value
        self.memories = {}
        for name, own in by_layer.items():
            self.memory(name, own["basis"].shape[0]).load_state_dict(own)
