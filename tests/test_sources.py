"""The source registry and the pre-training sources: every registered name resolves, unknown names list the known
ones; emoji, icon and clip-art labels on tiny generated data; the real emoji parts; domain kinds by name."""

from __future__ import annotations

import hashlib
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from loraplex.data import SourceMissingError, load_source, num_classes, split
from loraplex.data.domains import DENSE_DOMAINS, PARTS, dense_target_fn, domain_classes, domain_kind, domain_parts
from loraplex.data.motion import PATTERNS
from loraplex.data.sources import KNOWN_CLASSES, SOURCES, common, known_sources, register_source, registry, source_of
from loraplex.data.sources.clipart import CLIPART_ROOT, HELD_OUT, clipart_part
from loraplex.data.sources.emoji import EMOJI_FONT, EMOJI_TEST, HELD_OUT_SUBGROUPS, emoji_labels, list_emoji, render
from loraplex.data.sources.icons import CONTEXTS, THEMES, list_icons, load_icons


def spellings(source) -> list[str]:
    """Every form of name a registered source takes."""
    names = [] if source.argument is not None and not source.optional else [source.name]
    if source.argument is not None:
        names.append(f"{source.name}:an:argument")  # everything after the first colon is the argument
    if source.parts:
        names += [f"{source.name}-seen", f"{source.name}-held"]
    return names


def test_the_sources_are_registered_in_the_order_errors_list_them():
    assert list(SOURCES) == [
        *("fashion", "mnist", "digits", "clipart", "emoji", "icons", "fractals", "folder"),
        *("fontdigits", "vlcs", "officehome", "medmnist"),
        *("cifar100", "cifar10", "imagenet_r", "domainnet", "vtab"),
    ]
    assert [SOURCES[name].parts for name in ("clipart", "emoji", "icons")] == [True, True, False]


@pytest.mark.parametrize("source", list(SOURCES.values()), ids=list(SOURCES))
def test_every_registered_name_resolves_to_its_source(source):
    for name in spellings(source):
        resolved, request = source_of(name)
        assert resolved is source and request.name == name
        assert request.part == (name.rpartition("-")[2] if name.endswith(("-seen", "-held")) else "all")
        assert request.argument == ("an:argument" if ":" in name else None)
        kinds = {"folder": "folder", "vlcs": "domain set", "officehome": "domain set", "medmnist": "medmnist"}
        kinds |= {"imagenet_r": "imagenet_r", "domainnet": "domainnet", "vtab": "vtab"}
        assert domain_kind(name).name == kinds.get(source.name, "image source")
    assert source.spelling in known_sources()


@pytest.mark.parametrize("name", ["imagenet", "fashion:x", "folder", "clipart-x", "emoji-held:3", "icons-seen", ""])
def test_unknown_names_are_errors_listing_every_known_source(name):
    with pytest.raises(ValueError, match=f"unknown source {name!r}") as caught:
        load_source(name)
    assert all(spelled in str(caught.value) for spelled in known_sources())
    assert "fashion, mnist, digits, clipart[-seen|-held], emoji[-seen|-held]" in str(caught.value)


def test_class_counts_known_without_loading(monkeypatch, tmp_path):
    def never(*args, **kwargs):
        raise AssertionError("loaded")

    monkeypatch.setattr(registry, "load_source", never)
    monkeypatch.setattr("loraplex.data.sources.fractals.make_fractal_dataset", never)
    for cls in ("a", "b", "c"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "0.png").write_bytes(b"")  # listed, never opened
    assert num_classes("fractals:7x3") == 7 and num_classes("fractals") == 1000
    assert num_classes(f"folder:{tmp_path}") == 3 and num_classes("icons") == len(CONTEXTS) == 9
    assert num_classes("ucf101") == KNOWN_CLASSES["ucf101"] == 101 and num_classes("digits") == 10
    with pytest.raises(ValueError, match="expected fractals:<classes>x<per_class>"):
        num_classes("fractals:lots")


def test_a_new_source_is_one_decorated_loader(monkeypatch):
    monkeypatch.setattr(registry, "SOURCES", dict(SOURCES))
    monkeypatch.setattr(registry, "KNOWN_CLASSES", dict(KNOWN_CLASSES))

    @register_source("stripes", argument="<width>", optional=True, classes=2, install="apt-get install stripes")
    def load_stripes(request):
        width = int(request.argument or 1)
        if width > 4:
            raise registry.missing("stripes", f"no stripes wider than 4 px, asked for {width}")
        images = torch.zeros(4, 8, 8, dtype=torch.uint8)
        images[2:, :, ::width] = 255
        return common.ImageSource(request.name, images, torch.tensor([0, 0, 1, 1]), ["plain", "striped"])

    source = load_source.__wrapped__("stripes:2")
    assert source.name == "stripes:2" and source.images[3, 0, :3].tolist() == [255, 0, 255]
    assert num_classes("stripes") == 2 and "stripes[:<width>]" in known_sources()
    with pytest.raises(
        SourceMissingError, match=r"wider than 4 px, asked for 9\. Install with `apt-get install stripes`"
    ):
        load_source.__wrapped__("stripes:9")
    with pytest.raises(ValueError, match="cannot register source 'stripes'"):
        register_source("stripes")(load_stripes)
    for bad in ("a:b", "c-held"):
        with pytest.raises(ValueError, match="not a plain name"):
            register_source(bad)(load_stripes)


# --- emoji -------------------------------------------------------------------------------------------------------

TINY_EMOJI_TEST = """\
# emoji-test.txt (a tiny made-up one, in the real file's format)
# group: Smileys & Emotion

# subgroup: face-smiling
{smiling}
263A                                                   ; unqualified         # ☺ E0.6 smiling face
2639                                                   ; minimally-qualified # ☹ E0.7 frowning face

# subgroup: face-hat
{hat}

# subgroup: face-glasses
{glasses}

# group: People & Body

# subgroup: hand-fingers-open
{hands}
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
1F44B 1F3FF                                            ; fully-qualified     # 👋🏿 E1.0 waving hand: dark skin tone

# subgroup: person
{person}

# group: Animals & Nature

# subgroup: animal-mammal
{mammals}

# group: Component

# subgroup: hair-style
1F9B0                                                  ; component           # 🦰 E11.0 red hair
1F9B1                                                  ; fully-qualified     # 🦱 E11.0 curly hair (made up)
"""
SUBGROUPS = {"smiling": 9, "hat": 3, "glasses": 5, "hands": 9, "person": 2, "mammals": 4}


@pytest.fixture
def tiny_emoji(tmp_path):
    lines, start = {}, 0x1F600
    for key, n in SUBGROUPS.items():
        codes = [f"{start + i:X} FE0F" if i == 0 else f"{start + i:X}" for i in range(n)]  # sequences too
        lines[key] = "\n".join(f"{code:<55}; fully-qualified     # x E1.0 {key} {i}" for i, code in enumerate(codes))
        start += 0x20
    path = tmp_path / "emoji-test.txt"
    path.write_text(TINY_EMOJI_TEST.format(**lines), encoding="utf-8")
    return path


def test_emoji_list_keeps_fully_qualified_emoji_without_skin_tones_or_components(tiny_emoji):
    emoji = list_emoji(tiny_emoji)
    assert len(emoji) == sum(SUBGROUPS.values()) == 32
    assert emoji[0].text == "\U0001f600\ufe0f" and emoji[1].text == "\U0001f601"
    assert [e.subgroup for e in emoji[9:12]] == ["face-hat"] * 3 and emoji[9].group == "Smileys & Emotion"
    assert {e.group for e in emoji} == {"Smileys & Emotion", "People & Body", "Animals & Nature"}
    assert not any(0x1F3FB <= ord(c) <= 0x1F3FF for e in emoji for c in e.text)
    with pytest.raises(SourceMissingError, match="fonts-noto-color-emoji unicode-data"):
        list_emoji(tiny_emoji.parent / "nope.txt")


def test_emoji_parts_merge_small_subgroups_and_label_the_held_part_by_group(tiny_emoji):
    emoji = list_emoji(tiny_emoji)
    assert {"hand-fingers-open", "animal-mammal"} <= HELD_OUT_SUBGROUPS
    assert not {"face-smiling", "face-hat", "face-glasses", "person"} & HELD_OUT_SUBGROUPS
    parts = {part: emoji_labels(emoji, part) for part in ("all", "seen", "held")}
    keep, classes, labels = parts["seen"]
    # face-hat (3) + face-glasses (5) make a "<group>/other" of 8; person (2) merges into one of 2, then is dropped
    assert classes == ["Smileys & Emotion/other", "face-smiling"]
    assert list(keep) == list(range(17)) and np.bincount(labels).tolist() == [8, 9]
    assert [classes[label] for label in labels[:10]] == ["face-smiling"] * 9 + ["Smileys & Emotion/other"]
    keep, classes, labels = parts["held"]
    assert classes == ["Animals & Nature", "People & Body"]  # by group, however small
    assert list(keep) == list(range(17, 26)) + list(range(28, 32)) and np.bincount(labels).tolist() == [4, 9]
    assert {emoji[i].subgroup for i in keep} <= HELD_OUT_SUBGROUPS
    assert not set(parts["seen"][0]) & set(keep)
    keep, classes, labels = parts["all"]  # by sub-group: the 4 mammals and 2 persons are too few
    assert classes == ["Smileys & Emotion/other", "face-smiling", "hand-fingers-open"] and len(keep) == 26
    keep, classes, _ = emoji_labels(emoji, "seen", held=(), min_per_class=4)  # both merged "other"s too small
    assert classes == ["animal-mammal", "face-glasses", "face-smiling", "hand-fingers-open"] and len(keep) == 27
    with pytest.raises(ValueError, match="seen or held"):
        emoji_labels(emoji, "unseen")


def _raqm() -> bool:
    from PIL import features

    return bool(features.check("raqm"))


needs_emoji = pytest.mark.skipif(
    not (EMOJI_FONT.is_file() and EMOJI_TEST.is_file() and _raqm()),
    reason=f"needs {EMOJI_FONT} and {EMOJI_TEST} (apt-get install -y fonts-noto-color-emoji unicode-data) and "
    "Pillow with raqm",
)


@needs_emoji
def test_an_emoji_renders_as_a_colour_square_on_white():
    image = render("\U0001f34e", 40)  # red apple
    assert image.shape == (40, 40, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 255, 255] and (image < 250).any(-1).mean() > 0.2
    red = image[..., 0].astype(int) - image[..., 2]
    assert red.max() > 100  # colour, not a grey outline


@pytest.fixture(scope="module")
def emoji_parts(tmp_path_factory):
    """The real ``emoji-seen`` and ``emoji-held``, rendered once into a temporary cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "DOWNLOAD_ROOT", str(tmp_path_factory.mktemp("cache")))
        parts = {part: load_source.__wrapped__(f"emoji-{part}") for part in ("seen", "held")}
        assert [p.name for p in common.cache_dir().iterdir()] == ["emoji-64.npz"]
    return parts


@needs_emoji
def test_real_emoji_parts_have_the_documented_sizes_and_share_nothing(emoji_parts):
    seen, held = emoji_parts["seen"], emoji_parts["held"]
    assert (len(held), len(held.classes), len(seen), len(seen.classes)) == (871, 8, 995, 43)
    assert held.images.shape == (871, 64, 64, 3) and held.images.dtype == torch.uint8
    assert torch.equal(torch.unique(held.labels), torch.arange(8))
    assert not set(seen.classes) & HELD_OUT_SUBGROUPS and "Flags" not in held.classes
    digests = {part: {hashlib.sha1(image.numpy().tobytes()).digest() for image in source.images}
               for part, source in emoji_parts.items()}  # fmt: skip
    assert not digests["seen"] & digests["held"]  # no drawing in both


@needs_emoji
def test_emoji_held_splits_are_seeded_stratified_and_disjoint(emoji_parts, monkeypatch):
    held = emoji_parts["held"]
    monkeypatch.setattr("loraplex.data.domains.load_source", lambda name, root=None: held)  # the fixture's rendering
    counts = {"train": 500, "val": 100, "test": 200}
    with pytest.raises(ValueError, match="no official test split"):
        domain_parts("emoji-held", root=None, seed=0, size=16, **(counts | {"test": None}))
    first = [domain_parts("emoji-held", root=None, seed=s, size=16, **counts) for s in (0, 0, 1)]
    assert [len(first[0][p]) for p in PARTS] == [500, 100, 200] and first[0]["train"].images.shape[1:] == (16, 16, 3)
    for part in PARTS:
        assert torch.equal(first[0][part].images, first[1][part].images)
        assert torch.equal(first[0][part].labels, first[1][part].labels)
        assert not torch.equal(first[0][part].images, first[2][part].images)  # other images, same class counts
        assert torch.equal(torch.bincount(first[0][part].labels), torch.bincount(first[2][part].labels))
    parts = split(held, seed=0, **counts)
    rows = [set(getattr(parts, p).tolist()) for p in PARTS]
    assert not rows[0] & rows[1] and not rows[0] & rows[2] and not rows[1] & rows[2]
    share = torch.bincount(held.labels[parts.test], minlength=8) / 200  # stratified: within one image per class
    assert torch.allclose(share, torch.bincount(held.labels, minlength=8) / len(held), atol=1.01 / 200)


# --- icons -------------------------------------------------------------------------------------------------------

ICONS = {"oxygen": ["actions/a", "apps/b", "actions/c"], "gnome": ["devices/d"], "mate": ["status/e", "animations/f"]}


def icon_themes(root):
    for theme, icons in ICONS.items():
        for icon in icons:
            path = root / THEMES[theme] / f"{icon}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGBA", (48, 24), (200, 0, 0, 255)).save(path)
    (root / THEMES["oxygen"] / "actions" / "notes.txt").write_text("not an icon")
    return root


def test_icons_are_labelled_by_context_across_the_three_theme_layouts(tmp_path, monkeypatch):
    root = icon_themes(tmp_path / "icons")
    paths, labels, classes = list_icons(root)
    assert classes == list(CONTEXTS) and [p.stem for p in paths] == ["a", "c", "b", "d", "e"]  # no animations
    assert [classes[label] for label in labels] == ["actions", "actions", "apps", "devices", "status"]
    images, again_labels, _ = load_icons(16, root, cache=tmp_path / "c.npz")
    assert images.shape == (5, 16, 16, 3) and images[0, 0, 0].tolist() == [255, 255, 255]  # letterboxed on white
    assert images[0, 8, 8].tolist() == [200, 0, 0] and np.array_equal(again_labels, labels)
    monkeypatch.setattr(common, "DOWNLOAD_ROOT", str(tmp_path / "cache"))
    source = load_source.__wrapped__("icons", root=str(root))
    assert source.classes == list(CONTEXTS) and source.images.shape == (5, 64, 64, 3)
    assert source.labels.tolist() == labels.tolist() and len(list((tmp_path / "cache").glob("icons-64-*.npz"))) == 1


def test_a_missing_icon_theme_names_the_install_command(tmp_path):
    root = icon_themes(tmp_path)
    install = "apt-get update && apt-get install -y oxygen-icon-theme gnome-icon-theme mate-icon-theme"
    for theme, missing in (("mate", "mate"), ("gnome", "gnome, mate")):
        shutil.rmtree(root / THEMES[theme])
        with pytest.raises(SourceMissingError, match=re.escape(f"icon themes {missing} not found under {root}")) as err:
            load_source.__wrapped__("icons", root=str(root))
        assert install in str(err.value)


# --- clip art ----------------------------------------------------------------------------------------------------


def test_clipart_parts_split_the_classes_and_relabel_them():
    classes = sorted([*HELD_OUT, "animals", "computer/icons", "shapes/stars"])
    labels = np.random.default_rng(0).integers(0, len(classes), 400)
    everything = clipart_part(labels, classes, "all")
    assert np.array_equal(everything[0], np.arange(400)) and everything[2] == classes
    (seen, seen_labels, seen_classes), (held, held_labels, held_classes) = (
        clipart_part(labels, classes, part) for part in ("seen", "held")
    )
    assert held_classes == sorted(HELD_OUT) and seen_classes == ["animals", "computer/icons", "shapes/stars"]
    assert not set(seen) & set(held) and sorted([*seen, *held]) == list(range(400))
    for positions, new, names in ((seen, seen_labels, seen_classes), (held, held_labels, held_classes)):
        assert set(new.tolist()) == set(range(len(names)))  # 0..k-1
        assert [names[n] for n in new] == [classes[old] for old in labels[positions]]  # the same class, renumbered
    lacking = [c for c in classes if c != "tools"]
    with pytest.raises(ValueError, match=r"\['tools'\] are held out but not among"):
        clipart_part(labels % len(lacking), lacking, "held")
    with pytest.raises(ValueError, match="all, seen or held"):
        clipart_part(labels, classes, "some")


@pytest.mark.skipif(not CLIPART_ROOT.is_dir(), reason=f"openclipart-png is not installed ({CLIPART_ROOT})")
def test_real_clipart_parts_are_the_documented_downstream_set():
    """What `make test`'s set-up installs decodes into the documented parts (the first call decodes 8,000 PNGs, ~30 s
    on one core, into the user's cache, as a run would)."""
    seen, held = load_source("clipart-seen"), load_source("clipart-held")
    assert (len(held), len(held.classes), len(seen), len(seen.classes)) == (757, 10, 7292, 51)
    assert held.classes == sorted(HELD_OUT) and not set(seen.classes) & set(HELD_OUT)
    assert torch.bincount(held.labels).min() >= 30 and held.images.shape[1:] == (64, 64)
    train, val, test = 400, 100, 257  # benchmarks/common.py's DOWNSTREAM sizes: test is all that is left
    parts = domain_parts("clipart-held", root=None, seed=0, train=train, val=val, test=test, size=32)
    assert [len(parts[p]) for p in PARTS] == [train, val, test]


# --- domain kinds ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "clips", "classes"),
    [
        ("digits", "image source", False, 10),
        ("fractals:5x2", "image source", False, 5),
        ("folder:/no/such:dir", "folder", False, None),
        ("motion:fashion", "motion", True, len(PATTERNS)),
        ("ucf101:2", "video", True, 101),
        ("kinetics400", "video", True, 400),
        ("scenes", "scenes", False, None),
        ("pascal_context", "pascal_context", False, None),
    ],
)
def test_a_domain_name_is_resolved_to_one_kind(name, kind, clips, classes):
    assert (
        domain_kind(name).name == kind and domain_kind(name).clips == clips and domain_kind(name) is domain_kind(name)
    )
    if classes is not None:
        assert domain_classes(name) == classes
    if kind in DENSE_DOMAINS:
        assert dense_target_fn(name) == domain_kind(name).targets and len(dense_target_fn(name)[1]) >= 2
        with pytest.raises(ValueError, match="dense multi-task dataset: its heads are per task"):
            domain_classes(name)
    else:
        with pytest.raises(ValueError, match="not a dense multi-task dataset; use one of"):
            dense_target_fn(name)


def test_a_video_name_with_a_bad_fold_is_an_error_when_resolved():
    with pytest.raises(ValueError, match="the part after ':' is a split fold"):
        domain_kind("hmdb51:x")
