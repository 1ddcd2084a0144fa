"""From a :class:`~loraplex.config.RunConfig` to a trained run directory, and back for evaluation."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.models.swin_transformer import SwinTransformer

from .. import api
from ..config import RESUMABLE_KEYS, ConfigError, RunConfig, dump_config, from_dict
from ..core.model import AdaptedModel
from ..core.state import atomic_write
from ..data import DomainData, SourceMissingError
from ..data.dense import TASK_OUTPUTS
from ..data.domains import DENSE_DOMAINS, PARTS, dense_target_fn, domain_classes, domain_parts
from ..data.sequence import ContinualTask, build_sequence, task_parts
from ..eval.report import PREDICTIONS
from ..methods import MethodConfig, get_method, make_config
from ..models import FrameWise, create_backbone, describe_backbone, write_zoo_entry, zoo_dir, zoo_entries
from ..models.dense import SwinPyramid, TimmPyramid
from .continual import AFTER as CONTINUAL_AFTER
from .continual import STATE as CONTINUAL_STATE
from .continual import score_learned, train_continual
from .dist import Dist, init_from_env, shutdown
from .loop import CHECKPOINT, announcer, fit
from .placement import Placement, hold_frozen, resolve_device
from .regimes import MultiDomainRegime, MultiTaskRegime

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"


def build_backbone(config: RunConfig, *, load_weights: bool = True) -> torch.nn.Module:
    """The config's backbone: a feature pyramid for dense multi-task runs; with ``data.frames`` it runs
    frame-wise on clips and pools over time."""
    backbone = create_backbone(config.backbone, load=load_weights)
    if config.train.regime == "multitask":
        return SwinPyramid(backbone) if isinstance(backbone, SwinTransformer) else TimmPyramid(backbone)
    if config.data.frames is None:
        return backbone
    return FrameWise(backbone, config.backbone.temporal_pooling, config.data.frames)


def method_config(config: RunConfig) -> MethodConfig:
    return make_config(config.method_name, **config.method_kwargs())


def build_model(config: RunConfig, *, load_weights: bool = True) -> AdaptedModel:
    """Backbone + method + one head per domain, as the config says (no data needed), on the CPU in fp32:
    the backbone's fingerprint is taken there, before :func:`place` moves and casts it."""
    method = method_config(config)
    if config.train.regime == "multitask":
        heads, head = (
            {t: TASK_OUTPUTS[t] for t in config.data.tasks},
            {"kind": "dense", "out_size": config.backbone.img_size},
        )
    elif config.train.regime == "continual":
        heads, head = {t.name: t.classes_count for t in continual_tasks(config)}, None
    else:
        try:
            heads, head = {d: domain_classes(d) for d in config.data.domains}, None
        except ValueError as err:  # an unknown source, a malformed name: the config's fault
            raise ConfigError(f"data.domains: {err}") from err
    backbone = build_backbone(config, load_weights=load_weights)
    try:
        model = api.wrap(backbone, method, heads=heads, head=head)
    except ValueError as err:  # targets matching nothing, a rank the layers cannot hold, …
        raise ConfigError(f"method: {err}") from err
    model.backbone_info["source"] = describe_backbone(config.backbone)  # named by errors about this backbone
    return model


def method_regulariser(config: RunConfig):
    """The method's penalty on the weights bound to its config (None for most methods)."""
    regulariser = get_method(config.method_name).regulariser
    return None if regulariser is None else functools.partial(regulariser, method_config(config))


def continual_tasks(config: RunConfig) -> list[ContinualTask]:
    """The run's task sequence with its classes (drawn from ``data.seed`` for ``data.sequence: <n>``), from the
    config alone."""
    data = config.data
    try:
        counts = [domain_classes(d) for d in data.domains]
        return build_sequence(data.domains, data.sequence, data.seed, counts)
    except ValueError as err:
        raise ConfigError(f"data: {err}") from err


def place(model: AdaptedModel, config: RunConfig, device: torch.device) -> AdaptedModel:
    """The model on ``device`` with its frozen matmul weights in ``backbone.dtype``."""
    return hold_frozen(model.to(device), config.backbone.dtype)


def domain_splits(config: RunConfig) -> dict[str, list[DomainData]]:
    """Deterministic stratified train/val/test per domain (validation carved from training data), at the
    backbone's input size and one channel count, so that domains of different native sizes and colours
    share mixed batches.  With ``data.val_per_domain: 0`` every val part is empty (the run selects its last
    step); any other value must leave every domain some validation images, or selection would have nothing to
    score."""
    data = config.data
    splits: dict[str, list[DomainData]] = {part: [] for part in PARTS}
    for name in data.domains:
        try:
            parts = domain_parts(
                name,
                root=data.roots.get(name) or data.roots.get(name.partition(":")[0]),  # "vlcs:LabelMe" reads roots.vlcs
                seed=data.seed,
                train=data.train_per_domain,
                val=data.val_per_domain,
                test=data.test_per_domain,
                size=config.backbone.img_size,
                frames=data.frames,
                augment=data.augment,
                class_balance=data.class_balance,
                skip_unreadable=data.skip_unreadable,
            )
        except SourceMissingError:
            raise
        except ValueError as err:  # impossible split sizes, clips without frames, …: the config's fault
            raise ConfigError(f"data: {err}") from err
        if data.val_per_domain != 0 and not len(parts["val"]):
            raise ConfigError(
                f"data.val_per_domain={data.val_per_domain} leaves {name} no validation images: raise it, or set it "
                "to 0 to train without validation (the last step is then the model)"
            )
        for part in PARTS:
            splits[part].append(parts[part])
    if any(domain.rgb for domain in splits["train"]):  # one stream needs one sample shape: grey joins RGB
        for part in PARTS:
            splits[part] = [d if d.rgb else d.resized(d.sample_shape[-1], channels=3) for d in splits[part]]
    return splits


def _stream_settings(config: RunConfig, dist: Dist) -> dict[str, Any]:
    """What every regime's stream takes from the config and the process."""
    return {
        "batch_size": config.train.batch_size,
        "eval_batch_size": config.train.eval_batch_size,
        "seed": config.data.seed + config.train.seed,
        "rank": dist.rank,
        "world": dist.world,
        "placement": Placement(dist.device, config.train.precision),
        "workers": config.data.workers,
    }


def build_regime(config: RunConfig, dist: Dist) -> MultiDomainRegime | MultiTaskRegime:
    if config.train.regime == "multitask":
        if len(config.data.domains) != 1 or config.data.domains[0] not in DENSE_DOMAINS:
            raise ConfigError(
                f"train.regime multitask trains on one dense dataset, data.domains: [{' | '.join(DENSE_DOMAINS)}]; "
                f"got {config.data.domains}"
            )
        if config.data.augment:
            raise ConfigError("data.augment is for classification: its crops and flips do not move dense targets")
        target_of, available = dense_target_fn(config.data.domains[0])
        missing = sorted(set(config.data.tasks) - set(available))
        if missing:
            name = config.data.domains[0]
            raise ConfigError(f"data.tasks {missing} have no target in {name}; it has {list(available)}")
        return MultiTaskRegime(
            domain_splits(config),
            config.data.tasks,
            target_of=target_of,
            weights=config.train.task_weights,
            img_size=config.backbone.img_size,
            **_stream_settings(config, dist),
        )
    return MultiDomainRegime(
        domain_splits(config),
        img_size=config.backbone.img_size,
        sampling=config.data.sampling,
        temperature=config.data.temperature,
        augment=config.data.augment,
        frames=config.data.frames,
        label_smoothing=config.train.label_smoothing,
        mixup=config.train.mixup,
        objective=functools.partial(get_method(config.method_name).objective, method_config(config)),
        **_stream_settings(config, dist),
    )


def check_run_dir(config: RunConfig) -> None:
    """A run directory that holds a started run (a checkpoint) must hold this run's recipe: a run is known by
    its recipe, not by where it lies; refusing another recipe names every key that differs."""
    run_dir = Path(config.output.dir)
    saved = run_dir / CONFIG_FILE
    if not (run_dir / CHECKPOINT).exists() and not (run_dir / CONTINUAL_STATE).exists():
        return  # nothing started here yet: this config is the run's
    if not saved.is_file():
        raise ConfigError(f"{run_dir} holds a checkpoint but no {CONFIG_FILE}: restore it or choose another output.dir")
    try:
        before = _normalised(yaml.safe_load(saved.read_text()))
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{saved} is corrupted (not valid YAML: {err}); restore it or choose another output.dir"
        ) from err
    differing = _differences(_recipe(before), _recipe(yaml.safe_load(dump_config(config))))
    if differing:
        shown = "; ".join(differing[:6]) + (" …" if len(differing) > 6 else "")
        raise ConfigError(
            f"{run_dir} holds a run with another recipe ({shown}); resume it with its own, or choose another "
            "output.dir (e.g. --set output.dir=runs/new)"
        )


def _differences(before: Any, now: Any, prefix: str = "") -> list[str]:
    """``key: old → new`` for every dotted key whose value differs."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = sorted(set(before) | set(now), key=str)
        return [d for k in keys for d in _differences(before.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if before == now else [f"{prefix.rstrip('.')}: {before!r} → {now!r}"]


@contextlib.contextmanager
def run_lock(run_dir: Path, dist: Dist) -> Iterator[None]:
    """Hold the run directory for this process (the main rank): a second process writing into it would
    interleave logs and overwrite checkpoints.  The operating system drops the lock when the process
    ends, however it ends."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.dir {run_dir} is a file, not a directory: choose another output.dir")
    if not dist.is_main:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(
                f"{run_dir} is in use by {holder}: wait for it to end, or choose another output.dir"
            ) from err
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield


def _normalised(raw: Any) -> Any:
    """A saved config as this version writes it: keys added since it was saved take their defaults, so a
    run from an older version still resumes (one this version cannot parse compares as different)."""
    try:
        return yaml.safe_load(dump_config(from_dict(raw)))
    except ConfigError:
        return raw


def _recipe(raw: dict) -> dict:
    """A config without the keys a run may change when it resumes (:data:`~loraplex.config.RESUMABLE_KEYS`):
    threads, device, compile, workers, where it is written, and how many steps it trains."""
    recipe = {}
    for section, values in raw.items():
        free = RESUMABLE_KEYS.get(section, ())
        recipe[section] = {} if free == "*" else {k: v for k, v in values.items() if k not in free}
    return recipe


def train(config: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the training a config describes; returns the results dict."""
    dist = init_from_env(config.train.device)
    try:
        if config.train.threads:
            torch.set_num_threads(config.train.threads)
        say = announcer(progress, dist)
        run_dir = Path(config.output.dir)
        with run_lock(run_dir, dist):
            check_run_dir(config)
            say(f"loraplex: {config.method_name} on {', '.join(config.data.domains)} · backbone {config.backbone.name}"
                f" · {dist.device} {config.train.precision} · {run_dir}")  # fmt: skip
            torch.manual_seed(config.train.seed)  # adapter and head initialisation
            model = place(build_model(config), config, dist.device)
            p = api.count_parameters(model)
            say(f"model built: {p['trainable']:,} trainable parameters of {p['total']:,}; reading the data")
            if config.train.regime == "continual":
                return _train_continual(config, model, dist, progress, say)
            regime = build_regime(config, dist)
            if dist.is_main:  # the run directory's config is this invocation's (threads, device, steps may change)
                atomic_write(run_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(dump_config(config)))
            try:
                results = fit(
                    model,
                    regime,
                    config.train,
                    run_dir,
                    dist=dist,
                    tensorboard=config.output.tensorboard,
                    progress=progress,
                    regulariser=method_regulariser(config),
                )
            finally:
                regime.close()
            if results and isinstance(regime, MultiTaskRegime):  # rank 0: the best model's predictions, for the report
                _, best = load_run(run_dir, "best", dist.device)
                (run_dir / PREDICTIONS).write_bytes(regime.prediction_figure(best))
        return results
    finally:
        shutdown(dist)


def _train_continual(config: RunConfig, model: AdaptedModel, dist: Dist, progress: bool, say) -> dict[str, Any]:
    tasks = continual_tasks(config)
    splits = domain_splits(config)  # one source (a class split) or one per domain, in data.domains' order
    by_domain = {d: {part: splits[part][i] for part in PARTS} for i, d in enumerate(config.data.domains)}
    parts = [task_parts(task, by_domain[task.domain]) for task in tasks]
    hooks = get_method(config.method_name).continual(method_config(config))
    if dist.is_main:
        atomic_write(Path(config.output.dir) / CONFIG_FILE, lambda tmp: Path(tmp).write_text(dump_config(config)))
    return train_continual(config, model, tasks, parts, hooks, dist, _stream_settings(config, dist),
                           progress=progress, say=say, regulariser=method_regulariser(config))  # fmt: skip


def pretrain(config: RunConfig, *, progress: bool = True, overwrite: bool = False) -> Path | None:
    """Train a backbone (``method: full_finetune`` on pre-training sources, one head each) and write
    it to the zoo as ``output.zoo_name`` with its recipe and a training summary; None on ranks > 0.

    An existing zoo entry is replaced only with ``overwrite``: runs trained on it would then refuse to load
    (their fingerprint names the entry)."""
    name = config.output.zoo_name
    if not name:
        raise ConfigError("output.zoo_name must name the zoo entry that `loraplex pretrain` writes")
    if name in zoo_entries() and not overwrite:
        raise ConfigError(
            f"zoo entry {name!r} exists ({zoo_dir() / name}.json): set output.zoo_name to a new name, or pass "
            "--overwrite to replace it (runs trained on it will then refuse to load)"
        )
    if config.method_name != "full_finetune":
        raise ConfigError(f"pre-training trains the whole backbone: method.name must be full_finetune, not "
                          f"{config.method_name!r}")  # fmt: skip
    results = train(config, progress=progress)
    if not results:
        return None
    _, model = load_run(config.output.dir, "final")
    zoo = zoo_entries()
    start = zoo.get(config.backbone.name)  # continuing from a zoo entry keeps its architecture
    architecture = start["architecture"] if start else config.backbone.name
    kwargs = start["kwargs"] if start else dict(config.backbone.kwargs)
    log = [json.loads(line) for line in (Path(config.output.dir) / "metrics.jsonl").read_text().splitlines()]
    last_train = next(r for r in reversed(log) if r["split"] == "train")
    summary = {
        "steps": results["steps"],
        "images_seen": results["steps"] * config.train.batch_size,
        "train_seconds": round(results["train_seconds"], 1),
        "final_train": {k: v for k, v in last_train.items() if k not in ("step", "split")},
        "final_val": results["last"]["val"],
    }
    return write_zoo_entry(
        name, model.backbone, architecture, config.backbone.img_size, kwargs, {"recipe": config.to_dict(),
                                                                                "summary": summary}
    )  # fmt: skip


def read_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {CONFIG_FILE} is missing")
    try:
        return from_dict(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ConfigError) as err:
        raise ConfigError(f"{path} is corrupted or from an incompatible version: {err}") from err


def adapter_dir(run_dir: str | Path, config: RunConfig, which: str) -> Path:
    """Where a run's ``best`` / ``final`` adapters are; a continual run has one model, the one after its last
    learned task (or after joint training), whichever is asked."""
    run_dir = Path(run_dir)
    if config.train.regime != "continual":
        return run_dir / which
    if config.train.joint:
        return run_dir / "joint" / "final"
    state = run_dir / CONTINUAL_STATE
    done = json.loads(state.read_text())["done"] if state.is_file() else 0
    if not done:
        raise ConfigError(f"{run_dir} is a continual run that has not finished a task yet: nothing to load")
    return run_dir / f"task{done - 1}" / CONTINUAL_AFTER


def load_run(
    run_dir: str | Path, which: str = "best", device: str | torch.device = "auto"
) -> tuple[RunConfig, AdaptedModel]:
    """The model of a finished run with its ``best`` or ``final`` adapters (fingerprint-checked), on ``device``
    (``auto``: CUDA when present) with the frozen weights in the run's ``backbone.dtype``."""
    config = read_run_config(run_dir)
    torch.manual_seed(config.train.seed)  # a random-init backbone is rebuilt bit-identical
    model = api.load(adapter_dir(run_dir, config, which), build_backbone(config))
    target = resolve_device(device) if isinstance(device, str) else device
    return config, place(model, config, target).eval()


def evaluate_run(
    run_dir: str | Path, which: str = "best", split_name: str = "test", device: str = "auto"
) -> dict[str, float]:
    """A run's metrics on ``split_name``, on ``device`` and in the run's precision."""
    config, model = load_run(run_dir, which, device)
    if split_name == "val" and config.data.val_per_domain == 0:
        raise ConfigError(f"{run_dir} was trained without a validation split (data.val_per_domain: 0): evaluate test")
    if config.train.regime == "continual":
        return _evaluate_continual(Path(run_dir), config, model, split_name)
    regime = build_regime(config, Dist(device=model.device))
    with torch.inference_mode(), regime.placement.autocast():
        return regime.evaluate(model, split_name)


def _evaluate_continual(run_dir: Path, config: RunConfig, model: AdaptedModel, split_name: str) -> dict[str, float]:
    """The last row of a continual run's matrix on ``split_name``: each learned task scored in the run's setting,
    and their sample-weighted mean (``A_T`` on test)."""
    tasks = continual_tasks(config)
    splits = domain_splits(config)
    by_domain = {d: {part: splits[part][i] for part in PARTS} for i, d in enumerate(config.data.domains)}
    parts = [task_parts(task, by_domain[task.domain])[split_name] for task in tasks]
    learned = len(tasks) - 1 if config.train.joint else json.loads((run_dir / CONTINUAL_STATE).read_text())["done"] - 1
    return score_learned(config, model, parts, learned)
