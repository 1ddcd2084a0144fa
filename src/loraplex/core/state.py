"""Adapter files, backbone fingerprints, PEFT export and parameter accounting.

An adapter directory holds ``loraplex_config.json`` (method, its config, tasks, heads, backbone
fingerprints) and ``adapters.safetensors`` (branch factors, subspace bases that cannot be recomputed,
banks, heads and every module the method trains fully), with a sha256 of its tensors in the file's
metadata.  What is written is finite and checked on the way back in: a damaged or non-finite file is
refused, never loaded.  Nothing is ever unpickled.

Format versions: 1 keyed heads by task name and stored every basis; 2 keys heads by task position (task
names such as ``folder:./data`` are not module keys), adds the checksum, and leaves out bases rebuilt from
the frozen weights.  Version-1 files still load.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .conv import AdaptedConv2d
from .model import AdaptedModel
from .subspace import Subspace

CONFIG_FILE = "loraplex_config.json"
TENSORS_FILE = "adapters.safetensors"
FORMAT_VERSION = 2


class AdapterFileError(ValueError):
    """An adapter directory that is missing, corrupted, or made for another backbone."""


class NonFiniteError(ValueError):
    """Tensors about to be written hold NaN or infinite values (a diverged run): nothing is written."""


def _hash_tensor(digest, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def state_digest(state) -> str:
    """sha256 over a nested structure of tensors, numbers and strings (dicts in key order): what a file's
    integrity is checked against."""
    digest = hashlib.sha256()

    def walk(path: str, value) -> None:
        if isinstance(value, torch.Tensor):
            _hash_tensor(digest, path, value)
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(f"{path}/{key}", value[key])
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                walk(f"{path}/{i}", item)
        else:
            digest.update(f"{path}={value!r};".encode())

    walk("", state)
    return digest.hexdigest()


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


FINGERPRINT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The precisions a frozen backbone may be held in: an adapter records the backbone's fingerprint in each."""


def fingerprint(backbone: nn.Module, dtype: torch.dtype | None = None) -> str:
    """sha256 over the names, shapes, dtypes and values of a pristine backbone's state, every floating tensor
    first cast to ``dtype`` (None: as they are)."""
    return _fingerprints(backbone, [dtype])[0]


def _fingerprints(backbone: nn.Module, dtypes: list[torch.dtype | None]) -> list[str]:
    """One digest per dtype in one pass over the state (a tensor is moved to the CPU once)."""
    digests = [hashlib.sha256() for _ in dtypes]
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu()
        for digest, dtype in zip(digests, dtypes, strict=True):
            _hash_tensor(digest, name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    return [d.hexdigest() for d in digests]


def storage_dtype(backbone: nn.Module) -> str:
    """The precision a backbone's weights are held in: its lowest floating dtype (fp64 counts as fp32, since an
    fp32 value survives the round trip).  A backbone mixing bf16 and fp16 has no such precision."""
    found = {t.dtype for t in backbone.state_dict().values() if t.is_floating_point()}
    low = found & {torch.bfloat16, torch.float16}
    if len(low) > 1:
        raise AdapterFileError("the backbone mixes bfloat16 and float16 weights: hold its frozen weights in one dtype")
    return str(low.pop()).removeprefix("torch.") if low else "float32"


def backbone_description(backbone: nn.Module) -> dict:
    """Class, timm architecture and fingerprints of the pristine backbone: ``fingerprint`` (its weights in
    fp32, the key files of every version hold) and ``fingerprints`` (in each of :data:`FINGERPRINT_DTYPES`), so
    that the same weights held in bf16 or fp16 load the adapter and other weights do not."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    digests = dict(zip(FINGERPRINT_DTYPES, _fingerprints(backbone, list(FINGERPRINT_DTYPES.values())), strict=True))
    return {
        "class": type(backbone).__name__,
        "architecture": cfg.get("architecture", ""),
        "fingerprint": digests["float32"],
        "fingerprints": digests,
    }


def check_backbone(saved: dict, backbone: nn.Module, where: str) -> None:
    """Refuse a backbone other than the one ``saved`` describes (another architecture or other weights); the
    same weights held in bf16 / fp16 are compared with the saved backbone cast to that precision."""
    dtype = storage_dtype(backbone)
    expected = saved.get("fingerprints", {}).get(dtype) or (saved.get("fingerprint") if dtype == "float32" else None)
    if expected is None:
        raise AdapterFileError(
            f"{where} was saved before adapters recorded {dtype} fingerprints: load it on the backbone in float32"
        )
    given = fingerprint(backbone, FINGERPRINT_DTYPES[dtype])
    if given != expected:
        cfg = getattr(backbone, "pretrained_cfg", None) or {}
        architecture = cfg.get("architecture") or type(backbone).__name__
        trained_on = saved.get("source") or saved.get("architecture") or saved.get("class")
        raise AdapterFileError(
            f"{where} was trained on backbone {trained_on} (fingerprint {str(expected)[:12]}…), but the given "
            f"backbone is {architecture} held in {dtype} (fingerprint {given[:12]}…): load it on the exact "
            "backbone (architecture and weights) it was trained on"
            + (" — has that file changed since?" if saved.get("source") else "")
        )


def trained_backbone_state(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """State of the backbone modules a method trains fully (``modules_to_save``), by backbone name."""
    saved = model.saved_modules
    return {
        k: v
        for k, v in model.backbone.state_dict().items()
        if ".groups." not in k and any(k == m or k.startswith(m + ".") for m in saved)
    }


def rebuilt_bases(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """The subspace bases recomputed from the frozen weights whenever the model is built (not stored)."""
    return {f"{name}.basis": m.basis for name, m in model.named_modules() if isinstance(m, Subspace) and m.rebuilt}


def adapter_state(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file must carry: branch groups, banks, heads, trained backbone modules —
    on the CPU, and without the bases the frozen weights determine."""
    rebuilt = rebuilt_bases(model)
    state = {
        k: v
        for k, v in model.state_dict().items()
        if (".groups." in k or k.startswith(("heads.", "banks.", "router."))) and k not in rebuilt
    }
    state.update({f"backbone.{k}": v for k, v in trained_backbone_state(model).items()})
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _fit_memory_bases(model: AdaptedModel, tensors: dict[str, torch.Tensor]) -> None:
    """Give each input-side basis a feature memory fills (projection form, not rebuilt from W) the width it has in
    ``tensors``: a memory grows task after task, so a file written after task t holds wider bases than a model
    just built (the span they project on is what is kept, not a parameter shape)."""
    for name, module in model.named_modules():
        saved = tensors.get(f"{name}.basis")
        if not isinstance(module, Subspace) or module.form != "projection" or module.rebuilt or saved is None:
            continue
        if saved.shape != module.basis.shape and saved.shape[-2:-1] == module.basis.shape[-2:-1]:
            module.set_basis(saved)


def load_adapter_state(model: AdaptedModel, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load ``tensors`` (an adapter file's, or a checkpoint's) into ``model``: exactly the expected keys, the
    expected shapes, finite values — anything else is an :class:`AdapterFileError` naming ``where``."""
    _fit_memory_bases(model, tensors)
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(f"{where} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise AdapterFileError(
                f"{where}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}"
            )
    bad = non_finite(tensors)
    if bad:
        raise AdapterFileError(f"{where} holds NaN or infinite values in {bad[:3]}: refusing to load it")
    model.load_state_dict(tensors, strict=False)


class DiskFullError(OSError):
    """The disk filled up while a file was written; the previous version of the file is kept."""


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one.  Temporaries are named
    ``.<name>.<random>``, which :func:`orphaned_temporaries` finds after a kill."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise DiskFullError(
                err.errno, f"the disk is full: {path} was not written, its previous version is kept"
            ) from err
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def orphaned_temporaries(directory: Path, names: tuple[str, ...]) -> list[Path]:
    """Temporary files :func:`atomic_write` left behind for ``names`` in ``directory`` and its subdirectories
    (a process killed mid-write never renames or removes them)."""
    return [p for name in names for pattern in (f".{name}.*", f"*/.{name}.*") for p in directory.glob(pattern)]


def save(model: AdaptedModel, directory: str | os.PathLike) -> Path:
    """Write the adapter directory atomically (each file replaced whole)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "format": "loraplex-adapter",
        "version": FORMAT_VERSION,
        "method": model.method_name,
        "config": model.method_config,
        "tasks": model.tasks,
        "heads": model.head_outputs,
        "head": model.head_spec,
        "backbone": model.backbone_info,
        "mixed_strategy": model.mixed_strategy,
    }
    tensors = adapter_state(model)
    bad = non_finite(tensors)
    if bad:
        raise NonFiniteError(f"refusing to write {out}: {bad[:3]} hold NaN or infinite values")
    config["rebuilt"] = {k: list(v.shape) for k, v in rebuilt_bases(model).items()}  # checked when rebuilt
    metadata = {"format": "loraplex", "sha256": state_digest(tensors)}
    atomic_write(out / TENSORS_FILE, lambda p: save_file(tensors, p, metadata=metadata))
    atomic_write(out / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return out


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{directory} is not a loraplex adapter directory: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is corrupted (not valid JSON: {err})") from err
    if not isinstance(config, dict) or config.get("format") != "loraplex-adapter":
        raise AdapterFileError(f"{path} is not a loraplex adapter config")
    if config.get("version", 0) > FORMAT_VERSION:
        raise AdapterFileError(f"{path} has format version {config['version']}; this loraplex reads ≤ {FORMAT_VERSION}")
    return config


def load_tensors(model: AdaptedModel, directory: str | os.PathLike) -> None:
    """Load an adapter file into a freshly wrapped model: its checksum, keys, shapes and values are checked,
    and the bases rebuilt from the frozen weights must have the shapes the file was trained with."""
    config = read_config(directory)
    path = Path(directory) / TENSORS_FILE
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing")
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 — safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is corrupted or truncated: {err}") from err
    if config.get("version", 1) < 2:
        tensors = from_version_1(model, tensors)
    elif metadata.get("sha256") != state_digest(tensors):
        raise AdapterFileError(f"{path} is damaged: its tensors do not match the checksum written with them")
    for key, shape in config.get("rebuilt", {}).items():
        rebuilt = rebuilt_bases(model).get(key)
        if rebuilt is None or list(rebuilt.shape) != shape:
            found = None if rebuilt is None else list(rebuilt.shape)
            raise AdapterFileError(
                f"{path}: the subspace basis {key} rebuilt from the frozen weights has shape {found}, the adapter "
                f"was trained with {shape}; the truncation k decided differently here — set method.k explicitly"
            )
    load_adapter_state(model, tensors, str(path))


def from_version_1(model: AdaptedModel, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors written by version 1 (adapter files, checkpoints) in today's keys: heads by position instead of
    name, rebuilt bases dropped."""
    index = {name: i for i, name in enumerate(model.tasks)}
    rebuilt = rebuilt_bases(model)
    out = {}
    for key, value in tensors.items():
        if key.startswith("heads."):
            name, rest = _split_head_key(key.removeprefix("heads."), index)
            key = f"heads.{index[name]}.{rest}" if name is not None else key
        if key not in rebuilt:
            out[key] = value
    return out


def _split_head_key(key: str, index: dict[str, int]) -> tuple[str | None, str]:
    """``<task name>.<parameter path>`` → (task, path); task names may hold dots, so match the longest name."""
    for name in sorted(index, key=len, reverse=True):
        if key.startswith(name + "."):
            return name, key[len(name) + 1 :]
    return None, key


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``adapter`` (trainable branch and bank parameters), ``router`` (a gating network and what its loss
    trains, e.g. MoLA's TwD projection), ``head``, ``trainable``, ``frozen``, ``total``."""
    counts = dict.fromkeys(("adapter", "router", "head", "trainable", "frozen", "total"), 0)
    for name, p in model.named_parameters():
        n = p.numel()
        counts["total"] += n
        counts["trainable" if p.requires_grad else "frozen"] += n
        if p.requires_grad and (".groups." in name or name.startswith("banks.")):
            counts["adapter"] += n
        if name.startswith("heads."):
            counts["head"] += n
        if name.startswith("router."):
            counts["router"] += n
    return counts


def _classifier_name(backbone: nn.Module) -> str:
    """Where the timm model keeps its classifier (``head``, ``head.fc``, ``fc``): its ``get_classifier()`` module
    (an identity once reset), else its pretrained config's name."""
    if hasattr(backbone, "get_classifier"):
        found = backbone.get_classifier()
        name = next((n for n, m in backbone.named_modules() if m is found and n), None)
        if name is not None:
            return name
    return (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier", "head")


def _peft_conv_factors(layer: AdaptedConv2d, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One conv branch in PEFT's conv LoRA (``lora_A``: a k×k conv to ``R'`` channels, ``lora_B``: 1×1), exactly.

    Our ``ΔW`` is ``B A`` (``[C_out·k, C_in·k]``, loralib's format) viewed as ``[C_out, C_in, k, k]``; row
    ``o·k + j`` of ``B A`` fills column block ``j`` of output channel ``o``.  So with ``A'`` block-diagonal
    (``k`` copies of ``A``) and ``B'[o, j·R + i] = B[o·k + j, i]``, ``B' A'`` is that same ``ΔW`` at rank
    ``R' = k·R``."""
    base = layer.base
    if base.groups != 1:
        raise ValueError(f"{layer.name}: PEFT's conv LoRA has no grouped convolutions (groups={base.groups})")
    k, rank = base.kernel_size[0], a.shape[0]
    a_full = torch.block_diag(*[a] * k).reshape(k * rank, *base.weight.shape[1:])
    b_full = b.reshape(base.out_channels, k * rank)
    return a_full, b_full.reshape(*b_full.shape, 1, 1)


def export_peft(
    model: AdaptedModel, directory: str | os.PathLike, task: str | int | None = None, include_head: bool = False
) -> Path:
    """Write shared + ``task`` deltas as one plain PEFT LoRA (rank = sum of the branch ranks).

    Each layer's branches (every branch of an ``always`` group, the task's of a ``task`` group) are
    concatenated along the rank: ``A = [A_1; A_2; …]``, ``B = [s_1 B_1, s_2 B_2, …]`` with
    ``lora_alpha = r`` (PEFT scaling 1), so ``B A = Σ s_i B_i A_i`` exactly; bank-built,
    subspace-constrained and row-sliced (q / k / v) branches export through their effective factors
    (a row-sliced one: a LoRA on the whole layer whose ``B`` is zero outside its rows).  ``include_head``
    writes the task head as the backbone's classifier (``modules_to_save``): load it on the same timm
    model created with that head's class count.
    """
    if model.streams:
        raise ValueError(
            "a model with task streams (MTLoRA's dense blocks) is not one LoRA per task: a task path's frozen "
            "matmul reads the shared input; save it with model.save instead"
        )
    t = None if task is None else model.task_index(task)
    layers = model.adapted_layers()
    inside = [m for m in model.saved_modules for name in layers if name == m or name.startswith(m + ".")]
    if inside:
        raise ValueError(
            f"the method trains backbone modules that hold adapted layers ({sorted(set(inside))[:3]}): a PEFT LoRA "
            "keeps its base layers frozen; save it with model.save instead"
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in layers.items():
        a_parts, b_parts = [], []
        for key, group in layer.groups.items():
            if group.routing == "soft":
                raise ValueError(
                    f"{name}: group {key!r} is routed by input-dependent gates; a PEFT LoRA cannot express it"
                )
            if group.routing == "task" and t is None:
                continue
            if group.routing == "always":  # every branch fires
                a_branch, b_branch, scale = group.concatenated()
            else:
                a, b = group.factors()
                a_branch, b_branch, scale = a[t], b[t], group.scale[t]
            b_branch = scale * b_branch
            if isinstance(layer, AdaptedConv2d):
                a_branch, b_branch = _peft_conv_factors(layer, a_branch, b_branch)
            a_parts.append(a_branch)
            b_parts.append(b_branch)
        if not a_parts:
            continue
        a_cat = torch.cat(a_parts).detach().cpu().contiguous()
        b_cat = torch.cat(b_parts, dim=1).detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_cat
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_cat
        ranks[name] = int(a_cat.shape[0])
    if not ranks:
        raise ValueError("this model has no LoRA branches to export")
    saved = list(model.saved_modules)
    for key, value in trained_backbone_state(model).items():
        tensors[f"base_model.model.{key}"] = value.detach().cpu().contiguous()
    if include_head:
        if t is None:
            raise ValueError("include_head needs a task")
        classifier = _classifier_name(model.backbone)
        head = model.heads[t]
        tensors[f"base_model.model.{classifier}.weight"] = head.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{classifier}.bias"] = head.bias.detach().cpu().contiguous()
        saved.append(classifier)
    default_rank = max(ranks.values())
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": default_rank,
        "lora_alpha": default_rank,
        "target_modules": sorted(ranks),
        "rank_pattern": {n: r for n, r in ranks.items() if r != default_rank},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != default_rank},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": saved or None,
        "inference_mode": True,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "adapter_model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(config, indent=2)))
    return out
