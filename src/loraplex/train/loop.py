"""The one training loop every regime runs through.

What a regime supplies (:class:`Regime`): the next batch of this rank (on the run's device), a loss, an
evaluation, and its own resumable state.  What the loop owns: AdamW with linear warm-up and cosine decay,
gradient clipping, autocast and fp16 loss scaling, validation-based model selection (last and best both
reported), JSONL + TensorBoard logs, a progress bar, atomic device-free checkpoints, resume, DDP,
``torch.compile`` and a clear stop on a non-finite loss.

A run without a validation split (``data.val_per_domain: 0``, :attr:`Regime.validates` false) is never
validated: the last step is the selected model, so ``best/`` holds the final adapters and results.json's
``best`` is its ``last`` (test evaluated once, ``best_step`` the last step, empty ``val`` metrics): the
file keeps one schema for every reader.

A step reads the device from the host once: the loss, the regime's metrics and the gradient norm come
back in one transfer, after the backward pass has been queued and before the optimiser steps.

Resume is exact because nothing random is carried in hidden state: the regime's stream restores its
cursor from the checkpoint, and the per-step RNG (dropout, augmentation) is re-seeded from
``(seed, step, rank)`` at every step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..config import ConfigError, TrainSection
from ..core.model import AdaptedModel
from ..core.state import (
    CONFIG_FILE,
    TENSORS_FILE,
    AdapterFileError,
    NonFiniteError,
    adapter_state,
    atomic_write,
    count_parameters,
    from_version_1,
    load_adapter_state,
    load_tensors,
    non_finite,
    orphaned_temporaries,
    state_digest,
)
from .dist import Dist, any_rank, barrier, mean_over_ranks
from .placement import Placement

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
RESULTS = "results.json"


class TrainingDiverged(RuntimeError):
    """The loss, the gradients or the weights became NaN or infinite; nothing non-finite was written, and the
    last good checkpoint is kept."""


class CheckpointError(AdapterFileError):
    """A run's checkpoint that cannot be resumed from: unreadable, damaged, or for other backbone weights."""


class Regime(Protocol):
    """A training regime: multi-domain now; dense multi-task and continual plug in the same way."""

    selection_metric: str  # higher is better; read from ``evaluate(model, "val")``
    validates: bool  # false: no validation split, the last step is the selected model

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


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities as ``null``: JSON that every parser reads (``json`` writes bare NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kw) -> str:
    return json.dumps(strict_json(obj), allow_nan=False, **kw)


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically, device-free, with a checksum of everything in it."""
    payload = _on_cpu(payload)
    atomic_write(path, lambda tmp: torch.save({**payload, "sha256": state_digest(payload)}, tmp))


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, or a clear error: unreadable (zero bytes, truncated, not a checkpoint) or
    damaged (its checksum does not match).  Only tensors and plain types are read (``weights_only``)."""
    how = "Restore it from a copy, or start over in a new run directory (--set output.dir=…)."
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a damaged file (EOF, zip, unpickling errors)
        # the type alone: torch's messages run to paragraphs (and suggest unpickling untrusted files)
        raise CheckpointError(
            f"{path} is unreadable: cut short or not a checkpoint ({type(err).__name__}). {how}"
        ) from err
    if not isinstance(saved, dict) or "loop" not in saved:
        raise CheckpointError(f"{path} is not a loraplex checkpoint. {how}")
    digest = saved.pop("sha256", None)
    if digest is not None and digest != state_digest(saved):
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with them. {how}")
    return saved


class MetricsLog:
    """``metrics.jsonl`` (and TensorBoard) on the main rank; on resume, lines past the checkpoint go (and a
    line cut short by a kill)."""

    def __init__(self, run_dir: Path, resumed_step: int, tensorboard: bool) -> None:
        self.path = run_dir / METRICS
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resumed_step]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in kept)))
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # optional heavy import

            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=resumed_step + 1)

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(dumps({"step": step, "split": split, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf  # a partial line: dropped


def summary(metrics: dict[str, float], selection: str) -> str:
    """One readable line of metrics, the selection metric first."""
    keys = [selection, *(k for k in metrics if k != selection)]
    return " · ".join(f"{k} {metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))


def fit(
    model: AdaptedModel,
    regime: Regime,
    cfg: TrainSection,
    run_dir: Path,
    *,
    dist: Dist | None = None,
    tensorboard: bool = True,
    progress: bool = True,
    regulariser: Callable[[AdaptedModel], tuple[torch.Tensor | None, dict[str, torch.Tensor]]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` (already on ``dist.device``) under ``regime`` for ``cfg.steps`` steps, resuming from
    ``run_dir`` if it holds a checkpoint; returns (and on the main rank writes) ``results.json``.  A method's
    ``regulariser`` (a penalty on the weights, e.g. CLoRA's SADE) is added to every step's loss.

    A finished run is not trained or evaluated again: its results are returned as they were written.  A
    run's ``train.steps`` may be raised to continue it (the cosine schedule is recomputed over the new
    total, so the learning rate rises again from where it was: a warm restart)."""
    dist = dist or Dist()
    placement = Placement(dist.device, cfg.precision)
    say = announcer(progress, dist)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        for orphan in orphaned_temporaries(run_dir, (CHECKPOINT, RESULTS, METRICS, TENSORS_FILE, CONFIG_FILE)):
            orphan.unlink(missing_ok=True)  # left by a process killed mid-write (the run directory is locked)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    scaler = placement.scaler()
    state = LoopState()
    checkpoint_path = run_dir / CHECKPOINT
    backbone = model.backbone_info.get("fingerprint")
    if checkpoint_path.exists():
        saved = read_checkpoint(checkpoint_path)
        if saved.get("backbone", backbone) != backbone:
            source = model.backbone_info.get("source") or model.backbone_info.get("architecture")
            raise CheckpointError(
                f"{checkpoint_path} was written with other backbone weights than {source} has now: has the "
                "backbone changed since? Resume on the weights the run started from, or start a new run."
            )
        tensors = saved["model"] if "sha256" in saved else from_version_1(model, saved["model"])  # older runs
        load_adapter_state(model, tensors, str(checkpoint_path))
        optimizer.load_state_dict(saved["optimizer"])  # moves the state to the parameters' device
        scheduler.load_state_dict(saved["scheduler"])
        if saved.get("scaler"):  # empty when fp16 scaling is off
            scaler.load_state_dict(saved["scaler"])
        regime.load_state_dict(saved["regime"])
        state = LoopState(**saved["loop"])
        if state.step > cfg.steps:
            raise ConfigError(
                f"train.steps={cfg.steps} is below the {state.step} steps this run has done: raise it, or choose "
                "another output.dir for a shorter run"
            )
        finished = _finished_results(run_dir, state.step)
        if state.step == cfg.steps and finished is not None:
            say(f"{run_dir} is finished ({state.step} steps): its results stand (raise train.steps to go on)")
            return finished
        say(f"resuming {run_dir} from step {state.step} of {cfg.steps}")
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

    def diverged(why: str) -> TrainingDiverged:
        bar.close()
        where = f"step {saved_step} in {checkpoint_path}" if saved_step is not None else "none written yet"
        return TrainingDiverged(
            f"{why}; training stopped before it was written anywhere. Last good checkpoint: {where}. "
            "Lower train.lr, raise train.warmup_steps or set train.clip_grad, in a new run directory "
            "(--set output.dir=…): this one's recipe is fixed."
        )

    def checkpoint() -> None:
        nonlocal saved_step
        if dist.is_main:
            tensors = adapter_state(model)
            if non_finite(tensors):
                raise diverged(f"the weights hold NaN or infinite values at step {state.step}")
            save_checkpoint(
                checkpoint_path,
                {
                    "model": tensors,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "regime": regime.state_dict(),
                    "loop": state.__dict__,
                    "backbone": backbone,
                },
            )
        saved_step = state.step
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
                try:
                    model.save(run_dir / "best")
                except NonFiniteError as err:
                    raise diverged(str(err)) from err
            say(f"step {state.step}/{cfg.steps} val: {summary(state.last_val, regime.selection_metric)}"
                f" (best {state.best_score:.4f} at step {state.best_step})")  # fmt: skip
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
            if regulariser is not None:
                term, extra = regulariser(model)
                loss = loss if term is None else loss + term
                metrics.update(extra)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # a no-op without fp16 scaling
        if cfg.clip_grad is not None:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        else:
            metrics["grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        read = torch.stack([v.detach().float() for v in (loss, *metrics.values())]).tolist()  # the step's one sync
        values = dict(zip(["loss", *metrics], read, strict=True))
        # an infinite gradient under fp16 is the scaler's business (it skips the step and lowers the scale)
        bad_grad = not math.isfinite(values["grad_norm"]) and not scaler.is_enabled()
        if any_rank(dist, not math.isfinite(values["loss"]) or bad_grad):  # before the update: the weights stay good
            what = "loss" if not math.isfinite(values["loss"]) else "gradient norm"
            raise diverged(f"the {what} became {values['loss' if what == 'loss' else 'grad_norm']} at step {step + 1}")
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
        if regime.validates and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
            validate()
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.steps:
            checkpoint()
    bar.close()
    model.eval()
    results = _final_results(model, regime, state, run_dir, placement, say) if dist.is_main else {}
    if log is not None:
        log.close()
    barrier(dist)
    return results


def announcer(progress: bool, dist: Dist):
    """A line for the person watching (main rank only): above the progress bar, or plain when there is none."""

    def say(line: str) -> None:
        if not dist.is_main:
            return
        if progress:
            tqdm.write(line)
        else:
            print(line, flush=True)

    return say


def _finished_results(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """The results a run wrote when it finished ``steps`` steps, if it did."""
    path = run_dir / RESULTS
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written again below
    return results if results.get("steps") == steps else None


def _final_results(
    model: AdaptedModel, regime: Regime, state: LoopState, run_dir: Path, placement: Placement, say
) -> dict[str, Any]:
    """Test metrics of the last and of the best-on-validation weights; writes final/ and results.json.  Without
    validation the last weights are the selected ones: written to best/ too, and tested once."""
    model.save(run_dir / "final")
    best_step = state.best_step if regime.validates else state.step
    if not regime.validates:
        model.save(run_dir / "best")
    say("evaluating the last and the best-on-validation adapters on test" if regime.validates else
        "no validation split: the last step is the selected model (best = last); evaluating it on test")  # fmt: skip
    with torch.inference_mode(), placement.autocast():
        last = {"val": state.last_val, "test": regime.evaluate(model, "test")}
        say(f"test (last, step {state.step}): {summary(last['test'], regime.selection_metric)}")
        if regime.validates:
            load_tensors(model, run_dir / "best")
            best = {"val": regime.evaluate(model, "val"), "test": regime.evaluate(model, "test")}
            say(f"test (best, step {best_step}): {summary(best['test'], regime.selection_metric)}")
            load_tensors(model, run_dir / "final")
        else:
            best = {"val": {}, "test": dict(last["test"])}
    results = {
        "method": model.method_name,
        "params": count_parameters(model),
        "train_seconds": state.train_seconds,
        "steps": state.step,
        "best_step": best_step,
        "selection_metric": regime.selection_metric,
        "last": last,
        "best": best,
    }
    atomic_write(run_dir / RESULTS, lambda tmp: Path(tmp).write_text(dumps(results, indent=2) + "\n"))
    return results
