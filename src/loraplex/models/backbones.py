"""Backbones by name: the offline zoo, any timm architecture, or a local timm checkpoint file.

Nothing here downloads unless the config says ``pretrained: true``; offline, that request fails with
a message pointing at the zoo and at ``backbone.checkpoint``.  Checkpoints are read with safetensors
or ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import BackboneSection, ConfigError


def package_data_dir(name: str) -> Path:
    """A data directory the package ships (``zoo``, ``configs``): ``loraplex/<name>/`` of an installed wheel,
    found with :mod:`importlib.resources`; in a source checkout (an editable install, or ``src`` on the path)
    the repository's top-level ``<name>/`` beside ``src/``.

    The wheel maps ``loraplex.<name>`` onto the top-level directory (``package-dir`` in pyproject.toml).  An
    editable install cannot import that mapping (setuptools' editable finder imports only mapped directories
    holding an ``__init__.py``; its compat mode knows no mappings), hence the checkout's own directory."""
    package = resources.files("loraplex")
    packaged = package / name
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(str(package)).resolve().parent.parent / name


def zoo_dir() -> Path:
    """``$LORAPLEX_ZOO`` (a user's own collection), else the zoo shipped with the package (the committed ``zoo/``)."""
    return Path(os.environ.get("LORAPLEX_ZOO") or package_data_dir("zoo"))


class BackboneError(ValueError):
    """A backbone that cannot be built: unknown name, unreadable or mismatched checkpoint, no network."""


def zoo_entries() -> dict[str, dict]:
    """``{name: recipe}`` for every committed zoo backbone (``zoo/<name>.json`` beside its weights)."""
    directory = zoo_dir()
    if not directory.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def write_zoo_entry(
    name: str, backbone: nn.Module, architecture: str, img_size: int, kwargs: dict, extra: dict
) -> Path:
    """Commit-ready zoo entry: ``<name>.safetensors`` (features-only weights) and ``<name>.json`` with the
    architecture, its input size and timm kwargs, the file's sha256 and ``extra`` (recipe, training log)."""
    directory = zoo_dir()
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    tensors = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", "architecture": architecture})
    os.replace(tmp, weights)
    entry = {"architecture": architecture, "img_size": img_size, "kwargs": kwargs, "file": weights.name}
    entry["sha256"] = sha256_of(weights)
    recipe = directory / f"{name}.json"
    recipe.with_suffix(".tmp").write_text(json.dumps(entry | extra, indent=2) + "\n")
    os.replace(recipe.with_suffix(".tmp"), recipe)
    return recipe


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a weights-only PyTorch file (a ``state_dict``/``model`` entry)."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"backbone checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, ValueError) as err:
        raise BackboneError(f"backbone checkpoint {path} is corrupted or not a tensor file: {err}") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"backbone checkpoint {path} holds no state dict of tensors")
    return state


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load backbone weights, ignoring classifier keys; any other mismatch is an error naming keys."""
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(classifier + ".")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise BackboneError(
            f"{where} is a checkpoint for another backbone than {type(model).__name__}: "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}"
        )
    model.load_state_dict(state, strict=False)


def describe_backbone(section: BackboneSection) -> str:
    """Where a config's backbone weights come from, as errors about that backbone name it."""
    if section.name in zoo_entries():
        return f"zoo entry {section.name!r} ({zoo_dir() / section.name}.safetensors)"
    if section.checkpoint:
        return f"{section.name} from checkpoint {section.checkpoint}"
    return f"{section.name} ({'timm pre-trained weights' if section.pretrained else 'random init'})"


def create_backbone(section: BackboneSection, *, load: bool = True) -> nn.Module:
    """Build the backbone a config names, features-only (``num_classes=0``), in eval mode.

    ``load=False`` builds the architecture without reading or downloading weights (parameter
    accounting needs only shapes)."""
    zoo = zoo_entries()
    kwargs = dict(section.kwargs)
    if section.name in zoo:
        recipe = zoo[section.name]
        # built at the run's input size: Swin's weights do not depend on it (windows do), a ViT's pos_embed does
        model = _create(recipe["architecture"], False, section.img_size, recipe["kwargs"])
        if load:
            weights = zoo_dir() / recipe["file"]
            if not weights.is_file():
                raise BackboneError(f"zoo entry {section.name!r} lists {weights}, which is missing")
            if sha256_of(weights) != recipe["sha256"]:
                raise BackboneError(f"zoo file {weights} does not match its recorded sha256: re-checkout it")
            try:
                load_weights(model, load_file(weights), str(weights))
            except BackboneError as err:
                if section.img_size == recipe["img_size"]:
                    raise
                raise BackboneError(
                    f"zoo entry {section.name!r} was trained at {recipe['img_size']} px and its weights do not fit "
                    f"backbone.img_size={section.img_size}: {err}"
                ) from err
        return model.eval()
    if not timm.is_model(section.name):  # an architecture, or one with a pretrained tag (vit_….augreg_in21k)
        raise ConfigError(
            f"backbone.name {section.name!r} is neither a zoo backbone ({sorted(zoo) or 'none committed'}) "
            "nor a timm architecture"
        )
    if section.pretrained and load:
        try:
            model = _create(section.name, True, section.img_size, kwargs)
        except Exception as err:  # timm raises many kinds when the hub is unreachable
            raise BackboneError(
                f"could not fetch pre-trained weights for {section.name} ({type(err).__name__}: {err}). "
                "Offline, use a zoo backbone or point backbone.checkpoint at a local timm checkpoint file."
            ) from err
        return model.eval()
    model = _create(section.name, False, section.img_size, kwargs)
    if section.checkpoint and load:
        load_weights(model, read_checkpoint(section.checkpoint), section.checkpoint)
    return model.eval()


def _create(name: str, pretrained: bool, img_size: int, kwargs: dict) -> nn.Module:
    """timm model with ``img_size`` where the architecture takes one (ViT, Swin; not CNNs)."""
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **{"img_size": img_size, **kwargs})
    except TypeError as err:
        if "img_size" not in str(err) or "img_size" in kwargs:
            raise
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
