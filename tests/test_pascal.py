"""PASCAL-Context multi-task loader: a tiny copy of the PASCAL_MT layout (JPEGs, label PNGs, PASCAL-Part
``.mat`` structs written with scipy) read back — part mapping, ignore rules, saliency threshold, normal
decoding, nearest label resizing, splits, ``limit`` and the missing-data errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

from loraplex import cli
from loraplex.data.pascal import (
    IGNORE,
    PART_IDS,
    PARTS_CLASSES,
    PASCAL_TASKS,
    TARGET_CHANNELS,
    PascalDomain,
    pascal_domain,
    pascal_ids,
    pascal_target,
)
from loraplex.data.sources import SourceMissingError

from .tiny import tiny_config


def load(root: Path, split: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image and packed target of a split, read through the lazy domain."""
    domain = pascal_domain(root, split, **kwargs)
    rows = torch.arange(len(domain))
    return domain.take(rows), domain.take_labels(rows)


H, W = 20, 24  # source maps: a 4 × 4 grid of 5 × 6 blocks; at size 20 each block becomes an exact 5 × 5 block
TRAIN = ["2008_000001", "2008_000002", "2008_000003"]
VAL = ["2008_000004", "2008_000005"]

SEMSEG = np.array([[0, 15, 15, IGNORE], [0, 15, 12, 12], [3, 3, 0, 0], [IGNORE, 0, 0, 20]])
PERSON_PARTS = {  # block (row, col) → PASCAL-Part name, on the first person
    (0, 0): "hair",
    (0, 1): "neck",
    (0, 2): "luarm",
    (0, 3): "rhand",
    (1, 0): "rlarm",
    (1, 1): "ruleg",
    (1, 2): "lfoot",
    (1, 3): "llleg",
    (2, 0): "torso",
    (2, 1): "reye",
}
EXPECTED_PARTS = np.array([[1, 2, 3, 4], [4, 5, 6, 6], [2, 1, 0, 0], [1, 0, 0, 0]])  # second person's head at (3, 0)
SALIENCY_GREY = [0, 127, 128, 255]  # per block column; > 0.5 · 255 is salient
EXPECTED_SALIENCY = [0, 0, 1, 1]
NORMAL_RGB = [(0, 0, 0), (255, 128, 128), (128, 128, 255), (64, 191, 200)]  # per block column; black is invalid


def blocks(grid: np.ndarray) -> np.ndarray:
    """A 4 × 4 grid of values as a source map [H, W] (5 × 6 pixel blocks)."""
    return np.kron(np.asarray(grid), np.ones((H // 4, W // 4), dtype=np.int64))


def block_mask(row: int, col: int) -> np.ndarray:
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[row, col] = 1
    return blocks(mask).astype(np.uint8)


def struct(fields: tuple[str, ...], rows: list[tuple]) -> np.ndarray:
    """A 1 × K MATLAB struct array, as savemat writes it and loadmat reads it back."""
    array = np.empty((1, len(rows)), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        for field, value in zip(fields, row, strict=True):
            array[field][0, k] = value
    return array


def person_object(class_ind: int, parts: dict[tuple[int, int], str]) -> tuple:
    part_rows = [(np.array([name]), block_mask(*at)) for at, name in parts.items()]
    union = np.clip(sum((m for _, m in part_rows), np.zeros((H, W), np.uint8)), 0, 1).astype(np.uint8)
    parts_field = struct(("part_name", "mask"), part_rows) if part_rows else np.zeros((0, 0))
    return (np.array(["person" if class_ind == 15 else "other"]), np.array([[class_ind]]), union, parts_field)


def write_parts(path: Path, objects: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    objs = struct(("class", "class_ind", "mask", "parts"), objects)
    savemat(str(path), {"anno": struct(("imname", "objects"), [(np.array([path.stem]), objs)])})


def colour(k: int) -> tuple[int, int, int]:
    return (40 * k, 200 - 30 * k, 90)


def save_png(array: np.ndarray, path: Path) -> None:
    """Grey for [H, W], RGB for [H, W, 3] (the format follows the suffix: .png or .jpg)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    sets = tmp_path / "ImageSets" / "Context"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(TRAIN) + "\n")
    (sets / "val.txt").write_text("\n".join(VAL) + "\n\n")
    for k, image_id in enumerate(TRAIN + VAL):
        save_png(np.full((H, W, 3), colour(k)), tmp_path / "JPEGImages" / f"{image_id}.jpg")
        semseg = Image.fromarray(blocks(SEMSEG).astype(np.uint8)).convert("P")  # palette ids, like VOC
        (tmp_path / "semseg" / "pascal-context").mkdir(parents=True, exist_ok=True)
        semseg.save(tmp_path / "semseg" / "pascal-context" / f"{image_id}.png")
        save_png(blocks([SALIENCY_GREY] * 4), tmp_path / "sal_distill" / f"{image_id}.png")
        rgb = np.stack([blocks([[c[i] for c in NORMAL_RGB]] * 4) for i in range(3)], axis=-1)
        save_png(rgb, tmp_path / "normals_distill" / f"{image_id}.png")
    parts = tmp_path / "human_parts"
    dog_with_head = person_object(12, {(3, 3): "head"})  # a dog's parts never count as person parts
    write_parts(
        parts / f"{TRAIN[0]}.mat", [person_object(15, PERSON_PARTS), dog_with_head, person_object(15, {(3, 0): "head"})]
    )
    # TRAIN[1] has no .mat at all
    write_parts(parts / f"{TRAIN[2]}.mat", [dog_with_head])  # no person
    empty_part = struct(("part_name", "mask"), [(np.array(["head"]), np.zeros((H, W), np.uint8))])
    painting_nothing = (np.array(["person"]), np.array([[15]]), block_mask(0, 0), empty_part)
    write_parts(parts / f"{VAL[0]}.mat", [person_object(15, {}), painting_nothing])  # persons, no part pixel
    write_parts(parts / f"{VAL[1]}.mat", [person_object(15, {(1, 1): "mouth"})])
    return tmp_path


def test_fixture_has_the_reference_struct_shape(root: Path):
    """The reference indexes ``loadmat(f)['anno'][0][0][1][0]`` for objects: [1] class index, [3] parts."""
    objects = loadmat(str(root / "human_parts" / f"{TRAIN[0]}.mat"))["anno"][0][0][1][0]
    assert [int(o[1][0][0]) for o in objects] == [15, 12, 15]
    first_part = objects[0][3][0][0]
    assert str(first_part[0][0]) == "hair" and first_part[1].shape == (H, W)
    assert len(objects[0][3][0]) == len(PERSON_PARTS)


def test_part_mapping_follows_the_reference():
    assert PART_IDS["neck"] == 2 and PART_IDS["hair"] == PART_IDS["lebrow"] == PART_IDS["mouth"] == 1
    assert PART_IDS["lhand"] == PART_IDS["rlarm"] == 4 and PART_IDS["rfoot"] == PART_IDS["llleg"] == 6
    assert len(PART_IDS) == 24 and set(PART_IDS.values()) == set(range(1, PARTS_CLASSES))


def test_native_size_targets(root: Path):
    images, targets = load(root, "train", size=20)
    assert images.shape == (3, 20, 20, 3) and images.dtype == torch.uint8
    assert targets.shape == (3, 6, 20, 20) and targets.dtype == torch.float16
    for k in range(3):  # ids in split-file order; JPEG is lossy, so a few levels of slack
        assert (images[k].int() - torch.tensor(colour(k))).abs().max() <= 3

    semseg = pascal_target(targets, "semseg")
    assert semseg.dtype == torch.long and semseg.shape == (3, 20, 20)
    expected_semseg = torch.from_numpy(np.kron(SEMSEG, np.ones((5, 5), dtype=np.int64)))
    assert torch.equal(semseg[0], expected_semseg)

    parts = pascal_target(targets, "parts")
    assert torch.equal(parts[0], torch.from_numpy(np.kron(EXPECTED_PARTS, np.ones((5, 5), dtype=np.int64))))
    assert (parts[1] == IGNORE).all()  # no .mat
    assert (parts[2] == IGNORE).all()  # only a dog

    saliency = pascal_target(targets, "saliency")
    assert saliency.dtype == torch.float32
    assert torch.equal(saliency[0, 7], torch.tensor(EXPECTED_SALIENCY, dtype=torch.float32).repeat_interleave(5))


def test_person_without_parts_is_ignored_and_unpainted_pixels_are_background(root: Path):
    _, targets = load(root, "val", size=20)
    parts = pascal_target(targets, "parts")
    assert (parts[0] == IGNORE).all()
    assert set(parts[1].unique().tolist()) == {0, 1} and (parts[1, 5:10, 5:10] == 1).all()


def test_normals_decode_to_unit_vectors_and_invalid_is_zero(root: Path):
    _, targets = load(root, "train", size=20, limit=1)
    normals = pascal_target(targets, "normals")[0]
    assert normals.shape == (3, 20, 20)
    assert (normals[:, :, 0:5] == 0).all()  # black PNG pixels are invalid
    norm = normals[:, :, 5:].norm(dim=0)
    assert torch.allclose(norm, torch.ones_like(norm), atol=2e-3)
    interior = normals[:, 1:-1]  # away from block borders the colour is unmixed
    assert torch.allclose(interior[:, :, 6:9], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 18, 3), atol=1e-2)
    assert torch.allclose(
        interior[:, :, 11:14], torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 18, 3), atol=1e-2
    )
    raw = np.array(NORMAL_RGB[3], dtype=np.float64) / 255 * 2 - 1
    expected = torch.tensor(raw / np.linalg.norm(raw), dtype=torch.float32)
    assert torch.allclose(interior[:, :, 16:19], expected[:, None, None].expand(3, 18, 3), atol=3e-3)


@pytest.mark.parametrize("size", [7, 33])
def test_resizing_keeps_label_values_in_their_sets(root: Path, size: int):
    images, targets = load(root, "train", size=size)
    assert images.shape == (3, size, size, 3) and targets.shape == (3, 6, size, size)
    assert set(pascal_target(targets, "semseg").unique().tolist()) <= set(SEMSEG.ravel().tolist())
    assert set(pascal_target(targets, "parts").unique().tolist()) <= set(range(PARTS_CLASSES)) | {IGNORE}
    assert set(pascal_target(targets, "saliency").unique().tolist()) == {0.0, 1.0}
    normals = pascal_target(targets, "normals")
    norm = normals.norm(dim=1)
    assert ((norm - 1).abs() < 2e-3).logical_or(norm == 0).all()


def test_splits_and_limit(root: Path):
    assert pascal_ids(root, "train") == TRAIN and pascal_ids(root, "val") == VAL  # blank lines skipped
    images, _ = load(root, "val", size=8)
    assert len(images) == 2
    all_train, all_targets = load(root, "train", size=8)
    first_two, first_targets = load(root, "train", size=8, limit=2)
    assert len(first_two) == 2 and torch.equal(first_two, all_train[:2]) and torch.equal(first_targets, all_targets[:2])
    with pytest.raises(ValueError, match="splits"):
        pascal_ids(root, "test")


def test_the_domain_reads_on_demand_and_resizes_like_a_fresh_load(root: Path):
    domain = pascal_domain(root, "train", size=20)
    assert isinstance(domain, PascalDomain) and domain.images.numel() == 0 and len(domain) == 3
    assert domain.sample_shape == (20, 20, 3) and domain.rgb
    rows = torch.tensor([2, 0])
    images, targets = load(root, "train", size=12)
    small = domain.resized(12)
    assert torch.equal(small.take(rows), images[rows]) and torch.equal(small.take_labels(rows), targets[rows])
    assert small.take_labels(torch.tensor([], dtype=torch.long)).shape == (0, 6, 12, 12)


def test_unrequested_tasks_are_filled_and_their_folders_may_be_missing(root: Path):
    for folder in ("human_parts", "sal_distill", "normals_distill"):
        for f in (root / folder).iterdir():
            f.unlink()
        (root / folder).rmdir()
    _, targets = load(root, "train", size=10, tasks=("semseg",))
    assert (targets[:, TARGET_CHANNELS["parts"]] == IGNORE).all()
    assert (targets[:, TARGET_CHANNELS["saliency"]] == IGNORE).all()
    assert (targets[:, TARGET_CHANNELS["normals"]] == 0).all()
    assert (pascal_target(targets, "semseg") != IGNORE).any()
    with pytest.raises(SourceMissingError, match="human_parts"):
        load(root, "train", size=10, tasks=PASCAL_TASKS)


def test_missing_data_errors_name_the_missing_path(tmp_path: Path, root: Path):
    with pytest.raises(SourceMissingError, match=r"ImageSets/Context/train\.txt.*PASCAL_MT\.tgz"):
        pascal_ids(tmp_path / "nowhere", "train")
    with pytest.raises(SourceMissingError, match="ImageSets"):
        load(tmp_path / "nowhere", "val", size=8)
    (root / "sal_distill" / f"{TRAIN[2]}.png").unlink()
    with pytest.raises(SourceMissingError, match=f"sal_distill/{TRAIN[2]}.png"):  # at construction, before any read
        pascal_domain(root, "train", size=8)
    (root / "JPEGImages" / f"{VAL[1]}.jpg").unlink()
    with pytest.raises(SourceMissingError, match=f"{VAL[1]}.jpg"):
        pascal_domain(root, "val", size=8)
    with pytest.raises(ValueError, match="depth"):
        load(root, "val", size=8, tasks=("depth",))
    with pytest.raises(ValueError, match="depth"):
        pascal_target(torch.zeros(1, 6, 2, 2), "depth")


def test_a_pascal_context_run_trains_mtlora_end_to_end(tmp_path: Path, root: Path):
    """The paper's data path at toy scale: PASCAL_MT layout → multitask regime → MTLoRA on a tiny Swin."""
    config = tiny_config(
        tmp_path / "cfg",
        backbone={"name": "swin_tiny_patch4_window7_224", "img_size": 32,
                  "kwargs": {"patch_size": 2, "window_size": 4, "embed_dim": 24, "depths": [2, 2, 2],
                             "num_heads": [2, 2, 4]}},
        method={"name": "mtlora", "rank": 2, "task_rank": 2},
        data={"domains": ["pascal_context"], "roots": {"pascal_context": str(root)}, "tasks": list(PASCAL_TASKS),
              "train_per_domain": 2, "val_per_domain": 1, "test_per_domain": None},
        train={"regime": "multitask", "steps": 2, "batch_size": 2, "warmup_steps": 0, "eval_every": 1,
               "checkpoint_every": 1, "task_weights": {"semseg": 1.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0}},
    )  # fmt: skip
    assert cli.main(["train", str(config), "--no-progress"]) == 0
    test = json.loads((tmp_path / "cfg" / "run" / "results.json").read_text())["best"]["test"]
    assert {"semseg/miou", "parts/miou", "saliency/maxf", "normals/mean_angle"} <= set(test)
