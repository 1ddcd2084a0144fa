"""A user's own image folders and videos: an unreadable file, a folder with fewer than two classes or a path that
leads nowhere is an error naming it; with ``data.skip_unreadable`` unreadable files are left out with one warning
line; any spelling of a path works; images of mixed sizes and modes read as one sample shape."""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loraplex.config import ConfigError, DataSection, from_dict
from loraplex.data.domains import PARTS, domain_classes, domain_parts
from loraplex.data.sources import DataError, SourceMissingError, read_image

SIZE = 8
LOGGER = "loraplex.data"
CLASSES = ("cat", "dog")
PER_CLASS = 6  # 0.png, 1.jpg, 2.png, …: both formats in every class


def parts_of(name: str, *, root: str | None = None, frames: int | None = None, **kwargs) -> dict:
    counts = {"train": None, "val": 1, "test": None} if frames else {"train": None, "val": 2, "test": 2}
    return domain_parts(name, root=root, seed=0, size=SIZE, frames=frames, **(counts | kwargs))


def make_folder(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = PER_CLASS) -> Path:
    """Noisy 24×20 images (so a truncated file loses pixel data, not only its end), PNG and JPEG alternating."""
    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    return root


def part_paths(parts: dict) -> list[Path]:
    return [p for part in PARTS for p in parts[part].paths]


def skip_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "skipped" in r.getMessage()]


# --- unreadable images --------------------------------------------------------------------------------------------


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image, whatever its name says\n" * 4)


def half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def without_last_bytes(n: int) -> Callable[[Path], None]:
    def cut(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:-n])

    return cut


def flipped_idat_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"IDAT") + 40] ^= 0xFF
    path.write_bytes(bytes(raw))


def dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.parent / "gone.png")


BAD_IMAGES = [
    # file, damage, reason in the message, whether decoding it later fails too (the check is stricter than decoding
    # for a PNG that lost only its IEND chunk)
    pytest.param("cat/2.png", zero_bytes, "empty file (0 bytes)", True, id="zero-byte png"),
    pytest.param("dog/1.jpg", zero_bytes, "empty file (0 bytes)", True, id="zero-byte jpeg"),
    pytest.param("cat/2.png", garbage, "not an image format PIL can identify", True, id="garbage png"),
    pytest.param("dog/3.jpg", garbage, "not an image format PIL can identify", True, id="garbage jpeg"),
    pytest.param("cat/4.png", half, "Truncated File Read", True, id="truncated png"),
    pytest.param("dog/1.jpg", half, "truncated", True, id="truncated jpeg"),
    pytest.param("dog/5.jpg", without_last_bytes(2), "image file is truncated", True, id="jpeg without its end"),
    pytest.param("cat/0.png", without_last_bytes(12), "truncated PNG file", False, id="png without IEND"),
    pytest.param("cat/0.png", flipped_idat_byte, "bad header checksum", True, id="png with a flipped byte"),
    pytest.param("dog/2.png", dangling_link, "No such file or directory", True, id="dangling symlink"),
]


@pytest.mark.parametrize(("file", "damage", "reason", "decoding_fails"), BAD_IMAGES)
def test_an_unreadable_image_stops_the_start_or_is_skipped(tmp_path, caplog, file, damage, reason, decoding_fails):
    folder = make_folder(tmp_path / "photos")
    bad = folder / file
    damage(bad)
    name = f"folder:{folder}"
    with pytest.raises(DataError) as caught:
        parts_of(name)
    message = str(caught.value)
    assert f"image folder {folder}: cannot read {bad} (" in message and reason.lower() in message.lower()
    assert "other file" not in message and "data.skip_unreadable: true" in message

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        parts = parts_of(name, skip_unreadable=True)
    n = len(CLASSES) * PER_CLASS
    assert skip_lines(caplog) == [
        f"image folder {folder}: skipped 1 of {n} files that cannot be read (data.skip_unreadable): {file}"
    ]
    assert sum(len(parts[p]) for p in PARTS) == n - 1 and bad not in part_paths(parts)
    for part in PARTS:
        images = parts[part].take(torch.arange(len(parts[part])))
        assert images.shape == (len(parts[part]), SIZE, SIZE, 3)
    if decoding_fails:  # what a run would meet hours in without the check
        with pytest.raises(DataError, match=rf"cannot decode image {bad}"):
            read_image(bad, SIZE)


def test_many_unreadable_files_are_counted_and_the_first_few_named(tmp_path, caplog):
    folder = make_folder(tmp_path)
    bad = ["cat/0.png", "cat/1.jpg", "cat/3.jpg", "dog/0.png", "dog/4.png"]
    for file in bad:
        garbage(folder / file)
    with pytest.raises(DataError, match=r"cannot read .*cat/0\.png .*; 4 other files are unreadable too\. Fix"):
        parts_of(f"folder:{folder}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        parts = parts_of(f"folder:{folder}", skip_unreadable=True)
    assert skip_lines(caplog) == [
        f"image folder {folder}: skipped 5 of 12 files that cannot be read (data.skip_unreadable): "
        "cat/0.png, cat/1.jpg, cat/3.jpg …"
    ]
    assert sum(len(parts[p]) for p in PARTS) == 7


def test_the_skip_warning_is_one_line_on_stderr_without_logging_set_up(tmp_path):
    """The CLI configures no logging: Python's last-resort handler prints the bare message."""
    folder = make_folder(tmp_path)
    zero_bytes(folder / "dog" / "1.jpg")
    script = textwrap.dedent(
        f"""
        from loraplex.data.domains import domain_parts
        domain_parts("folder:{folder}", root=None, seed=0, train=None, val=2, test=2, size=8, skip_unreadable=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stderr.splitlines() == [
        f"image folder {folder}: skipped 1 of 12 files that cannot be read (data.skip_unreadable): dog/1.jpg"
    ]


# --- fewer than two classes, and folders that are not there ---------------------------------------------------------


def one_subdirectory(root: Path) -> None:
    make_folder(root, classes=("cat",))


def one_empty_class(root: Path) -> None:
    make_folder(root, classes=("cat",))
    (root / "dog").mkdir()
    (root / "dog" / "notes.txt").write_text("no images here")


def hidden_second_class(root: Path) -> None:
    make_folder(root, classes=("cat", ".ipynb_checkpoints"))


def class_of_broken_files(root: Path) -> None:
    make_folder(root)
    for f in (root / "dog").iterdir():
        garbage(f)


def missing(root: Path) -> None:
    pass


def a_file(root: Path) -> None:
    root.write_text("not a folder")


def nested_one_level_too_deep(root: Path) -> None:
    make_folder(root / "train")


FOLDER_ERRORS = [
    pytest.param(one_subdirectory, {}, DataError, r"has 1 class \('cat'\): a classifier needs at least two", id="one"),
    pytest.param(
        one_empty_class, {}, DataError, r"2 classes \('cat', 'dog'\) but only 'cat' holds images:", id="empty"
    ),
    pytest.param(hidden_second_class, {}, DataError, r"has 1 class \('cat'\)", id="hidden dir"),
    pytest.param(
        class_of_broken_files,
        {"skip_unreadable": True},
        DataError,
        r"but only 'cat' holds images after skipping unreadable files: .* own subdirectory",
        id="all of a class skipped",
    ),
    pytest.param(missing, {}, SourceMissingError, r"does not exist", id="missing"),
    pytest.param(a_file, {}, SourceMissingError, r"is not a directory", id="a file"),
    pytest.param(
        nested_one_level_too_deep, {}, SourceMissingError, r"no images found .* use folder:.*/train", id="nest"
    ),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "match"), FOLDER_ERRORS)
def test_folder_errors_name_the_folder_and_what_is_in_it(tmp_path, make, kwargs, error, match):
    folder = tmp_path / "my set"
    make(folder)
    with pytest.raises(error, match=match) as caught:
        parts_of(f"folder:{folder}", **kwargs)
    assert str(folder) in str(caught.value)


def test_folder_checks_hold_for_the_eagerly_loaded_source_too(tmp_path):
    from loraplex.data.sources import load_source

    one_subdirectory(tmp_path)
    with pytest.raises(DataError, match=r"has 1 class \('cat'\)"):
        load_source.__wrapped__(f"folder:{tmp_path}", size=SIZE)


def test_an_empty_class_among_others_is_a_warning(tmp_path, caplog):
    make_folder(tmp_path, classes=("a", "b"))
    (tmp_path / "c").mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        parts = parts_of(f"folder:{tmp_path}")
    assert parts["train"].num_classes == 3 and domain_classes(f"folder:{tmp_path}") == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"image folder {tmp_path}: no readable images in 1 of its 3 classes: c"
    ]


# --- any path -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelled",
    ["./set.v2", "set.v2/", "../j.doe/set.v2", "~/set.v2", "{abs}", "sub/../set.v2", "link", "~/a:b/../set.v2"],
)
def test_any_spelling_of_a_folder_path_reads_the_same_folder(tmp_path, monkeypatch, spelled):
    home = tmp_path / "home" / "j.doe"
    folder = make_folder(home / "set.v2", per_class=3)
    (home / "sub").mkdir()
    (home / "a:b").mkdir()
    (home / "link").symlink_to(folder)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)  # relative paths are resolved against the current directory
    name = "folder:" + spelled.format(abs=folder)
    parts = parts_of(name, val=1, test=1)
    assert parts["train"].name == name and domain_classes(name) == 2  # the domain keeps the name it was given
    paths = part_paths(parts)
    assert len(paths) == 6 and all(p.is_absolute() and p.parent.parent == folder for p in paths)
    monkeypatch.chdir(tmp_path)  # workers and later reads do not depend on the directory the run started in
    assert parts["test"].take(torch.arange(1)).shape == (1, SIZE, SIZE, 3)


def test_a_missing_folder_is_reported_resolved_and_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SourceMissingError, match=rf"image folder {tmp_path}/nope \(given as '\./nope'\) does not exist"
    ):
        parts_of("folder:./nope")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(SourceMissingError, match=rf"{tmp_path}/x\.y \(given as '~/x\.y'\)"):
        domain_classes("folder:~/x.y")


# --- mixed sizes and modes ------------------------------------------------------------------------------------------


def flat(mode: str, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int]]:
    """A flat image of ``mode`` and the RGB colour it must read as."""
    if mode == "L":
        return Image.new("L", size, 77), (77, 77, 77)
    if mode == "RGB":
        return Image.new("RGB", size, (10, 200, 30)), (10, 200, 30)
    if mode == "RGBA":
        return Image.new("RGBA", size, (200, 40, 90, 128)), (200, 40, 90)
    if mode == "P":
        image = Image.new("P", size, 3)
        image.putpalette([0, 0, 0] * 3 + [120, 60, 240])
        return image, (120, 60, 240)
    if mode == "LA":
        return Image.new("LA", size, (150, 20)), (150, 150, 150)
    if mode == "I;16":  # 16-bit grey: PIL's own RGB conversion clips it to white
        return Image.fromarray(np.full(size[::-1], 257 * 100, np.uint16)), (100, 100, 100)
    raise ValueError(mode)


MODES = ("L", "RGB", "RGBA", "P", "LA", "I;16")


@pytest.mark.parametrize("augment", [False, True])
def test_mixed_sizes_and_modes_read_as_one_uint8_rgb_shape(tmp_path, augment):
    expected = {}
    for label, cls in enumerate(CLASSES):
        (tmp_path / cls).mkdir()
        for i, mode in enumerate(MODES):
            image, colour = flat(mode, (5 + 7 * i + label, 31 - 4 * i))  # no two of the same size
            path = tmp_path / cls / f"{mode.replace(';', '_')}.png"
            image.save(path)
            assert Image.open(path).mode == mode
            expected[path] = colour
        Image.new("RGB", (40, 12), (90, 90, 200)).save(tmp_path / cls / "wide.jpg", quality=100)
        expected[tmp_path / cls / "wide.jpg"] = (90, 90, 200)
    parts = parts_of(f"folder:{tmp_path}", augment=augment)
    for part in PARTS:
        side = 2 * SIZE if part == "train" and augment else SIZE
        images = parts[part].take(torch.arange(len(parts[part])))
        assert images.dtype == torch.uint8 and images.shape == (len(parts[part]), side, side, 3)
        for path, image in zip(parts[part].paths, images, strict=True):
            colour = torch.tensor(expected[path], dtype=torch.int16)
            assert (image.to(torch.int16) - colour).abs().max() <= (2 if path.suffix == ".jpg" else 0), path.name


# --- videos ---------------------------------------------------------------------------------------------------------

needs_av = pytest.mark.skipif(importlib.util.find_spec("av") is None, reason="PyAV is not installed")


def write_video(path: Path, num_frames: int, codec: str = "mpeg4") -> Path:
    from .test_video import write_video as write  # test_video skips itself without PyAV

    return write(path, num_frames, codec)


def ucf_layout(root: Path) -> list[Path]:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 Archery\n2 Bowling\n")
    train, test, paths = [], [], []
    for label, cls in enumerate(("Archery", "Bowling"), start=1):
        for g in range(4):
            rel = f"{cls}/v_{cls}_g{g:02d}_c01.avi"
            paths.append(write_video(root / "UCF-101" / rel, 6 + g))
            (train.append(f"{rel} {label}") if g < 3 else test.append(rel))
    (lists / "trainlist01.txt").write_text("\n".join(train) + "\n")
    (lists / "testlist01.txt").write_text("\n".join(test) + "\n")
    return paths


def hmdb_layout(root: Path) -> list[Path]:
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    paths = []
    for cls in ("brush_hair", "cartwheel"):
        (splits / f"{cls}_test_split1.txt").write_text(
            "".join(f"{cls}_{n}.avi {k} \n" for n, k in zip("abcd", "1112", strict=True))
        )
        paths += [write_video(root / cls / f"{cls}_{n}.avi", 5 + i) for i, n in enumerate("abcd")]
    return paths


def kinetics_layout(root: Path) -> list[Path]:
    (root / "annotations").mkdir(parents=True)
    header = "label,youtube_id,time_start,time_end,split\n"
    rows = {"train": [], "val": []}
    paths = []
    for label in ("abseiling", "riding a bike"):
        for i, split in enumerate(("train", "train", "train", "val")):
            youtube_id = f"{label[:3]}{i}"
            rows[split].append(f"{label},{youtube_id},{i},{i + 10},{split}\n")
            stem = f"{youtube_id}_{i:06d}_{i + 10:06d}.mp4"
            paths.append(write_video(root / split / label / stem, 5 + i, codec="libx264"))
    for split, lines in rows.items():
        (root / "annotations" / f"{split}.csv").write_text(header + "".join(lines))
    return paths


LAYOUT_MAKERS = {"ucf101": ucf_layout, "hmdb51": hmdb_layout, "kinetics400": kinetics_layout}
BAD_CLIPS = [
    pytest.param(zero_bytes, "empty file (0 bytes)", id="zero-byte"),
    pytest.param(garbage, "Invalid data found when processing input", id="garbage"),
    pytest.param(half, "", id="truncated"),  # the reason depends on the container
]


@needs_av
@pytest.mark.parametrize("layout", list(LAYOUT_MAKERS))
@pytest.mark.parametrize(("damage", "reason"), BAD_CLIPS)
def test_an_unreadable_clip_stops_the_start_or_is_skipped(tmp_path, caplog, layout, damage, reason):
    from loraplex.data.video import count_frames, read_frames

    videos = LAYOUT_MAKERS[layout](tmp_path)
    bad = videos[1]
    damage(bad)
    with pytest.raises(DataError) as caught:
        parts_of(layout, root=str(tmp_path), frames=2)
    assert f"{layout}: cannot read {bad} ({reason}" in str(caught.value)
    assert "data.skip_unreadable: true" in str(caught.value)
    with pytest.raises(DataError, match=rf"cannot read video {bad}: {re.escape(reason)}"):
        count_frames(bad)
    with pytest.raises(DataError, match=rf"cannot decode video {bad}: "):
        read_frames(bad, [0, 1], SIZE)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        parts = parts_of(layout, root=str(tmp_path), frames=2, skip_unreadable=True)
    assert len(lines := skip_lines(caplog)) == 1
    assert lines[0].startswith(f"{layout}: skipped 1 of {len(videos)} files that cannot be read (data.skip_unreadable)")
    assert lines[0].endswith(bad.name)
    used = [parts[p].videos.paths[r] for p in PARTS for r in parts[p].rows]
    assert len(used) == len(videos) - 1 and bad not in used
    for part in PARTS:
        assert parts[part].take(torch.arange(len(parts[part]))).shape == (len(parts[part]), 2, SIZE, SIZE, 3)


@needs_av
@pytest.mark.parametrize(("damage", "reason"), BAD_CLIPS)
def test_a_clip_broken_after_the_start_is_an_error_naming_it_when_decoded(tmp_path, damage, reason):
    videos = ucf_layout(tmp_path)
    parts = parts_of("ucf101", root=str(tmp_path), frames=2)
    test = parts["test"]
    bad = test.videos.paths[test.rows[0]]
    assert bad in videos
    damage(bad)  # the frame count was read at the start: decoding is the first to notice
    with pytest.raises(DataError, match=rf"cannot decode video {bad}: {re.escape(reason)}"):
        test.take(torch.tensor([0]))


@needs_av
def test_a_clip_truncated_after_its_header_fails_at_decode_time_naming_it(tmp_path):
    """The frame count of an AVI is in its header, so a start-up check that reads headers only passes it."""
    from loraplex.data.video import count_frames, read_frames

    clip = write_video(tmp_path / "clip.avi", 12)
    clip.write_bytes(clip.read_bytes()[: int(clip.stat().st_size * 0.9)])
    assert count_frames(clip) == 12
    with pytest.raises(DataError, match=rf"cannot decode video {clip}: Invalid data"):
        read_frames(clip, [0, 6, 11], SIZE)


@needs_av
def test_skipping_every_clip_of_a_class_leaves_too_few_classes(tmp_path):
    videos = ucf_layout(tmp_path)
    for clip in videos[4:]:  # every Bowling clip
        garbage(clip)
    with pytest.raises(DataError, match=r"ucf101 has 2 classes .* but only 'Archery' holds clips after skipping"):
        parts_of("ucf101", root=str(tmp_path), frames=2, skip_unreadable=True)


@needs_av
def test_video_roots_accept_relative_and_home_paths(tmp_path, monkeypatch):
    ucf_layout(tmp_path / "data" / "ucf")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "data")
    for root in ("~/data/ucf", "./ucf", "../data/ucf"):
        parts = parts_of("ucf101", root=root, frames=2)
        assert sum(len(parts[p]) for p in PARTS) == 8
        assert all(p.is_absolute() for p in parts["train"].videos.paths)


@needs_av
def test_frame_counts_are_read_once_at_the_start(tmp_path, monkeypatch):
    from loraplex.data import video as video_module

    ucf_layout(tmp_path)
    parts = parts_of("ucf101", root=str(tmp_path), frames=2)

    def no_counting(path):
        raise AssertionError(f"counted {path} again")

    monkeypatch.setattr(video_module, "count_frames", no_counting)
    for part in PARTS:
        parts[part].take(torch.arange(len(parts[part])), step=3)
        parts[part].resized(4).take(torch.arange(len(parts[part])))


# --- the config key -------------------------------------------------------------------------------------------------


def test_skip_unreadable_is_a_bool_data_key_defaulting_to_false():
    assert DataSection().skip_unreadable is False
    config = from_dict({"data": {"domains": ["digits"], "skip_unreadable": True}})
    assert config.data.skip_unreadable is True
    with pytest.raises(ConfigError, match="skip_unreadable"):
        from_dict({"data": {"domains": ["digits"], "skip_unreadable": "yes"}})
