"""The continual-learning papers' sets in their distributed layouts, on tiny copies written here and loaded by name
with their roots as a run loads them: CIFAR-100 / CIFAR-10 binary records, ImageNet-R's class folders, DomainNet's
domain folders and file lists."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraplex.config import from_dict
from loraplex.data import SourceMissingError, load_source, num_classes
from loraplex.data.domains import PARTS, domain_classes, domain_kind, domain_parts
from loraplex.data.sources import DataError, FolderDomain
from loraplex.train.runner import domain_splits

# --- CIFAR -------------------------------------------------------------------------------------------------------

CIFAR_SPLITS = {"train": 4, "test": 2}  # records per class
CIFAR_CLASSES = 5  # the labels the tiny files use (of 100 / 10)


def cifar_record(label: int, red: int, code: int, *, coarse: int | None) -> bytes:
    """One record: the red plane constant ``red`` but for pixel (row 0, column 1), 200 (so rows and columns cannot
    swap unseen), the green plane the label, the blue plane the split's code (1 train, 2 test)."""
    planes = np.empty((3, 32, 32), dtype=np.uint8)
    planes[0], planes[1], planes[2] = red, label, code
    planes[0, 0, 1] = 200
    return (bytes([coarse]) if coarse is not None else b"") + bytes([label]) + planes.tobytes()


def cifar_file(path: Path, per_class: int, code: int, *, coarse: bool) -> None:
    """``per_class`` records of each class, the red plane holding the record's row in the file."""
    labels = np.tile(np.arange(CIFAR_CLASSES), per_class)
    path.write_bytes(
        b"".join(cifar_record(int(k), row, code, coarse=k // 2 if coarse else None) for row, k in enumerate(labels))
    )


@pytest.fixture
def cifar100(tmp_path) -> Path:
    """``<tmp>/cifar-100-binary`` as the archive unpacks (the root may be it or ``<tmp>``)."""
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    for code, (part, per_class) in enumerate(CIFAR_SPLITS.items(), start=1):
        cifar_file(folder / f"{part}.bin", per_class, code, coarse=True)
    (folder / "fine_label_names.txt").write_text("".join(f"fine_{k}\n" for k in range(100)) + "\n")
    (folder / "coarse_label_names.txt").write_text("".join(f"coarse_{k}\n" for k in range(20)))
    return folder


@pytest.fixture
def cifar10(tmp_path) -> Path:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for batch in range(1, 6):
        cifar_file(folder / f"data_batch_{batch}.bin", 1, 1, coarse=False)
    cifar_file(folder / "test_batch.bin", 2, 2, coarse=False)
    (folder / "batches.meta.txt").write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n\n")
    return folder


def test_cifar100_reads_the_binary_records_exactly_with_the_official_split(cifar100):
    assert domain_kind("cifar100").name == "image source" and domain_classes("cifar100") == num_classes("cifar100")
    assert domain_classes("cifar100") == 100
    for root in (cifar100, cifar100.parent):  # the folder of the .bin files, or its parent
        parts = domain_parts("cifar100", root=str(root), seed=0, train=None, val=5, test=None, size=32)
        assert [len(parts[p]) for p in PARTS] == [15, 5, 10]  # all 20 training records (val from them), all 10 test
        for part in PARTS:
            images, labels = parts[part].images, parts[part].labels
            assert images.shape[1:] == (32, 32, 3) and parts[part].num_classes == 100
            assert images[..., 1].flatten(1).eq(labels[:, None]).all()  # the fine label, as written in green
            assert (images[..., 2] == (2 if part == "test" else 1)).all()
            assert (images[:, 0, 1, 0] == 200).all()
            red = images[..., 0].clone()
            red[:, 0, 1] = red[:, 0, 0]
            assert red.flatten(1).eq(red[:, :1, 0]).all()  # the rest of the red plane: one value, the row
        rows = sorted(parts["test"].images[:, 0, 0, 0].tolist())
        assert rows == list(range(10)) and parts["test"].labels.tolist() == [r % 5 for r in range(10)]
    source = load_source.__wrapped__("cifar100", root=str(cifar100))
    assert source.classes[:2] == ["fine_0", "fine_1"] and len(source.classes) == 100
    assert source.images[0, :, :, 0].tolist() == [[0, 200] + [0] * 30] + [[0] * 32] * 31
    assert int(source.official_test.sum()) == 10 and source.official_test[-10:].all()


def test_cifar100_validation_is_carved_from_train_by_seed(cifar100):
    def val_rows(seed: int) -> list[int]:
        parts = domain_parts("cifar100", root=str(cifar100), seed=seed, train=None, val=0.25, test=4, size=32)
        assert [len(parts[p]) for p in PARTS] == [15, 5, 4] and (parts["val"].images[..., 2] == 1).all()
        assert torch.bincount(parts["val"].labels).tolist() == [1] * 5  # stratified
        return parts["val"].images[:, 0, 0, 0].tolist()

    assert val_rows(0) == val_rows(0) != val_rows(1)


def test_cifar10_binary_batches_read_with_one_label_byte(cifar10):
    assert domain_classes("cifar10") == 10
    parts = domain_parts("cifar10", root=str(cifar10.parent), seed=0, train=None, val=5, test=None, size=32)
    assert [len(parts[p]) for p in PARTS] == [20, 5, 10]
    for part in ("train", "test"):
        images = parts[part].images
        assert images[..., 1].flatten(1).eq(parts[part].labels[:, None]).all()
        assert (images[..., 2] == (2 if part == "test" else 1)).all() and (images[:, 0, 1, 0] == 200).all()
    assert load_source.__wrapped__("cifar10", root=str(cifar10)).classes[:3] == ["airplane", "automobile", "bird"]


def test_cifar_errors_say_what_is_missing_and_where_to_get_it(cifar100, tmp_path):
    counts = {"seed": 0, "train": None, "val": 2, "test": None, "size": 32}
    with pytest.raises(SourceMissingError, match=r"cifar100 reads CIFAR-100's binary files .*cifar-100-binary\.tar"):
        domain_parts("cifar100", root=None, **counts)
    with pytest.raises(SourceMissingError, match=r"is not a directory"):
        domain_parts("cifar100", root=str(tmp_path / "nowhere"), **counts)
    pickled = tmp_path / "elsewhere" / "cifar-100-python"
    pickled.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (pickled / name).write_bytes(b"\x80\x04 pickled")
    for root in (pickled, pickled.parent):
        with pytest.raises(SourceMissingError, match=r"python distribution \(cifar-100-python\), which is pickled and"):
            domain_parts("cifar100", root=str(root), **counts)
    (tmp_path / "elsewhere" / "cifar-100-binary.tar.gz").write_bytes(b"")
    with pytest.raises(SourceMissingError, match=r"cifar-100-python"):  # the pickled one named first
        domain_parts("cifar100", root=str(tmp_path / "elsewhere"), **counts)
    shutil.rmtree(pickled)
    with pytest.raises(SourceMissingError, match=r"cifar-100-binary\.tar\.gz is not unpacked: get"):
        domain_parts("cifar100", root=str(tmp_path / "elsewhere"), **counts)
    (cifar100 / "test.bin").unlink()
    with pytest.raises(SourceMissingError, match=r"binary files test\.bin are not in .*cifar-100-binary .*holds "):
        domain_parts("cifar100", root=str(cifar100.parent), **counts)


def test_a_truncated_or_foreign_cifar_file_is_named(cifar100, cifar10):
    train = cifar100 / "train.bin"
    whole = train.read_bytes()
    train.write_bytes(whole[:-5])
    with pytest.raises(DataError, match=r"train\.bin is 61475 bytes, not a whole number of CIFAR-100 records \(3074"):
        load_source.__wrapped__("cifar100", root=str(cifar100))
    train.write_bytes(whole[:3074] + cifar_record(150, 0, 1, coarse=1))
    with pytest.raises(DataError, match=r"train\.bin: record 1 has label 150; CIFAR-100 has 100 classes"):
        load_source.__wrapped__("cifar100", root=str(cifar100))
    shutil.copy(cifar100 / "test.bin", cifar10 / "test_batch.bin")  # 3074-byte records are not CIFAR-10's
    with pytest.raises(DataError, match=r"test_batch\.bin is 30740 bytes, not a whole number of CIFAR-10 records"):
        load_source.__wrapped__("cifar10", root=str(cifar10))
    train.write_bytes(whole)
    (cifar100 / "fine_label_names.txt").write_text("apple\npear\n")
    with pytest.raises(DataError, match=r"fine_label_names\.txt names 2 classes; CIFAR-100 has 100"):
        load_source.__wrapped__("cifar100", root=str(cifar100))


# --- ImageNet-R --------------------------------------------------------------------------------------------------

WNIDS = [f"n{1440764 + 7 * k:08d}" for k in range(200)]
R_PER_CLASS = 5


def label_colour(label: int) -> tuple[int, int, int]:
    """An ImageNet-R image's flat colour: red is its label."""
    return (label, 255 - label, 0)


@pytest.fixture(scope="module")
def imagenet_r_copy(tmp_path_factory) -> Path:
    """``<tmp>/imagenet-r``: 200 WordNet-id folders of PNGs (lossless) of different sizes, coloured by class."""
    folder = tmp_path_factory.mktemp("imagenet_r") / "imagenet-r"
    for label, wnid in enumerate(WNIDS):
        (folder / wnid).mkdir(parents=True)
        for i in range(R_PER_CLASS):
            Image.new("RGB", (4 + i, 4), label_colour(label)).save(folder / wnid / f"{i}.png")
    return folder


@pytest.fixture
def imagenet_r(imagenet_r_copy, tmp_path) -> Path:
    """A copy of its own, for the tests that break it."""
    return Path(shutil.copytree(imagenet_r_copy, tmp_path / "data" / "imagenet-r"))


def test_imagenet_r_holds_out_a_seeded_stratified_fifth_as_its_test_part(imagenet_r_copy):
    assert domain_kind("imagenet_r").name == "imagenet_r" and domain_classes("imagenet_r") == 200
    parts = domain_parts(
        "imagenet_r", root=str(imagenet_r_copy.parent), seed=0, train=None, val=0.25, test=None, size=4
    )
    assert [len(parts[p]) for p in PARTS] == [600, 200, 200]  # 80 / 20, validation a quarter of the 80
    assert torch.bincount(parts["test"].labels, minlength=200).tolist() == [1] * 200
    for part in PARTS:
        domain = parts[part]
        assert isinstance(domain, FolderDomain) and domain.on_demand and domain.num_classes == 200
        images = domain.take(torch.arange(len(domain)))
        assert images.shape[1:] == (4, 4, 3)
        assert images[:, 0, 0, 0].tolist() == domain.labels.tolist() and (images.int().sum(-1) == 255).all()
        assert [WNIDS[k] for k in domain.labels.tolist()] == [p.parent.name for p in domain.paths]
    seen = set(parts["train"].paths) | set(parts["val"].paths)
    assert len(seen) == 800 and not seen & set(parts["test"].paths)
    again = domain_parts("imagenet_r", root=str(imagenet_r_copy), seed=0, train=None, val=0.25, test=None, size=4)
    other = domain_parts("imagenet_r", root=str(imagenet_r_copy), seed=1, train=None, val=0.25, test=None, size=4)
    assert again["test"].paths == parts["test"].paths and other["test"].paths != parts["test"].paths
    counted = domain_parts("imagenet_r", root=str(imagenet_r_copy), seed=0, train=100, val=50, test=400, size=4)
    assert [len(counted[p]) for p in PARTS] == [100, 50, 400]
    source = load_source.__wrapped__("imagenet_r", root=str(imagenet_r_copy), size=4)
    assert source.classes == WNIDS and source.images.shape == (1000, 4, 4, 3) and source.name == "imagenet_r"


def test_imagenet_r_errors_name_the_root_and_the_class_count(imagenet_r, tmp_path):
    counts = {"seed": 0, "train": None, "val": 2, "test": None, "size": 4}
    with pytest.raises(SourceMissingError, match=r"set data\.roots\.imagenet_r to the imagenet-r folder .*hendrycks"):
        domain_parts("imagenet_r", root=None, **counts)
    with pytest.raises(SourceMissingError, match=r"ImageNet-R root .*nowhere \(data\.roots\.imagenet_r\) is not a dir"):
        domain_parts("imagenet_r", root=str(tmp_path / "nowhere"), **counts)
    with pytest.raises(DataError, match=r"has 1 class folders \(data\); ImageNet-R has 200, one per WordNet id"):
        domain_parts("imagenet_r", root=str(tmp_path), **counts)  # two levels too high
    (imagenet_r / WNIDS[3] / "2.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=rf"cannot read .*{WNIDS[3]}/2\.png .*data\.skip_unreadable"):
        domain_parts("imagenet_r", root=str(imagenet_r), **counts)
    parts = domain_parts("imagenet_r", root=str(imagenet_r), skip_unreadable=True, **counts)
    assert sum(len(parts[p]) for p in PARTS) == 999
    shutil.rmtree(imagenet_r / WNIDS[7])
    with pytest.raises(DataError, match=r"has 199 class folders \(n01440764, .*, …\); ImageNet-R has 200"):
        domain_parts("imagenet_r", root=str(imagenet_r.parent), **counts)


# --- DomainNet ---------------------------------------------------------------------------------------------------

DN_CLASSES = {0: "aircraft_carrier", 1: "airplane", 2: "alarm_clock", 344: "zigzag"}  # label -> class folder
DN_SPLITS = {"train": 3, "test": 2}  # listed images per class


def dn_colour(label: int, code: int) -> tuple[int, int, int]:
    """A DomainNet image's flat colour, far enough from the others' to survive JPEG: red its class, blue its split
    (1 train, 2 test)."""
    return (20 + 60 * list(DN_CLASSES).index(label), 120, 80 * code)


def write_domainnet(root: Path, domain: str) -> Path:
    """A domain folder and its two lists, as DomainNet distributes them: JPEGs (PNGs for quickdraw) coloured by label
    and split (blue 1 train, 2 test), plus one file in no list."""
    suffix = "png" if domain == "quickdraw" else "jpg"
    for code, (part, per_class) in enumerate(DN_SPLITS.items(), start=1):
        lines = []
        for label, cls in DN_CLASSES.items():
            (root / domain / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                relative = f"{domain}/{cls}/{domain}_{label:03d}_{code}{i:05d}.{suffix}"
                Image.new("RGB", (6 + i, 5), dn_colour(label, code)).save(root / relative, quality=95)
                lines.append(f"{relative} {label}")
        (root / f"{domain}_{part}.txt").write_text("\n".join(lines) + "\n")
    Image.new("RGB", (5, 5), dn_colour(1, 1)).save(root / domain / "airplane" / f"unlisted.{suffix}")
    return root


@pytest.fixture
def domainnet(tmp_path) -> Path:
    root = tmp_path / "domainnet"
    for domain in ("clipart", "quickdraw", "sketch"):
        write_domainnet(root, domain)
    return root


def decoded(domain: FolderDomain) -> tuple[list[int], list[int]]:
    """(label, split code) read back from each image's colour, at the nearest colour a label and a code have."""
    pixels = domain.take(torch.arange(len(domain)))[:, 2, 2].int()
    palette = {(label, code): dn_colour(label, code) for label in DN_CLASSES for code in (1, 2)}
    keys = list(palette)
    nearest = (pixels[:, None, :] - torch.tensor(list(palette.values()))[None]).abs().sum(-1).argmin(1)
    return [keys[k][0] for k in nearest.tolist()], [keys[k][1] for k in nearest.tolist()]


@pytest.mark.parametrize("domain", ["clipart", "quickdraw", "Sketch"])
def test_a_domainnet_domain_keeps_its_lists_split_and_labels(domainnet, domain):
    name = f"domainnet:{domain}"
    assert domain_kind(name).name == "domainnet" and domain_classes(name) == num_classes(name) == 345
    parts = domain_parts(name, root=str(domainnet), seed=0, train=None, val=4, test=None, size=8)
    assert [len(parts[p]) for p in PARTS] == [8, 4, 8]  # the train list's 12 (val from them), the test list's 8
    for code, part in ((1, "train"), (1, "val"), (2, "test")):
        domain_data = parts[part]
        assert isinstance(domain_data, FolderDomain) and domain_data.num_classes == 345
        labels, codes = decoded(domain_data)
        assert labels == domain_data.labels.tolist() and set(codes) == {code}
        assert all(p.parent.name == DN_CLASSES[k] for p, k in zip(domain_data.paths, labels, strict=True))
    assert torch.bincount(parts["val"].labels, minlength=345)[list(DN_CLASSES)].tolist() == [1] * 4  # stratified
    again = domain_parts(name, root=str(domainnet), seed=0, train=None, val=4, test=None, size=8)
    other = domain_parts(name, root=str(domainnet), seed=3, train=None, val=4, test=None, size=8)
    assert again["val"].paths == parts["val"].paths and other["val"].paths != parts["val"].paths
    assert other["test"].paths == parts["test"].paths  # the official test list, whatever the seed
    drawn = domain_parts(name, root=str(domainnet), seed=0, train=None, val=4, test=4, size=8)
    assert set(drawn["test"].paths) < set(parts["test"].paths) and len(drawn["test"]) == 4


def test_domainnet_loads_eagerly_with_class_names_from_the_lists(domainnet):
    source = load_source.__wrapped__("domainnet:clipart", root=str(domainnet), size=8)
    assert source.images.shape == (20, 8, 8, 3) and int(source.official_test.sum()) == 8
    assert source.official_test[-8:].all() and len(source.classes) == 345
    assert [source.classes[k] for k in DN_CLASSES] == list(DN_CLASSES.values()) and source.classes[3] == "3"
    parts = domain_parts("domainnet:clipart", root=str(domainnet), seed=0, train=None, val=0, test=None, size=8)
    assert not any(p.name.startswith("unlisted") for part in PARTS for p in parts[part].paths)


def test_a_run_reads_the_three_sets_from_their_data_roots(domainnet, cifar100, imagenet_r_copy):
    domains = ["cifar100", "imagenet_r", "domainnet:clipart", "domainnet:sketch"]
    roots = {"cifar100": str(cifar100.parent), "imagenet_r": str(imagenet_r_copy), "domainnet": str(domainnet)}
    data = {"domains": domains, "roots": roots, "train_per_domain": None, "val_per_domain": 2, "test_per_domain": None}
    splits = domain_splits(from_dict({"backbone": {"img_size": 8}, "data": data}))
    assert [d.name for d in splits["test"]] == domains and [len(d) for d in splits["test"]] == [10, 200, 8, 8]
    assert [d.num_classes for d in splits["train"]] == [100, 200, 345, 345]


def test_domainnet_errors_name_what_is_missing(domainnet, tmp_path):
    counts = {"seed": 0, "train": None, "val": 2, "test": None, "size": 8}
    for name in ("domainnet:photo", "domainnet"):
        what = "unknown DomainNet domain 'photo'" if name.endswith("photo") else "DomainNet needs a domain"
        match = rf"{what}; the domains are domainnet:clipart, domainnet:infograph, .*domainnet:sketch$"
        with pytest.raises(ValueError, match=match):
            domain_classes(name)  # what a run asks first, to size its heads
        with pytest.raises(ValueError, match=match):
            domain_parts(name, root=str(domainnet), **counts)
    with pytest.raises(SourceMissingError, match=r"set data\.roots\.domainnet .*clipart/, clipart_train\.txt, clip"):
        domain_parts("domainnet:clipart", root=None, **counts)
    with pytest.raises(SourceMissingError, match=r"file lists real_train\.txt and real_test\.txt for 'domainnet:real'"):
        domain_parts("domainnet:real", root=str(domainnet), **counts)
    (domainnet / "painting_test.txt").write_text("")
    with pytest.raises(SourceMissingError, match=r"file list painting_train\.txt for 'domainnet:painting' is not in"):
        domain_parts("domainnet:painting", root=str(domainnet), **counts)
    (domainnet / "painting_train.txt").write_text("")
    with pytest.raises(SourceMissingError, match=r"painting images are not in .*: no folder painting/; unzip painting"):
        domain_parts("domainnet:painting", root=str(domainnet), **counts)
    (domainnet / "painting").mkdir()
    with pytest.raises(DataError, match=r"has 345 classes .* but none holds images.*painting_train\.txt and paint"):
        domain_parts("domainnet:painting", root=str(domainnet), **counts)


def test_a_missing_listed_file_stops_the_run_or_is_skipped(domainnet):
    counts = {"seed": 0, "train": None, "val": 2, "test": None, "size": 8}
    missing = sorted((domainnet / "sketch" / "alarm_clock").glob("sketch_002_1*.jpg"))
    for path in missing[:2]:
        path.unlink()
    with pytest.raises(
        DataError, match=rf"cannot read {missing[0]} \(no such file, listed in sketch_train\.txt line 7"
    ):
        domain_parts("domainnet:sketch", root=str(domainnet), **counts)
    parts = domain_parts("domainnet:sketch", root=str(domainnet), skip_unreadable=True, **counts)
    assert [len(parts[p]) for p in PARTS] == [8, 2, 8]


def test_a_domainnet_list_must_be_lines_of_path_and_label(domainnet):
    counts = {"seed": 0, "train": None, "val": 2, "test": None, "size": 8}
    listed = domainnet / "clipart_test.txt"
    lines = listed.read_text().splitlines()
    for bad, match in (
        ("clipart/zigzag/x.jpg 345", r"clipart_test\.txt line 3: 'clipart/zigzag/x\.jpg 345' is not '<relative path>"),
        ("clipart/zigzag/x.jpg", r"line 3: 'clipart/zigzag/x\.jpg' is not '<relative path> <label>' with a label in"),
        (lines[0].replace(" 0", " 1"), r"line 3: label 1 is class folder 'aircraft_carrier', but 'airplane' in clip"),
    ):
        listed.write_text("\n".join([*lines[:2], bad, *lines[2:]]))
        with pytest.raises(DataError, match=match):
            domain_parts("domainnet:clipart", root=str(domainnet), **counts)
