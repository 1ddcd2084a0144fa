"""Where a run computes and in what precision: decided here, once per process, from the config.

* **Device** (``train.device``): ``auto`` takes CUDA when it is present; under ``torchrun`` each rank
  takes the GPU of its ``LOCAL_RANK`` (an explicit ``cuda:N`` is for one process).  The model, heads,
  batches, targets, metrics and optimiser state live there; checkpoints and adapter files are written
  device-free, so a run resumes or evaluates on another device.
* **Precision** (``train.precision``): forward passes (training and evaluation) run under
  ``torch.autocast`` in bf16 or fp16, fp16 with a gradient scaler; trained tensors stay fp32.
* **Frozen backbone dtype** (``backbone.dtype``): the weights of the frozen linear and convolution
  layers — nearly all of a backbone's bytes — are held in bf16 / fp16; norms, embeddings and everything
  trained stay fp32, which keeps every op well-typed under autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError
from ..core.model import AdaptedModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def resolve_device(setting: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → this process's device (``cuda`` → ``cuda:LOCAL_RANK``)."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"train.device={setting} but this machine has no usable CUDA device; use cpu or auto")
    if ":" in setting and world > 1:
        raise ConfigError(f"train.device={setting} names one GPU, but torchrun started {world} processes: use cuda")
    index = int(setting.partition(":")[2] or local_rank)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"train.device asks for cuda:{index}; this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Placement:
    """A device and an autocast precision, with what follows from them."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its narrow exponent underflows small gradients); a pass-through otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    @property
    def pin_memory(self) -> bool:
        """Page-locked host batches, so the copy to a GPU runs asynchronously."""
        return self.device.type == "cuda"

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device, non_blocking=True)


def hold_frozen(model: AdaptedModel, dtype: str) -> AdaptedModel:
    """Hold the frozen matmul weights of the backbone in ``dtype`` (see the module docstring)."""
    target = DTYPES[dtype]
    if target == torch.float32:
        return model
    for module in model.backbone.modules():
        if isinstance(module, MATMUL_LAYERS):
            for p in module.parameters(recurse=False):
                if not p.requires_grad:
                    p.data = p.data.to(target)
    return model
