"""VTAB-1K tasks in the PEFT papers' layout, on a tiny copy written here (two tasks, their four lists) and loaded by
name with ``data.roots.vtab`` as a run loads them: the search and final protocol steps, subsampled lists, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from loraplex.config import ConfigError, from_dict
from loraplex.data import SourceMissingError, load_source, num_classes
from loraplex.data.domains import PARTS, domain_classes, domain_kind, domain_parts
from loraplex.data.sources import DataError, FolderDomain
from loraplex.data.sources.vtab import VTAB_CLASSES, VTAB_LISTS
from loraplex.train.runner import domain_splits

CODES = {stem: code for code, stem in enumerate(VTAB_LISTS, start=1)}  # the list an image was written for
PER_CLASS = {"train800": 2, "val200": 1, "train800val200": 3, "test": 2}  # images per class in each list
TASKS = {"kitti": ("jpg", False), "patch_camelyon": ("png", True)}  # suffix; train800val200 names train800's + val200's
COUNTS = {"seed": 0, "train": None, "val": 0.5, "test": None, "size": 8}


def colour(label: int, code: int) -> tuple[int, int, int]:
    """An image's flat colour, far enough from the others' to survive JPEG: red its label, blue its list's code."""
    return (30 + 60 * label, 120, 40 * code)


def write_task(root: Path, task: str, suffix: str, shared: bool) -> None:
    """A task folder as NOAH's get_vtab1k.py writes it (each list its own copies, ``images/<list>/000000.jpg``) or,
    ``shared``, with flat ``images/`` whose train800val200 list names train800's and val200's files."""
    classes = VTAB_CLASSES[task]
    lines: dict[str, list[str]] = {}
    for stem, per_class in PER_CLASS.items():
        if shared and stem == "train800val200":
            lines[stem] = lines["train800"] + lines["val200"]
        else:
            lines[stem] = []
            for i in range(per_class * classes):
                relative = f"images/{stem}_{i:04d}.{suffix}" if shared else f"images/{stem}/{i:06d}.{suffix}"
                (root / task / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (6 + i % 3, 5), colour(i % classes, CODES[stem])).save(root / task / relative)
                lines[stem].append(f"{relative} {i % classes}")
        (root / task / f"{stem}.txt").write_text("\n".join(lines[stem]) + "\n")


@pytest.fixture
def vtab(tmp_path) -> Path:
    root = tmp_path / "vtab-1k"
    for task, (suffix, shared) in TASKS.items():
        write_task(root, task, suffix, shared)
    return root


def listed(root: Path, task: str, stem: str) -> tuple[list[Path], list[int]]:
    """The images and labels a list names, in its order."""
    rows = [line.rsplit(maxsplit=1) for line in (root / task / f"{stem}.txt").read_text().splitlines()]
    return [root / task / path for path, _ in rows], [int(label) for _, label in rows]


def decoded(domain: FolderDomain) -> tuple[list[int], list[int]]:
    """(label, list code) read back from each image's colour, at the nearest colour a label and a code have."""
    images = domain.take(torch.arange(len(domain)))
    assert images.shape == (len(domain), domain.size, domain.size, 3)
    palette = {(label, code): colour(label, code) for label in range(4) for code in CODES.values()}
    keys = list(palette)
    pixels = images[:, 2, 2].int()
    nearest = (pixels[:, None, :] - torch.tensor(list(palette.values()))[None]).abs().sum(-1).argmin(1)
    return [keys[k][0] for k in nearest.tolist()], [keys[k][1] for k in nearest.tolist()]


def check_part(domain: FolderDomain, root: Path, task: str, stem: str, codes: set[int]) -> None:
    """``domain`` is the whole list ``stem`` in its order, labels and pixels as written."""
    paths, labels = listed(root, task, stem)
    assert isinstance(domain, FolderDomain) and domain.num_classes == VTAB_CLASSES[task]
    assert domain.paths == paths and domain.labels.tolist() == labels
    pixel_labels, pixel_codes = decoded(domain)
    assert pixel_labels == labels and set(pixel_codes) == codes


@pytest.mark.parametrize("spelling", ["kitti", "Patch_Camelyon"])
def test_the_search_trains_on_train800_validates_on_val200_and_tests_on_test(vtab, spelling):
    task, name = spelling.lower(), f"vtab:{spelling}"
    assert domain_kind(name).name == "vtab" and domain_classes(name) == num_classes(name) == VTAB_CLASSES[task]
    parts = domain_parts(name, root=str(vtab), **COUNTS)  # val 0.5 of train800, capped at val200: all of it
    for part, stem in zip(PARTS, ("train800", "val200", "test"), strict=True):
        check_part(parts[part], vtab, task, stem, {CODES[stem]})
    assert [len(parts[part]) for part in PARTS] == [2 * VTAB_CLASSES[task], VTAB_CLASSES[task], 2 * VTAB_CLASSES[task]]


@pytest.mark.parametrize("spelling", ["kitti:final", "patch_camelyon:FINAL"])
def test_the_final_step_trains_on_train800val200_its_val200_inside(vtab, spelling):
    task, name = spelling.partition(":")[0], f"vtab:{spelling}"
    assert domain_kind(name).name == "vtab" and domain_classes(name) == VTAB_CLASSES[task]
    parts = domain_parts(name, root=str(vtab), **COUNTS)
    shared = TASKS[task][1]
    train_codes = {CODES["train800"], CODES["val200"]} if shared else {CODES["train800val200"]}
    check_part(parts["train"], vtab, task, "train800val200", train_codes)
    check_part(parts["val"], vtab, task, "val200", {CODES["val200"]})
    check_part(parts["test"], vtab, task, "test", {CODES["test"]})
    assert [len(parts[part]) for part in PARTS] == [3 * VTAB_CLASSES[task], VTAB_CLASSES[task], 2 * VTAB_CLASSES[task]]
    if shared:  # the very files validation scores are in the training set
        assert set(parts["val"].paths) < set(parts["train"].paths)


def test_counts_draw_each_part_from_its_own_list_stratified_by_seed(vtab):
    name, whole = "vtab:kitti", domain_parts("vtab:kitti", root=str(vtab), **COUNTS)
    drawn = domain_parts(name, root=str(vtab), seed=0, train=4, val=2, test=4, size=8)
    assert [len(drawn[part]) for part in PARTS] == [4, 2, 4]
    for part in PARTS:
        assert set(drawn[part].paths) < set(whole[part].paths)
    assert torch.bincount(drawn["train"].labels, minlength=4).tolist() == [1, 1, 1, 1]  # stratified
    assert torch.bincount(drawn["test"].labels, minlength=4).tolist() == [1, 1, 1, 1]
    again = domain_parts(name, root=str(vtab), seed=0, train=4, val=2, test=4, size=8)
    other = domain_parts(name, root=str(vtab), seed=1, train=4, val=2, test=4, size=8)
    assert all(again[part].paths == drawn[part].paths for part in PARTS)
    assert any(other[part].paths != drawn[part].paths for part in PARTS)
    fractions = {0.25: 2, 0.9: 4}  # of train800's 8, drawn from val200's 4 and capped at them
    for val, expected in fractions.items():
        assert (
            len(domain_parts(name, root=str(vtab), seed=0, train=None, val=val, test=None, size=8)["val"]) == expected
        )
    final = domain_parts("vtab:kitti:final", root=str(vtab), seed=0, train=12, val=4, test=8, size=8)
    assert final["train"].paths == listed(vtab, "kitti", "train800val200")[0]  # the whole list, in its order
    augmented = domain_parts(name, root=str(vtab), augment=True, **COUNTS)
    assert augmented["train"].size == 16 and augmented["val"].size == 8


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        ({"train": 9}, r"asked for 9 train images of vtab:kitti; its train list train800\.txt has 8 \(data\.train_per"),
        ({"val": 5}, r"asked for 5 val images of vtab:kitti; its val list val200\.txt has 4$"),
        ({"test": 9}, r"its test list test\.txt has 8 \(data\.test_per_domain: null takes all of it\)$"),
    ],
)
def test_a_count_beyond_its_list_is_an_error(vtab, counts, match):
    with pytest.raises(ValueError, match=match):
        domain_parts("vtab:kitti", root=str(vtab), **{**COUNTS, **counts})


def test_a_run_reads_the_tasks_from_data_roots_vtab(vtab):
    domains = ["vtab:kitti", "vtab:patch_camelyon:final"]
    data = {"domains": domains, "roots": {"vtab": str(vtab)}, "train_per_domain": None, "val_per_domain": 0.25}
    splits = domain_splits(from_dict({"backbone": {"img_size": 8}, "data": data}))
    assert [d.name for d in splits["train"]] == domains and [d.num_classes for d in splits["test"]] == [4, 2]
    assert [[len(d) for d in splits[part]] for part in PARTS] == [[8, 6], [2, 2], [8, 4]]
    assert all(d.sample_shape == (8, 8, 3) for part in PARTS for d in splits[part])
    with pytest.raises(ConfigError, match=r"data: asked for 1000 train images of vtab:kitti; its train list train800"):
        domain_splits(from_dict({"backbone": {"img_size": 8}, "data": {**data, "train_per_domain": 1000}}))


@pytest.mark.parametrize("name", ["vtab:kitti", "vtab:kitti:final"])
def test_a_task_loads_eagerly_as_train800val200_and_test(vtab, name):
    source = load_source.__wrapped__(name, root=str(vtab), size=8)
    assert source.images.shape == (20, 8, 8, 3) and source.classes == ["0", "1", "2", "3"]
    assert source.official_test.tolist() == [False] * 12 + [True] * 8
    assert source.labels.tolist() == listed(vtab, "kitti", "train800val200")[1] + listed(vtab, "kitti", "test")[1]
    assert (source.images[:12, 2, 2, 2].int() - 40 * CODES["train800val200"]).abs().max() < 20
    assert (source.images[12:, 2, 2, 2].int() - 40 * CODES["test"]).abs().max() < 20


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("vtab:imagenet", "unknown VTAB-1K task 'imagenet'"),
        ("vtab", "VTAB-1K needs a task"),
        (
            "vtab:dtd:last",
            r"the only protocol step after the task is ':final' \(train800val200, then test\), not 'last'",
        ),
    ],
)
def test_a_bad_task_name_lists_the_19_tasks(vtab, name, what):
    match = rf"^'{name}': {what}; the tasks are vtab:cifar, vtab:caltech101, .*, vtab:smallnorb_ele \(each also as"
    with pytest.raises(ValueError, match=match) as caught:
        domain_classes(name)  # what a run asks first, to size its heads
    assert all(f"vtab:{task}" in str(caught.value) for task in VTAB_CLASSES) and len(VTAB_CLASSES) == 19
    with pytest.raises(ValueError, match=match):
        domain_parts(name, root=str(vtab), **COUNTS)


def test_missing_data_errors_say_what_is_missing_and_where_to_get_it(vtab):
    lists = r"train800\.txt, val200\.txt, train800val200\.txt, test\.txt"
    with pytest.raises(SourceMissingError, match=rf"set data\.roots\.vtab .*\(kitti/ with images/ and {lists}; e\.g"):
        domain_parts("vtab:kitti", root=None, **COUNTS)
    with pytest.raises(SourceMissingError, match=r"VTAB-1K root .*/absent \(data\.roots\.vtab\) is not a directory"):
        domain_parts("vtab:kitti", root=str(vtab / "absent"), **COUNTS)
    with pytest.raises(
        SourceMissingError, match=r"task folder dtd/ for 'vtab:dtd' is not in .*it holds patch_camelyon, k"
    ):
        domain_parts("vtab:dtd", root=str(vtab), **COUNTS)
    with pytest.raises(SourceMissingError, match=r"\(data\.roots\.vtab; it holds none of the 19 task folders\): the r"):
        domain_parts("vtab:kitti", root=str(vtab.parent), **COUNTS)  # the folder above vtab-1k
    (vtab / "kitti" / "test.txt").unlink()
    with pytest.raises(SourceMissingError, match=r"list test\.txt for 'vtab:kitti' is not in .*/kitti: a task folder"):
        domain_parts("vtab:kitti", root=str(vtab), **COUNTS)
    (vtab / "kitti" / "val200.txt").unlink()
    with pytest.raises(SourceMissingError, match=r"lists val200\.txt, test\.txt for 'vtab:kitti:final' are not in"):
        domain_parts("vtab:kitti:final", root=str(vtab), **COUNTS)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("images/x.jpg", r"train800\.txt line 3: 'images/x\.jpg' is not '<image path> <label>' \(a path relative to k"),
        ("images/x.jpg three", r"line 3: 'images/x\.jpg three' is not '<image path> <label>'"),
        ("images/x.jpg -1", r"line 3: 'images/x\.jpg -1' is not .* an integer label ≥ 0\)$"),
        ("images/x.jpg 4", r"line 3: label 4 is out of range: VTAB-1K's kitti has 4 classes \(labels 0\.\.3\)"),
        (
            "images/train800/000000.jpg 1",
            r"line 3: images/train800/000000\.jpg is labelled 1, but 0 in train800\.txt l",
        ),
    ],
)
def test_a_malformed_list_line_is_named_by_file_and_line(vtab, bad, match):
    listed_file = vtab / "kitti" / "train800.txt"
    lines = listed_file.read_text().splitlines()
    listed_file.write_text("\n".join([*lines[:2], bad, *lines[2:]]))
    with pytest.raises(DataError, match=match):
        domain_parts("vtab:kitti", root=str(vtab), **COUNTS)


def test_lists_must_hold_images_and_reach_the_last_class(vtab):
    for stem in VTAB_LISTS:  # label 3 nowhere: the lists' class count would be 3, not kitti's 4
        path = vtab / "kitti" / f"{stem}.txt"
        path.write_text(path.read_text().replace(" 3\n", " 2\n"))
    with pytest.raises(DataError, match=r"kitti \(.*/kitti\): no list labels an image 3, though kitti has 4 classes"):
        domain_parts("vtab:kitti", root=str(vtab), **COUNTS)
    (vtab / "kitti" / "val200.txt").write_text("\n")
    with pytest.raises(DataError, match=r"kitti/val200\.txt lists no images"):
        domain_parts("vtab:kitti", root=str(vtab), **COUNTS)


def test_a_missing_listed_image_stops_the_run_or_is_skipped(vtab):
    gone = [vtab / "kitti" / "images" / "val200" / f"00000{i}.jpg" for i in (1, 2)]
    for path in gone:
        path.unlink()
    with pytest.raises(
        DataError, match=rf"cannot read {gone[0]} \(no such file, listed in val200\.txt line 2\); 1 other file is"
    ):
        domain_parts("vtab:kitti", root=str(vtab), **COUNTS)
    parts = domain_parts("vtab:kitti", root=str(vtab), skip_unreadable=True, **COUNTS)
    assert [len(parts[part]) for part in PARTS] == [8, 2, 8] and not set(gone) & set(parts["val"].paths)
