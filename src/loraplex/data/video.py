"""Video datasets in their standard on-disk layouts, decoded with PyAV, sampled TSN-style.

Layouts (``root`` is the dataset's top directory):

* **UCF101** — ``ucfTrainTestlist/classInd.txt`` (``1 ApplyEyeMakeup``), ``trainlist0{1,2,3}.txt``
  (``ApplyEyeMakeup/v_….avi 1``), ``testlist0{1,2,3}.txt`` (``ApplyEyeMakeup/v_….avi``); videos at
  ``root/<Class>/<file>`` or ``root/UCF-101/<Class>/<file>`` (as the official archive unpacks).
* **HMDB51** — split files ``<class>_test_split{1,2,3}.txt`` (``<file>.avi 1``: 1 train, 2 test,
  0 unused) in ``root/testTrainMulti_7030_splits/``, ``root/splits/`` or ``root``; videos at
  ``root/<class>/<file>``.
* **Kinetics-400** — CSV annotations ``label,youtube_id,time_start,time_end,split[,…]`` at
  ``root/annotations/<split>.csv`` or ``root/<split>.csv``; clips named
  ``<youtube_id>_<start:06d>_<end:06d>.mp4`` under ``root/<split>/<label>/`` (the ActivityNet crawler;
  spaces in labels kept or replaced by ``_``) or directly under ``root/<split>/`` (the CVDF archives).

A clip is ``T`` frames from ``T`` equal segments (TSN, Wang et al. 2016): a random frame per segment
in training, each segment's centre in evaluation; the randomness is a function of
``(seed, step, video)`` only.  Clips come back as uint8 ``[T, size, size, 3]``.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .sources import DataError, SourceMissingError, error_reason, keep_readable, require_two_classes
from .stream import DomainData

PYAV_INSTALL = "pip install av"
Split = Literal["train", "test", "val"]
MissingPolicy = Literal["error", "skip"]
MISSING_SHOWN = 3


@dataclass
class VideoList:
    """Labelled video files of one dataset split; ``frame_counts`` once :func:`readable_videos` has read them."""

    name: str
    paths: list[Path]
    labels: list[int]
    classes: list[str]
    frame_counts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.paths)


def _require(path: Path, what: str, how: str) -> Path:
    if not path.exists():
        raise SourceMissingError(f"{what} not found: {path} is missing. {how}")
    return path


def _checked(
    name: str, candidates: list[tuple[list[Path], int]], classes: list[str], missing: MissingPolicy
) -> VideoList:
    """Resolve each entry to the first of its candidate paths that exists; the rest are missing."""
    paths, labels, absent = [], [], []
    for options, label in candidates:
        found = next((p for p in options if p.is_file()), None)
        if found is None:
            absent.append(options[0])
        else:
            paths.append(found)
            labels.append(label)
    if absent and missing == "error":
        shown = ", ".join(str(p) for p in absent[:MISSING_SHOWN]) + (" …" if len(absent) > MISSING_SHOWN else "")
        raise SourceMissingError(
            f"{name}: {len(absent)} of {len(candidates)} videos listed in the split files are missing ({shown}). "
            "Check the dataset root, or pass missing='skip' to use the videos that exist."
        )
    if not paths:
        raise SourceMissingError(f"{name}: none of the {len(candidates)} listed videos exists")
    return VideoList(name, paths, labels, classes)


def ucf101(root: str | Path, split: Split = "train", fold: int = 1, missing: MissingPolicy = "error") -> VideoList:
    """UCF101 (101 classes) from ``ucfTrainTestlist``; ``split`` train or test of fold 1, 2 or 3."""
    root = Path(root)
    _check_fold(fold)
    lists = _require(root / "ucfTrainTestlist", "UCF101 split files", f"Unpack the official split zip into {root}.")
    class_file = _require(lists / "classInd.txt", "UCF101 class index", "It ships in ucfTrainTestlist.")
    numbered = sorted(
        (int(n), name) for n, name in (line.split() for line in class_file.read_text().splitlines() if line.strip())
    )
    classes = [name for _, name in numbered]
    index = {name.lower(): i for i, name in enumerate(classes)}
    listing = lists / f"{'train' if split == 'train' else 'test'}list0{fold}.txt"
    _require(listing, f"UCF101 {split} list of fold {fold}", "It ships in ucfTrainTestlist.")
    video_roots = [root / "UCF-101", root]
    entries = []
    for line in listing.read_text().split("\n"):
        if not line.strip():
            continue
        relative = line.split()[0]
        label = index[relative.split("/")[0].lower()]  # case-insensitive: the lists spell HandstandPushups two ways
        entries.append(([base / relative for base in video_roots], label))
    return _checked(f"ucf101 {split} fold {fold}", entries, classes, missing)


HMDB_SPLIT = re.compile(r"^(?P<cls>.+)_test_split(?P<fold>[123])\.txt$")


def hmdb51(root: str | Path, split: Split = "train", fold: int = 1, missing: MissingPolicy = "error") -> VideoList:
    """HMDB51 (51 classes) from its ``<class>_test_split<fold>.txt`` files (1 train, 2 test, 0 unused)."""
    root = Path(root)
    _check_fold(fold)
    where = [root / "testTrainMulti_7030_splits", root / "splits", root]
    files: dict[str, Path] = {}
    for directory in where:
        if directory.is_dir():
            for f in sorted(directory.iterdir()):
                match = HMDB_SPLIT.match(f.name)
                if match and int(match["fold"]) == fold:
                    files.setdefault(match["cls"], f)
        if files:
            break
    if not files:
        raise SourceMissingError(
            f"HMDB51 split files (<class>_test_split{fold}.txt) not found in any of {[str(d) for d in where]}. "
            "Unpack test_train_splits.rar into the dataset root."
        )
    classes = sorted(files)
    wanted = "1" if split == "train" else "2"
    entries = []
    for label, cls in enumerate(classes):
        for line in files[cls].read_text().split("\n"):
            parts = line.split()
            if len(parts) == 2 and parts[1] == wanted:
                entries.append(([root / cls / parts[0]], label))
    return _checked(f"hmdb51 {split} fold {fold}", entries, classes, missing)


def kinetics400(root: str | Path, split: Split = "train", missing: MissingPolicy = "error") -> VideoList:
    """Kinetics-400 from its CSV annotations; classes are the sorted labels of the training CSV."""
    root = Path(root)
    annotations = [root / "annotations", root]

    def csv_of(name: str) -> Path:
        for directory in annotations:
            if (directory / f"{name}.csv").is_file():
                return directory / f"{name}.csv"
        raise SourceMissingError(
            f"Kinetics annotations {name}.csv not found in {[str(d) for d in annotations]}: "
            "download the CSV files (label,youtube_id,time_start,time_end,split) into root/annotations."
        )

    classes = sorted({row["label"] for row in _rows(csv_of("train"))})
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for row in _rows(csv_of(split)):
        if row["label"] not in index:
            raise ValueError(f"Kinetics {split}.csv has label {row['label']!r} absent from train.csv")
        stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}.mp4"
        label = row["label"]
        options = [root / split / label / stem, root / split / label.replace(" ", "_") / stem, root / split / stem]
        entries.append((options, index[label]))
    return _checked(f"kinetics400 {split}", entries, classes, missing)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"label", "youtube_id", "time_start", "time_end"}
    if rows and not needed <= set(rows[0]):
        raise ValueError(f"{path} lacks the columns {sorted(needed - set(rows[0]))}")
    return rows


def _check_fold(fold: int) -> None:
    if fold not in (1, 2, 3):
        raise ValueError(f"split fold must be 1, 2 or 3, got {fold}")


LAYOUTS = {"ucf101": ucf101, "hmdb51": hmdb51, "kinetics400": kinetics400}


def segment_indices(num_frames: int, frames: int, *, train: bool, rng: np.random.Generator | None = None) -> list[int]:
    """``frames`` indices into a video of ``num_frames``, one per equal segment: random within each
    segment (``train``; needs ``rng``) or at its centre.  Short videos repeat frames."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    indices = []
    for i in range(frames):
        lo = math.floor(i * num_frames / frames)
        hi = max(lo + 1, math.floor((i + 1) * num_frames / frames))
        if train:
            if rng is None:
                raise ValueError("training-time sampling needs an rng")
            indices.append(int(rng.integers(lo, hi)))
        else:
            indices.append(min(int((i + 0.5) * num_frames / frames), num_frames - 1))
    return indices


def _av():
    try:
        import av
    except ImportError as err:
        raise SourceMissingError(f"decoding videos needs PyAV: install it with `{PYAV_INSTALL}`") from err
    return av


def _av_errors(av) -> tuple[type[BaseException], ...]:
    """What PyAV raises for empty, garbage or truncated files (and for a file without a video stream)."""
    return (av.FFmpegError, OSError, ValueError, EOFError, IndexError)


def _frames_in(path: str | Path) -> int:
    av = _av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        count = int(stream.frames) or sum(1 for packet in container.demux(stream) if packet.size)
    if count < 1:
        raise ValueError("no video frames")
    return count


def video_problem(path: str | Path) -> tuple[int, str | None]:
    """``(frames, None)`` for a readable video, ``(0, why)`` for one whose frame count cannot be read."""
    av = _av()
    try:
        return _frames_in(path), None
    except _av_errors(av) as err:
        return 0, error_reason(err, path)


def count_frames(path: str | Path) -> int:
    """Frames of the first video stream: the container's count, or the packets when it has none. A file whose
    count cannot be read (empty, not a video, truncated before its index) is a :class:`DataError` naming it."""
    frames, problem = video_problem(path)
    if problem is not None:
        raise DataError(f"cannot read video {path}: {problem}")
    return frames


def readable_videos(videos: VideoList, *, skip_unreadable: bool = False) -> tuple[VideoList, list[int]]:
    """``videos`` with every frame count read (at start-up, so a corrupt clip stops a run there), and the positions
    kept. A clip whose count cannot be read is a :class:`DataError` naming it, unless ``skip_unreadable`` drops it
    (one warning line, see :func:`~.sources.keep_readable`). Costs an open and a header read per clip (a demux of
    the packets when the container has no frame count); :class:`VideoDomain` then reuses the counts."""
    found = [video_problem(p) for p in videos.paths]
    keep = keep_readable(
        videos.name, videos.paths, [p for _, p in found], skip_unreadable=skip_unreadable, base=_base(videos.paths)
    )
    kept = VideoList(
        videos.name,
        [videos.paths[i] for i in keep],
        [videos.labels[i] for i in keep],
        videos.classes,
        [found[i][0] for i in keep],
    )
    if len(keep) < len(videos):
        labels = torch.tensor(kept.labels, dtype=torch.int64)
        require_two_classes(videos.name, kept.classes, labels, noun="clips", after=" after skipping unreadable clips")
    return kept, keep


def _base(paths: list[Path]) -> Path | None:
    """The directory the paths share, to name skipped files by (None when they share none)."""
    try:
        return Path(os.path.commonpath([p.parent for p in paths])) if paths else None
    except ValueError:  # absolute and relative paths mixed
        return None


def read_frames(path: str | Path, indices: list[int], size: int) -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed) as uint8 ``[len, size, size, 3]``.

    Decoding stops after the last wanted frame; if a container claimed more frames than it holds,
    indices past the end get its last frame. A file that cannot be decoded is a :class:`DataError` naming it."""
    av = _av()
    wanted, stop = set(indices), max(indices)
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            i, frame = -1, None
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    found[i] = _rgb(frame, size)
                if i >= stop:
                    break
            if frame is None:
                raise ValueError("no decodable video frame")
            tail = found[i] if i in found else _rgb(frame, size)
    except _av_errors(av) as err:
        raise DataError(f"cannot decode video {path}: {error_reason(err, path)}") from err
    return np.stack([found.get(j, tail) for j in indices])


def _rgb(frame, size: int) -> np.ndarray:
    return frame.to_ndarray(format="rgb24", width=size, height=size, interpolation="BILINEAR")


class VideoDomain(DomainData):
    """A video dataset as a training domain: clips decoded on demand (``T`` frames, ``size`` px, RGB), never
    all held in memory (a Kinetics split would not fit).

    ``take(rows, step)`` decodes each clip with TSN sampling: centre frames in evaluation
    (``step=None``), random offsets in training drawn from ``(seed, step, video)`` — a function of the
    stream's position only, so a resumed or rank-sharded run decodes exactly the frames an uninterrupted
    one-process run would.  ``images`` is empty: the samples live in the video files.
    """

    on_demand = True

    def __init__(self, name: str, videos: VideoList, rows: list[int], *, frames: int, size: int, seed: int = 0) -> None:
        if frames < 1 or size < 1:
            raise ValueError(f"frames and size must be ≥ 1, got {frames} and {size}")
        labels = torch.tensor([videos.labels[r] for r in rows], dtype=torch.int64)
        super().__init__(name, torch.empty(0, dtype=torch.uint8), labels, len(videos.classes), frames)
        self.videos, self.rows, self.size, self.seed = videos, list(rows), size, seed
        self._counts: dict[int, int] = {}

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.frames, self.size, self.size, 3)

    def frame_indices(self, row: int, step: int | None = None) -> list[int]:
        """The frames clip ``row`` is made of when drawn at training ``step`` (None: evaluation)."""
        video = self.rows[row]
        if video not in self._counts:
            counts = self.videos.frame_counts
            self._counts[video] = counts[video] if counts is not None else count_frames(self.videos.paths[video])
        rng = None if step is None else np.random.default_rng((self.seed, step, video))
        return segment_indices(self._counts[video], self.frames, train=step is not None, rng=rng)

    def take(self, rows: torch.Tensor, step: int | None = None) -> torch.Tensor:
        paths = self.videos.paths
        clips = [read_frames(paths[self.rows[r]], self.frame_indices(r, step), self.size) for r in rows.tolist()]
        return torch.from_numpy(np.stack(clips)) if clips else torch.empty((0, *self.sample_shape), dtype=torch.uint8)

    def resized(self, size: int, channels: int | None = None) -> VideoDomain:
        if channels not in (None, 3):
            raise ValueError("video clips are decoded as RGB")
        return VideoDomain(self.name, self.videos, self.rows, frames=self.frames, size=size, seed=self.seed)
