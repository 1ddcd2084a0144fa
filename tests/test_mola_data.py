"""The MoLA paper's dataset layouts and the offline heterogeneity set: VLCS and Office-Home domain folders and
MedMNIST ``.npz`` files on tiny copies written here, loaded by name with their roots as a run loads them; the
typeset-digits source rendered for real from the installed fonts (and from fonts made here, for the checks)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraplex.config import from_dict, load_config
from loraplex.data import SourceMissingError, load_source, num_classes
from loraplex.data.domains import PARTS, domain_classes, domain_kind, domain_parts
from loraplex.data.sources import DataError, FolderDomain, common, fontdigits, medmnist
from loraplex.data.sources.domainsets import OFFICE_HOME, VLCS
from loraplex.data.sources.fontdigits import (
    DIGITS,
    FONT_PACKAGES,
    INSTALL,
    SIZE,
    Style,
    digit_problem,
    font_files,
    make_font_digits,
    render_digit,
    usable_fonts,
)
from loraplex.train.runner import domain_splits

ROOT = Path(__file__).resolve().parents[1]
VLCS_CLASSES = ["bird", "car", "chair", "dog", "person"]
OFFICE_CLASSES = [f"Class_{k:02d}" for k in range(65)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Rendered sources go to a cache of the test's own (never the user's ~/.cache/loraplex)."""
    monkeypatch.setattr(common, "DOWNLOAD_ROOT", str(tmp_path / "cache"))


def colour(label: int) -> tuple[int, int, int]:
    """A class's flat colour, which survives a resize and JPEG, so a decoded pixel tells the label."""
    return (20 + 45 * (label % 5), 200 - 3 * (label // 5), 40 * (label % 3))


def write_domains(root: Path, domains: list[str], classes: list[str], per_class: int) -> Path:
    """A root with one folder per domain, each with one folder per class of ``per_class`` tiny images (PNG and JPEG,
    of different sizes), every image filled with its class's colour."""
    for domain in domains:
        for label, cls in enumerate(classes):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (6 + i, 8), colour(label))
                image.save(folder / (f"{i}.png" if i % 2 else f"{i}.jpg"), quality=95)
    return root


@pytest.fixture
def vlcs(tmp_path) -> Path:
    """VLCS with each domain folder in another common spelling."""
    return write_domains(tmp_path / "VLCS", ["CALTECH", "LabelMe", "SUN", "PASCAL"], VLCS_CLASSES, 3)


@pytest.fixture
def officehome(tmp_path) -> Path:
    return write_domains(tmp_path / "OfficeHome", ["Art", "Clipart", "Product", "Real World"], OFFICE_CLASSES, 2)


def decoded_labels(domain: FolderDomain) -> list[int]:
    """Each image's class read back from its colour."""
    pixels = domain.take(torch.arange(len(domain)))[:, 2, 2].int()
    palette = torch.tensor([colour(k) for k in range(domain.num_classes)])
    return (pixels[:, None, :] - palette[None]).abs().sum(-1).argmin(1).tolist()


# --- VLCS and Office-Home -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vlcs:Caltech101", "vlcs:labelme", "vlcs:SUN09", "vlcs:VOC2007", "vlcs:pascal"])
def test_a_vlcs_domain_loads_by_name_from_its_root_as_a_folder(vlcs, name):
    assert domain_kind(name).name == "domain set" and domain_classes(name) == num_classes(name) == 5
    parts = domain_parts(name, root=str(vlcs), seed=0, train=None, val=2, test=5, size=16)
    assert [len(parts[p]) for p in PARTS] == [8, 2, 5]
    for part in PARTS:
        domain = parts[part]
        assert isinstance(domain, FolderDomain) and domain.on_demand and domain.num_classes == 5
        assert domain.take(torch.tensor([0])).shape == (1, 16, 16, 3)
        assert decoded_labels(domain) == domain.labels.tolist()  # each file keeps its folder's label
    assert torch.bincount(parts["test"].labels, minlength=5).tolist() == [1] * 5  # stratified
    again = domain_parts(name, root=str(vlcs), seed=0, train=None, val=2, test=5, size=16)
    other = domain_parts(name, root=str(vlcs), seed=1, train=None, val=2, test=5, size=16)
    assert again["test"].paths == parts["test"].paths and other["test"].paths != parts["test"].paths
    held = domain_parts(name, root=str(vlcs), seed=0, train=None, val=2, test=None, size=16)  # no official test
    assert [len(held[p]) for p in PARTS] == [10, 2, 3]  # 20 % held out


def test_every_domain_of_a_dataset_shares_one_class_list(vlcs, officehome):
    for names, classes, root in ((VLCS.names, VLCS_CLASSES, vlcs), (OFFICE_HOME.names, OFFICE_CLASSES, officehome)):
        sources = [load_source.__wrapped__(name, root=str(root), size=8) for name in names]
        assert all(s.classes == classes for s in sources)
        assert all(s.images.shape[1:] == (8, 8, 3) and s.name == n for s, n in zip(sources, names, strict=True))
        per_class = len(sources[0]) // len(classes)
        assert all(s.labels.tolist() == np.repeat(np.arange(len(classes)), per_class).tolist() for s in sources)


@pytest.mark.parametrize("spelling", ["RealWorld", "Real World", "real_world", "REAL-WORLD"])
def test_office_home_real_world_is_found_whatever_its_spelling(officehome, spelling):
    name = f"officehome:{spelling}"
    assert domain_classes(name) == 65
    parts = domain_parts(name, root=str(officehome), seed=0, train=None, val=0.25, test=65, size=8)
    assert [len(parts[p]) for p in PARTS] == [49, 16, 65]
    assert all(path.parent.parent.name == "Real World" for path in parts["train"].paths)


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("vlcs:Caltech256", r"unknown VLCS domain 'Caltech256'; the domains are vlcs:Caltech101, vlcs:LabelMe, "),
        ("vlcs", r"VLCS needs a domain; the domains are .*vlcs:SUN09, vlcs:VOC2007"),
        ("officehome:Photo", r"officehome:Art, officehome:Clipart, officehome:Product, officehome:RealWorld"),
    ],
)
def test_an_unknown_domain_is_an_error_listing_the_valid_ones(vlcs, name, match):
    with pytest.raises(ValueError, match=match):
        domain_classes(name)  # what a run asks first, to size its heads
    with pytest.raises(ValueError, match=match):
        domain_parts(name, root=str(vlcs), seed=0, train=None, val=1, test=5, size=8)


def test_a_missing_root_names_the_key_to_set(tmp_path, vlcs):
    for name, key in (("vlcs:LabelMe", "vlcs"), ("officehome:Art", "officehome")):
        with pytest.raises(SourceMissingError, match=rf"set data\.roots\.{key} to the directory holding its domain"):
            domain_parts(name, root=None, seed=0, train=None, val=1, test=5, size=8)
    with pytest.raises(SourceMissingError, match=r"is not a directory"):
        domain_parts("vlcs:LabelMe", root=str(tmp_path / "nowhere"), seed=0, train=None, val=1, test=5, size=8)
    shutil.rmtree(vlcs / "SUN")
    with pytest.raises(SourceMissingError, match=r"VLCS domain SUN09 \('vlcs:SUN09'\) not found in .*CALTECH, LabelMe"):
        domain_parts("vlcs:SUN09", root=str(vlcs), seed=0, train=None, val=1, test=5, size=8)
    with pytest.raises(SourceMissingError, match=rf"the domains seem to be in {re.escape(str(vlcs))}: set"):
        domain_parts("vlcs:LabelMe", root=str(vlcs.parent), seed=0, train=None, val=1, test=5, size=8)


def test_mismatched_class_lists_name_the_domain_and_the_classes(vlcs, officehome):
    (vlcs / "LabelMe" / "dog").rename(vlcs / "LabelMe" / "cat")
    with pytest.raises(DataError, match=r"VLCS domain LabelMe .* does not hold VLCS's classes: missing dog; extra cat"):
        domain_parts("vlcs:LabelMe", root=str(vlcs), seed=0, train=None, val=1, test=5, size=8)
    with pytest.raises(DataError, match=r"Caltech101 .* and domain LabelMe have different classes: Caltech101 has "):
        load_source.__wrapped__("vlcs:Caltech101", root=str(vlcs), size=8)
    shutil.rmtree(officehome / "Clipart" / "Class_07")
    with pytest.raises(DataError, match=r"domain Art .* Art has extra Class_07 compared with Clipart: every Office"):
        domain_parts("officehome:Art", root=str(officehome), seed=0, train=None, val=1, test=65, size=8)
    for domain in ("Art", "Product", "Real World"):
        shutil.rmtree(officehome / domain / "Class_07")
    with pytest.raises(DataError, match=r"has 64 class folders; Office-Home has 65"):
        domain_parts("officehome:Product", root=str(officehome), seed=0, train=None, val=1, test=64, size=8)


def test_unreadable_files_in_a_domain_stop_the_run_or_are_skipped(vlcs):
    (vlcs / "SUN" / "car" / "0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    counts = {"seed": 0, "train": None, "val": 2, "test": 4, "size": 8}
    with pytest.raises(DataError, match=r"cannot read .*SUN/car/0\.jpg .*data\.skip_unreadable"):
        domain_parts("vlcs:SUN09", root=str(vlcs), **counts)
    parts = domain_parts("vlcs:SUN09", root=str(vlcs), skip_unreadable=True, **counts)
    assert sum(len(parts[p]) for p in PARTS) == 14


def run_config(domains: list[str], roots: dict[str, str]):
    data = {"domains": domains, "roots": roots, "train_per_domain": None, "val_per_domain": 2, "test_per_domain": 5}
    return from_dict({"backbone": {"img_size": 16}, "data": data})


def test_a_run_reads_each_domain_from_data_roots(vlcs):
    """What a run does today: `data.roots` keyed by the domain's own name (as `ucf101:2` is)."""
    names = ["vlcs:Caltech101", "vlcs:SUN09"]
    splits = domain_splits(run_config(names, {name: str(vlcs) for name in names}))
    assert [d.name for d in splits["train"]] == names and [len(d) for d in splits["test"]] == [5, 5]


def test_a_run_reads_every_domain_of_a_dataset_from_one_key(vlcs):
    splits = domain_splits(run_config(["vlcs:Caltech101", "vlcs:SUN09"], {"vlcs": str(vlcs)}))
    assert [len(d) for d in splits["test"]] == [5, 5]


# --- MedMNIST ----------------------------------------------------------------------------------------------------

SPLIT_SIZES = {"train": 5, "val": 3, "test": 2}  # per class


def write_npz(path: Path, classes: int, *, rgb: bool, hw: int = 6, label_columns: int = 1, volume: bool = False):
    """A MedMNIST-format file: in each image, pixel [0, 0] says its split (1 train, 2 val, 3 test), pixel [0, 1] its
    label and pixel [0, 2] its row, so a loaded sample tells where it came from."""
    arrays = {}
    for code, (part, per_class) in enumerate(SPLIT_SIZES.items(), start=1):
        labels = np.tile(np.arange(classes, dtype=np.uint8), per_class)
        shape = (len(labels), hw, hw, hw) if volume else (len(labels), hw, hw, 3) if rgb else (len(labels), hw, hw)
        images = np.zeros(shape, dtype=np.uint8)
        column = (-1, *[1] * (images.ndim - 3))  # one value per image, over its channels
        images[:, 0, 0] = code
        images[:, 0, 1] = labels.reshape(column)
        images[:, 0, 2] = np.arange(len(labels), dtype=np.uint8).reshape(column)
        arrays[f"{part}_images"] = images
        arrays[f"{part}_labels"] = np.repeat(labels[:, None], label_columns, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def med(tmp_path) -> Path:
    root = tmp_path / "medmnist"
    write_npz(root / "bloodmnist.npz", 8, rgb=True)
    write_npz(root / "pneumoniamnist.npz", 2, rgb=False)
    write_npz(root / "pathmnist_64.npz", 9, rgb=True, hw=8)
    return root


def origin(domain) -> tuple[list[int], list[int]]:
    """(split code, label) written into each sample of a part, read back at the sample's native size."""
    images = domain.images if domain.images.dim() == 3 else domain.images[..., 0]
    return images[:, 0, 0].tolist(), images[:, 0, 1].tolist()


def test_medmnist_keeps_the_files_own_splits(med):
    name = "medmnist:bloodmnist"
    assert domain_kind(name).name == "medmnist" and domain_classes(name) == 8
    parts = domain_parts(name, root=str(med), seed=0, train=None, val=0.5, test=None, size=6)
    assert [len(parts[p]) for p in PARTS] == [40, 20, 16]  # all of train, val 0.5 × train (from val), all of test
    for code, part in enumerate(PARTS, start=1):
        codes, labels = origin(parts[part])
        assert set(codes) == {code} and labels == parts[part].labels.tolist()
        assert parts[part].images.shape[1:] == (6, 6, 3) and parts[part].num_classes == 8
    assert set(torch.bincount(parts["val"].labels, minlength=8).tolist()) == {2, 3}  # stratified: 2.5 a class
    whole = domain_parts(name, root=str(med), seed=0, train=None, val=0.9, test=None, size=6)
    assert len(whole["val"]) == 24 and set(origin(whole["val"])[0]) == {2}  # capped at the file's val split
    grey = domain_parts("medmnist:pneumoniamnist", root=str(med), seed=0, train=None, val=6, test=None, size=6)
    assert grey["train"].images.shape[1:] == (6, 6) and [len(grey[p]) for p in PARTS] == [10, 6, 4]


def test_medmnist_counts_draw_stratified_seeded_subsets_of_each_split(med):
    def draw(seed: int):
        return domain_parts("medmnist:bloodmnist", root=str(med), seed=seed, train=16, val=8, test=8, size=6)

    first, again, other = draw(0), draw(0), draw(1)
    for code, part in enumerate(PARTS, start=1):
        assert set(origin(first[part])[0]) == {code}
        assert torch.bincount(first[part].labels, minlength=8).tolist() == [len(first[part]) // 8] * 8
        assert torch.equal(first[part].images, again[part].images)
    assert not torch.equal(first["train"].images, other["train"].images)  # other rows, same class counts
    assert [len(first[p]) for p in PARTS] == [16, 8, 8]
    with pytest.raises(ValueError, match=r"asked for 30 val images of medmnist:bloodmnist; its official val split has"):
        domain_parts("medmnist:bloodmnist", root=str(med), seed=0, train=16, val=30, test=8, size=6)


def test_medmnist_sizes_and_unknown_sets(med):
    assert domain_classes("medmnist:pathmnist_64") == 9 == num_classes("medmnist:pathmnist_224")
    source = load_source.__wrapped__("medmnist:pathmnist_64", root=str(med))
    assert source.images.shape == (9 * 10, 8, 8, 3) and source.classes == [str(k) for k in range(9)]
    assert int(source.official_test.sum()) == 18 and int(source.official_val.sum()) == 27
    write_npz(med / "kidneymnist.npz", 3, rgb=False)
    assert load_source.__wrapped__("medmnist:kidneymnist", root=str(med)).classes == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"not one of MedMNIST's 2D sets \(pathmnist, chestmnist, dermamnist"):
        domain_classes("medmnist:kidneymnist")
    with pytest.raises(ValueError, match=r"name a MedMNIST set, medmnist:<set>"):
        domain_classes("medmnist")


def test_medmnist_refuses_multi_label_sets(med):
    with pytest.raises(DataError, match=r"medmnist:chestmnist is multi-label \(14 findings per image"):
        domain_classes("medmnist:chestmnist")
    write_npz(med / "chestmnist.npz", 14, rgb=False, label_columns=14)
    with pytest.raises(DataError, match=r"multi-label .*single-label classifiers"):
        domain_parts("medmnist:chestmnist", root=str(med), seed=0, train=None, val=2, test=None, size=6)
    write_npz(med / "otherchest.npz", 2, rgb=False, label_columns=3)
    with pytest.raises(DataError, match=r"medmnist:otherchest is multi-label \(3 findings"):
        load_source.__wrapped__("medmnist:otherchest", root=str(med))


def test_medmnist_missing_files_name_the_key_to_set(med, tmp_path, monkeypatch):
    monkeypatch.setattr(medmnist, "MEDMNIST_ROOT", str(tmp_path / "home-medmnist"))
    with pytest.raises(SourceMissingError, match=r"default .*data\.roots\.medmnist unset.*medmnist\.DermaMNIST\("):
        domain_parts("medmnist:dermamnist", root=None, seed=0, train=None, val=2, test=None, size=6)
    with pytest.raises(SourceMissingError, match=r"it holds bloodmnist, pathmnist_64, pneumoniamnist\): set data\.r"):
        domain_parts("medmnist:dermamnist", root=str(med), seed=0, train=None, val=2, test=None, size=6)
    with pytest.raises(SourceMissingError, match=r"PathMNIST\(split='test', download=True, size=128\)"):
        load_source.__wrapped__("medmnist:pathmnist_128", root=str(med))
    (tmp_path / "home-medmnist").mkdir()
    shutil.copy(med / "bloodmnist.npz", tmp_path / "home-medmnist" / "bloodmnist.npz")
    assert len(load_source.__wrapped__("medmnist:bloodmnist")) == 80  # the default directory, as medmnist writes it


def test_medmnist_rejects_files_that_are_not_2d_sets(med):
    write_npz(med / "organmnist3d.npz", 11, rgb=False, volume=True)
    (med / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    np.savez(med / "partial.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.zeros((2, 1)))
    np.savez(med / "floaty.npz", **{f"{p}_{k}": np.zeros((2, 4, 4)) for p in PARTS for k in ("images", "labels")})
    for name, match in (
        ("organmnist3d", r"have shape \(55, 6, 6, 6\), expected \[N, H, W\] or \[N, H, W, 3\] \(a 3-D set"),
        ("broken", r"cannot read .*broken\.npz as MedMNIST's \.npz"),
        ("partial", r"is not a MedMNIST file: no val_images, val_labels, test_images, test_labels"),
        ("floaty", r"train_images are float64, expected uint8"),
    ):
        with pytest.raises(DataError, match=match):
            load_source.__wrapped__(f"medmnist:{name}", root=str(med))


# --- fontdigits --------------------------------------------------------------------------------------------------

FONTS = usable_fonts(font_files())
needs_fonts = pytest.mark.skipif(len(FONTS) < 3, reason=f"needs installed fonts: {INSTALL}")


def make_font(path: Path, cmap: dict[int, str], shapes: dict[str, list[tuple[int, int, int, int]]]) -> Path:
    """A TrueType font of rectangles: ``.notdef`` is a solid box, ``shapes`` the other glyphs."""
    fb_module = pytest.importorskip("fontTools.fontBuilder")
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def glyph(rects):
        pen = TTGlyphPen(None)
        for x0, y0, x1, y1 in rects:
            pen.moveTo((x0, y0))
            pen.lineTo((x0, y1))
            pen.lineTo((x1, y1))
            pen.lineTo((x1, y0))
            pen.closePath()
        return pen.glyph()

    shapes = {".notdef": [(50, 0, 550, 700)], **shapes}
    builder = fb_module.FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(list(shapes))
    builder.setupCharacterMap(cmap)
    builder.setupGlyf({name: glyph(rects) for name, rects in shapes.items()})
    builder.setupHorizontalMetrics({name: (600, 0) for name in shapes})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": path.stem, "styleName": "Regular"})
    builder.setupOS2()
    builder.setupPost()
    path.parent.mkdir(parents=True, exist_ok=True)
    builder.save(str(path))
    return path


def bars(count: int) -> list[tuple[int, int, int, int]]:
    """``count`` vertical bars: ten distinct glyphs for ten digits."""
    return [(60 + 50 * i, 0, 90 + 50 * i, 700) for i in range(count)]


def test_fonts_without_their_own_digit_glyphs_are_skipped(tmp_path):
    digits = {0x30 + d: f"d{d}" for d in range(10)}
    good = make_font(tmp_path / "good.ttf", digits, {f"d{d}": bars(d + 1) for d in range(10)})
    tofu = make_font(tmp_path / "tofu.ttf", {0x41: "A"}, {"A": bars(2)})
    same = make_font(tmp_path / "same.ttf", dict.fromkeys(digits, "bar"), {"bar": bars(3)})
    blank = make_font(tmp_path / "blank.ttf", {0x41: "A"} | dict.fromkeys(digits, "space"), {"A": bars(1), "space": []})
    broken = tmp_path / "broken.otf"
    broken.write_bytes(b"OTTO not a font")
    assert digit_problem(good) is None
    assert digit_problem(tofu) == "draws some digits as its .notdef box (tofu)"
    assert digit_problem(same) == "draws several digits with one glyph"
    assert digit_problem(blank) == "has no glyph for some digits"
    assert digit_problem(broken).startswith("does not load")
    twin = Path(shutil.copy(good, tmp_path / "twin.ttf"))
    (tmp_path / ".hidden").mkdir()
    shutil.copy(good, tmp_path / ".hidden" / "h.ttf")
    (tmp_path / "notes.txt").write_text("not a font")
    listed = font_files(tmp_path)
    assert [p.name for p in listed] == ["blank.ttf", "broken.otf", "good.ttf", "same.ttf", "tofu.ttf", "twin.ttf"]
    assert usable_fonts(listed) == [good] and twin in listed  # the pixel-identical twin counted once


def test_too_few_usable_fonts_names_the_debian_packages(tmp_path):
    make_font(tmp_path / "fonts" / "tofu.ttf", {0x41: "A"}, {"A": bars(2)})
    with pytest.raises(SourceMissingError, match=r"found 0 font\(s\) that typeset the ten digits under .*fonts") as err:
        load_source.__wrapped__("fontdigits:2", root=str(tmp_path / "fonts"))
    assert INSTALL in str(err.value) and "fonts-noto-core" in INSTALL
    make_text = (ROOT / "Makefile").read_text()
    deb_packages = re.search(r"^DEB_PACKAGES := (.*?)\n\n", make_text, re.M | re.S).group(1).replace("\\", " ").split()
    assert set(FONT_PACKAGES.split()) <= set(deb_packages)  # `make test` installs what the source names


def test_fontdigits_is_registered_with_ten_classes():
    assert num_classes("fontdigits") == num_classes("fontdigits:7") == domain_classes("fontdigits:7") == 10
    assert domain_kind("fontdigits").name == "image source"
    with pytest.raises(ValueError, match=r"expected fontdigits:<images per class>"):
        num_classes("fontdigits:lots")


@needs_fonts
def test_fontdigits_renders_every_digit_white_on_black_and_caches_by_font_list(monkeypatch):
    source = load_source.__wrapped__("fontdigits:3")
    assert source.images.shape == (30, SIZE, SIZE) and source.images.dtype == torch.uint8
    assert source.classes == list(DIGITS) and source.labels.tolist() == np.repeat(np.arange(10), 3).tolist()
    corners = source.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert int(corners.max()) == 0 and all(int(image.max()) == 255 for image in source.images)  # white digit on black
    ink = (source.images > 127).float().mean((1, 2))
    assert 0.03 < float(ink.min()) and float(ink.max()) < 0.6
    cached = list(common.cache_dir().glob("fontdigits-3x28-v2-*.npz"))
    assert len(cached) == 1 and cached[0].stem.endswith(fontdigits.fonts_key(font_files()))

    def never(*args, **kwargs):
        raise AssertionError("rendered again")

    monkeypatch.setattr(fontdigits, "make_font_digits", never)
    assert torch.equal(load_source.__wrapped__("fontdigits:3").images, source.images)


@needs_fonts
def test_fontdigits_is_deterministic_and_its_fonts_differ():
    fonts = FONTS[:6]
    images, labels, which = make_font_digits(fonts, 4, seed=0)
    again, _, _ = make_font_digits(fonts, 4, seed=0)
    other, _, _ = make_font_digits(fonts, 4, seed=1)
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert labels.tolist() == np.repeat(np.arange(10), 4).tolist()
    assert all(len(set(which[labels == d].tolist())) == 4 for d in range(10))  # each class cycles through fonts
    plain = [render_digit(font, 5) for font in FONTS]
    assert len({image.tobytes() for image in plain}) > 0.9 * len(FONTS)  # near-twins may meet at 28 px
    styled = render_digit(FONTS[0], 5, Style(stroke=3, scale=0.8, angle=8.0, shift=(2, -2)))
    assert not np.array_equal(styled, plain[0])


def test_the_heterogeneity_config_has_three_digit_domains_with_one_label_space():
    config = load_config(ROOT / "configs" / "digits_hetero.yaml")
    assert config.data.domains == ["mnist", "digits", "fontdigits"] and config.method_name == "lora"
    three_domain = load_config(ROOT / "configs" / "three_domain.yaml")
    assert (config.train, config.backbone.img_size) == (three_domain.train, three_domain.backbone.img_size)
    assert [domain_classes(d) for d in config.data.domains] == [10, 10, 10]
    asked = config.data.train_per_domain + config.data.val_per_domain + config.data.test_per_domain
    assert asked <= len(DIGITS) * fontdigits.PER_CLASS  # the default rendering holds the three parts (a run: 5 s)
