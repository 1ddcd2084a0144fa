"""PASCAL-Context multi-task (MTLoRA / MTI-Net / ATRC, the ``PASCAL_MT`` archive), read from disk.

Layout (``root`` is the unpacked ``PASCAL_MT`` directory):

* ``JPEGImages/<id>.jpg`` — the images;
* ``semseg/pascal-context/<id>.png`` — 21 classes (VOC's 20 + background 0), 255 = ignore.  Like the
  reference loader, ``semseg/VOC12/<id>.png`` is preferred when it exists;
* ``human_parts/<id>.mat`` — PASCAL-Part annotations: ``anno`` is a 1×1 struct ``(imname, objects)``,
  ``objects`` a 1×K struct array ``(class, class_ind, mask, parts)``, ``parts`` a 1×P struct array
  ``(part_name, mask)`` (empty when the object has no parts).  Only persons (``class_ind`` 15) count;
* ``sal_distill/<id>.png`` — grey saliency, ``value / 255 > 0.5`` is salient;
* ``normals_distill/<id>.png`` — RGB normals, ``value / 255 · 2 − 1`` per channel;
* ``ImageSets/Context/{train,val}.txt`` — one id a line (4,998 train / 5,105 val in the paper).

Human parts, 7 classes, following ``HUMAN_PART[6]`` of the ASTMT loader as kept in MTI-Net
(SimonVandenhende/Multi-Task-Learning-PyTorch ``data/pascal_context.py``) and MTLoRA
(scale-lab/MTLoRA ``data/mtl_ds.py``): 0 background; 1 head = head, hair, ears, eyes, eyebrows, nose,
mouth; 2 torso = torso **and neck**; 3 upper arms; 4 lower arms and hands; 5 upper legs; 6 lower legs and
feet.  Parts are painted object by object, part by part, a later part winning where two overlap.  An image
whose annotation paints no part pixel (no ``.mat``, no person, persons without parts) is 255 everywhere,
as the reference's ``AddIgnoreRegions`` does; a pixel of an annotated image outside every part is 0.

Every map is resized to a square ``size × size`` (aspect ratio not kept), as MTLoRA's ``FixedResize`` does
to 448×448 for training and evaluation (MTI-Net instead crops / pads to 512×512): the image bilinear with
antialiasing, label maps nearest (values stay in their sets), normals bilinear and then re-normalised.
Normals are invalid where the PNG pixel is (0, 0, 0); invalid pixels (decided by a nearest resize of the
validity mask) are the zero vector.  The reference instead keeps normals only on PASCAL-Context classes
that NYUv2 also has, read from ``pascal-context/trainval/<id>.mat``; this loader does not read those.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .sources import SourceMissingError
from .stream import DomainData

PASCAL_NAME = "pascal_context"
PASCAL_TASKS = ("semseg", "parts", "saliency", "normals")
SEMSEG_CLASSES = 21
PARTS_CLASSES = 7
IGNORE = 255
PERSON_CLASS = 15  # ``class_ind`` of person in PASCAL-Part (VOC order)
TARGET_CHANNELS = {"semseg": slice(0, 1), "parts": slice(1, 2), "saliency": slice(2, 3), "normals": slice(3, 6)}
TARGET_FILL = {"semseg": float(IGNORE), "parts": float(IGNORE), "saliency": float(IGNORE), "normals": 0.0}
PASCAL_HOW = (
    "Download PASCAL_MT.tgz (the PASCAL-Context multi-task archive linked from the MTI-Net and ATRC repositories, "
    "e.g. https://data.vision.ee.ethz.ch/kmaninis/share/MTL/PASCAL_MT.tgz), unpack it and pass the PASCAL_MT "
    "directory as root."
)

PART_NAMES = ("background", "head", "torso", "upper arms", "lower arms", "upper legs", "lower legs")
PART_IDS: dict[str, int] = {
    **dict.fromkeys(("head", "hair", "lear", "rear", "leye", "reye", "lebrow", "rebrow", "nose", "mouth"), 1),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}
"""PASCAL-Part person part name → one of the 6 part classes (ASTMT / MTI-Net ``HUMAN_PART[6]``)."""

# Positions of the struct fields, as the reference indexes them (names given in the module docstring).
_OBJECTS, _CLASS_IND, _PARTS, _PART_NAME, _PART_MASK = 1, 1, 3, 0, 1
_FOLDERS = {
    "parts": "human_parts",
    "saliency": "sal_distill",
    "normals": "normals_distill",
}


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceMissingError(f"PASCAL-Context {what} not found: {path} is missing. {PASCAL_HOW}")
    return path


def pascal_ids(root: str | Path, split: str) -> list[str]:
    """Image ids of ``split`` (train or val) in file order, from ``ImageSets/Context/<split>.txt``."""
    if split not in ("train", "val"):
        raise ValueError(f"PASCAL-Context splits are 'train' and 'val', not {split!r}")
    listing = _require(Path(root).expanduser() / "ImageSets" / "Context" / f"{split}.txt", f"{split} split")
    return [line.strip() for line in listing.read_text().splitlines() if line.strip()]


def _semseg_file(root: Path, image_id: str) -> Path:
    voc = root / "semseg" / "VOC12" / f"{image_id}.png"
    return voc if voc.is_file() else root / "semseg" / "pascal-context" / f"{image_id}.png"


def _read_label_png(path: Path) -> np.ndarray:
    """Class ids of a palette or grey PNG (palette indices are the ids; never convert them to grey)."""
    from PIL import Image

    with Image.open(_require(path, "label map")) as image:
        labels = np.asarray(image)
    if labels.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label PNG, got shape {labels.shape}")
    return labels.astype(np.uint8)


def _read_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Person part ids ``[H, W]`` (uint8) of one PASCAL-Part ``.mat``; 255 everywhere if it paints no part."""
    from scipy.io import loadmat

    target: np.ndarray | None = None
    if path.is_file():
        anno = loadmat(str(path))["anno"]
        for obj in np.asarray(anno[0, 0][_OBJECTS]).ravel():
            parts = np.asarray(obj[_PARTS])
            if int(np.asarray(obj[_CLASS_IND]).ravel()[0]) != PERSON_CLASS or parts.size == 0:
                continue
            for part in parts.ravel():
                name = str(np.asarray(part[_PART_NAME]).ravel()[0])
                if name not in PART_IDS:
                    raise ValueError(f"{path}: unknown person part {name!r}; known: {sorted(PART_IDS)}")
                mask = np.asarray(part[_PART_MASK]).astype(bool)
                if target is None:
                    target = np.zeros(mask.shape, dtype=np.uint8)
                target[mask] = PART_IDS[name]
    if target is None or not target.any():
        return np.full(shape, IGNORE, dtype=np.uint8)
    return target


def _read_saliency(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(_require(path, "saliency map")) as image:
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    return (grey / 255.0 > 0.5).astype(np.uint8)


def _read_normals(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Decoded normals ``[H, W, 3]`` (zero where invalid) and the validity mask ``[H, W]``."""
    from PIL import Image

    with Image.open(_require(path, "normal map")) as image:
        rgb = np.asarray(image.convert("RGB"))
    valid = rgb.any(axis=-1)
    normals = rgb.astype(np.float32) / 255.0 * 2.0 - 1.0
    normals[~valid] = 0.0
    return normals, valid


def _nearest(labels: np.ndarray, size: int) -> torch.Tensor:
    grid = torch.from_numpy(np.array(labels, dtype=np.float32))[None, None]  # a copy: PIL arrays are read-only
    if grid.shape[-2:] != (size, size):
        grid = F.interpolate(grid, size=(size, size), mode="nearest-exact")
    return grid[0, 0]


def _bilinear(channels_last: np.ndarray, size: int) -> torch.Tensor:
    """``[H, W, C]`` → ``[C, size, size]`` float, bilinear with antialiasing."""
    grid = torch.from_numpy(np.array(channels_last, dtype=np.float32)).permute(2, 0, 1)[None]
    if grid.shape[-2:] != (size, size):
        grid = F.interpolate(grid, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return grid[0]


def _check_layout(root: Path, ids: Sequence[str], tasks: Sequence[str]) -> None:
    """Every file a run will read exists, so a missing one fails now, not hours into training."""
    unknown = set(tasks) - set(PASCAL_TASKS)
    if unknown:
        raise ValueError(f"PASCAL-Context has no task {sorted(unknown)}; it has {list(PASCAL_TASKS)}")
    _require(root / "JPEGImages", "image folder")
    if "semseg" in tasks and not (root / "semseg" / "VOC12").is_dir():
        _require(root / "semseg" / "pascal-context", "semantic segmentation folder")
    for task, folder in _FOLDERS.items():
        if task in tasks:
            _require(root / folder, f"{task} folder")
    for image_id in ids:  # parts are optional per image (no .mat: ignored), the other maps are not
        _require(root / "JPEGImages" / f"{image_id}.jpg", "image")
        if "semseg" in tasks:
            _require(_semseg_file(root, image_id), "label map")
        if "saliency" in tasks:
            _require(root / "sal_distill" / f"{image_id}.png", "saliency map")
        if "normals" in tasks:
            _require(root / "normals_distill" / f"{image_id}.png", "normal map")


class PascalDomain(DomainData):
    """PASCAL-Context images of one split as a dense domain, decoded and resized on demand: held in memory at
    448 px the train and val splits would take ~36 GB (packed float16 targets are 12 bytes a pixel).

    ``take`` gives uint8 images ``[n, size, size, 3]``, ``take_labels`` packed float16 targets
    ``[n, 6, size, size]`` (see :data:`TARGET_CHANNELS`); tasks not asked for are left at 255 / 0, so their
    folders need not exist.
    """

    on_demand = True

    def __init__(self, root: str | Path, ids: Sequence[str], size: int, tasks: Sequence[str] = PASCAL_TASKS) -> None:
        root = Path(root).expanduser()
        _check_layout(root, ids, tasks)
        super().__init__(PASCAL_NAME, torch.empty(0, dtype=torch.uint8), torch.empty(0), 0)
        self.root, self.ids, self.size, self.tasks = root, list(ids), size, tuple(tasks)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.size, self.size, 3)

    def take(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        from PIL import Image

        out = torch.empty(len(rows), self.size, self.size, 3, dtype=torch.uint8)
        for n, row in enumerate(rows.tolist()):
            with Image.open(self.root / "JPEGImages" / f"{self.ids[row]}.jpg") as image:
                rgb = np.asarray(image.convert("RGB"))
            out[n] = _bilinear(rgb, self.size).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
        return out

    def take_labels(self, rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(rows), 6, self.size, self.size, dtype=torch.float16)
        for task, channels in TARGET_CHANNELS.items():
            out[:, channels] = TARGET_FILL[task]
        for n, row in enumerate(rows.tolist()):
            self._targets(self.ids[row], out[n])
        return out

    def _targets(self, image_id: str, out: torch.Tensor) -> None:
        root, size = self.root, self.size
        if "semseg" in self.tasks:
            out[0] = _nearest(_read_label_png(_semseg_file(root, image_id)), size)
        if "parts" in self.tasks:
            from PIL import Image

            with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as image:
                shape = (image.height, image.width)
            out[1] = _nearest(_read_parts(root / "human_parts" / f"{image_id}.mat", shape), size)
        if "saliency" in self.tasks:
            out[2] = _nearest(_read_saliency(root / "sal_distill" / f"{image_id}.png"), size)
        if "normals" in self.tasks:
            normals, valid = _read_normals(root / "normals_distill" / f"{image_id}.png")
            vectors = _bilinear(normals, size)
            norm = vectors.norm(dim=0, keepdim=True)
            keep = (_nearest(valid, size) > 0) & (norm[0] > 1e-6)
            out[3:6] = torch.where(keep, vectors / norm.clamp_min(1e-6), torch.zeros(()))

    def resized(self, size: int, channels: int | None = None) -> PascalDomain:
        if channels not in (None, 3):
            raise ValueError("PASCAL-Context images are RGB")
        return PascalDomain(self.root, self.ids, size, self.tasks)


def pascal_domain(
    root: str | Path, split: str, size: int, tasks: Sequence[str] = PASCAL_TASKS, limit: int | None = None
) -> PascalDomain:
    """The first ``limit`` (default all) images of ``split`` (train or val), in split-file order."""
    return PascalDomain(root, pascal_ids(root, split)[:limit], size, tasks)


def pascal_target(packed: torch.Tensor, task: str) -> torch.Tensor:
    """One task's target from packed targets ``[B, 6, H, W]``: semseg / parts long ``[B, H, W]`` and saliency
    float ``[B, H, W]`` (255 marks ignored pixels in all three), normals float ``[B, 3, H, W]``."""
    if task not in TARGET_CHANNELS:
        raise ValueError(f"PASCAL-Context has no {task!r} target; it has {list(PASCAL_TASKS)}")
    channels = packed[:, TARGET_CHANNELS[task]]
    if task in ("semseg", "parts"):
        return channels[:, 0].long()
    if task == "saliency":
        return channels[:, 0].float()
    return channels.float()
