"""The one training loop every regime runs through.

What a regime supplies (:class:`Regime`): the next batch of this rank (on the run's device), a loss, an
evaluation, and its own resumable state.  What the loop owns: AdamW with linear warm-up and cosine decay,
gradient clipping, autocast and fp16 loss scaling, validation-based model selection (last and best both
reported), JSONL + TensorBoard logs, a progress bar, atomic device-free checkpoints, resume, DDP,
``torch.compile`` and a clear stop on a non-finite loss.

A step reads the device from the host once: the loss, the regime's metrics and the gradient norm come
back in one transfer, after the backward pass has been queued and before the optimiser steps.

Resume is exact because nothing random is carried in hidden state: the regime's stream restores its
cursor from the checkpoint, and the per-step RNG (dropout, augmentation) is re-seeded from
``(seed, step, rank)`` at every step.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import TrainSection
from ..core.model import AdaptedModel
from ..core.state import adapter_state, count_parameters, load_tensors
from .dist import Dist, any_rank, barrier, mean_over_ranks
from .placement import Placement

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Regime(Protocol):
    """A training regime: multi-domain now; dense multi-task and continual plug in the same way."""

    selection_metric: str  # higher is better; read from ``evaluate(model, "val")``

    def next_batch(self) -> Any: ...

    def batch_images(self, batch: Any) -> int: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def evaluate(self, model: AdaptedModel, split: str) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopState:
    step: int = 0  # optimizer steps completed
    best_step: int = -1
    best_score: float = -math.inf
    train_seconds: float = 0.0
    last_val: dict[str, float] = field(default_factory=dict)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1_009 + rank


def warmup_cosine(cfg: TrainSection):
    """Linear warm-up to the base rate, then cosine decay to zero at ``cfg.steps``."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters timm exempts from weight decay (position embeddings, class tokens, relative-position tables):
    what ``no_weight_decay()`` names on every timm module inside ``model``, as full names."""
    names = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            names |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return names


def make_optimizer(model: AdaptedModel, cfg: TrainSection) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and other 1-d tensors nor on what timm's ``no_weight_decay()``
    names; heads may have their own rate."""
    exempt = no_weight_decay_names(model)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name.startswith("heads."), p.ndim <= 1 or name in exempt), []).append(p)
    param_groups = []
    for (is_head, no_decay), params in sorted(groups.items()):
        lr = cfg.head_lr if is_head and cfg.head_lr is not None else cfg.lr
        param_groups.append({"params": params, "lr": lr, "weight_decay": 0.0 if no_decay else cfg.weight_decay})
    if not param_groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(param_groups)


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor moved to the CPU: checkpoints are device-free."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard) on the main rank; on resume, lines past the checkpoint go."""

    def __init__(self, run_dir: Path, resumed_step: int, tensorboard: bool) -> None:
        self.path = run_dir / METRICS
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional heavy import

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_step + 1)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def fit(
    model: AdaptedModel,
    regime: Regime,
    cfg: TrainSection,
    run_dir: Path,
    *,
    dist: Dist | None = None,
    tensorboard: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``model`` (already on ``dist.device``) under ``regime`` for ``cfg.steps`` steps, resuming from
    ``run_dir`` if it holds a checkpoint; returns (and on the main rank writes) ``results.json``."""
    dist = dist or Dist()
    placement = Placement(dist.device, cfg.precision)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    scaler = placement.scaler()
    state = LoopState()
    checkpoint_path = run_dir / CHECKPOINT
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])  # moves the state to the parameters' device
        scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):  # empty when fp16 scaling is off
            scaler.load_state_dict(saved["scaler"])
        regime.load_state_dict(saved["regime"])
        state = LoopState(**saved["loop"])
    log = MetricsLog(run_dir, state.step, tensorboard) if dist.is_main else None
    if cfg.compile:
        model.compile(**({} if cfg.compile is True else {"backend": cfg.compile}))
    trained = (
        DistributedDataParallel(model, device_ids=dist.device_ids, find_unused_parameters=True)
        if dist.active
        else model
    )
    params = [p for p in model.parameters() if p.requires_grad]

    saved_step = state.step if checkpoint_path.exists() else None

    def checkpoint() -> None:
        nonlocal saved_step
        saved_step = state.step
        if dist.is_main:
            _atomic_save(
                {
                    "model": adapter_state(model),
                    "optimizer": _on_cpu(optimizer.state_dict()),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "regime": regime.state_dict(),
                    "loop": state.__dict__,
                },
                checkpoint_path,
            )
        barrier(dist)

    def validate() -> None:
        if dist.is_main:
            model.eval()
            with torch.inference_mode(), placement.autocast():
                state.last_val = regime.evaluate(model, "val")
            model.train()
            log.write(state.step, "val", state.last_val)
            score = state.last_val[regime.selection_metric]
            if score > state.best_score:
                state.best_score, state.best_step = score, state.step
                model.save(run_dir / "best")
        barrier(dist)

    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", unit="step", disable=not (progress and dist.is_main))
    model.train()
    images, window_start = 0, time.perf_counter()
    for step in range(state.step, cfg.steps):
        started = time.perf_counter()
        torch.manual_seed(step_seed(cfg.seed, step, dist.rank))  # augmentation and dropout replay on resume
        batch = regime.next_batch()
        with placement.autocast():
            loss, metrics = regime.loss(trained, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            scaler.unscale_(optimizer)
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        read = torch.stack([v.detach().float() for v in (loss, *metrics.values())]).tolist()  # the step's one sync
        values = dict(zip(["loss", *metrics], read, strict=True))
        if any_rank(dist, not math.isfinite(values["loss"])):  # before the update: the weights stay good
            bar.close()
            where = f"step {saved_step} in {checkpoint_path}" if saved_step is not None else "none written yet"
            raise TrainingDiverged(
                f"the loss became {values['loss']} at step {step + 1}; training stopped. Last good checkpoint: "
                f"{where}. Lower train.lr, raise train.warmup_steps or set train.clip_grad."
            )
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state.step = step + 1
        state.train_seconds += time.perf_counter() - started
        images += regime.batch_images(batch) * dist.world
        values = dict(zip(values, mean_over_ranks(dist, list(values.values())), strict=True))
        values["lr"] = scheduler.get_last_lr()[0]
        if dist.is_main:
            log.write(state.step, "train", values)
            elapsed = time.perf_counter() - window_start
            bar.set_postfix(loss=f"{values['loss']:.3f}", img_s=f"{images / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            validate()
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            checkpoint()
    bar.close()
    model.eval()
    results = _final_results(model, regime, state, run_dir, placement) if dist.is_main else {}
    if log is not None:
        log.close()
    barrier(dist)
    return results


def _final_results(
    model: AdaptedModel, regime: Regime, state: LoopState, run_dir: Path, placement: Placement
) -> dict[str, Any]:
    """Test metrics of the last and of the best-on-validation weights; writes final/ and results.json."""
    model.save(run_dir / "final")
    with torch.inference_mode(), placement.autocast():
        last = {"val": state.last_val, "test": regime.evaluate(model, "test")}
        load_tensors(model, run_dir / "best")
        best = {"val": regime.evaluate(model, "val"), "test": regime.evaluate(model, "test")}
        load_tensors(model, run_dir / "final")
    results = {
        "method": model.method_name,
        "params": count_parameters(model),
        "train_seconds": state.train_seconds,
        "steps": state.step,
        "best_step": state.best_step,
        "selection_metric": regime.selection_metric,
        "last": last,
        "best": best,
    }
    path = run_dir / RESULTS
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    return results
