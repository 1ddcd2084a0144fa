"""From a domain name in a run config to its train / val / test :class:`DomainData`.

Kinds of domain, told apart by name once per name (:func:`domain_kind` picks the first of :data:`KINDS` that
takes it; each kind says whether it is clips, its class count, how its parts are built and its dense targets):

* an image source (``fashion``, ``mnist``, ``digits``, ``folder:<path>`` …, see :mod:`.sources`); a folder (a kind
  of its own in :data:`KINDS`) is split from its labels alone and its parts decode their files on demand, at the
  run's input size.  The path may be relative (to the current directory), start with ``~``, contain dots; every
  file is checked to be readable first (:func:`~.sources.readable_folder`);
* the continual-learning papers' sets, read from ``data.roots``: ``cifar100`` / ``cifar10`` (image sources, the
  binary distribution with its official test split), ``imagenet_r`` (a folder of 200 classes without a test split:
  :data:`~.sources.imagenet_r.IMAGENET_R_TEST` of it held out by seed) and ``domainnet:<domain>`` (its files listed
  by the official train / test lists, every one checked to exist); the last two decoded on demand;
* ``vtab:<task>`` / ``vtab:<task>:final`` — a VTAB-1K task (benchmarks.md #5) from ``data.roots.vtab``, each part
  drawn from the list its protocol step names (:data:`~.sources.vtab.PROTOCOLS`), never re-split; every listed file
  checked to exist, decoded on demand;
* ``motion:<image source>`` — the offline video benchmark (benchmarks.md #2): clips in which an image
  of the source moves along one of :data:`~.motion.PATTERNS`, the pattern being the class.  The
  source's images are split first (stratified), and each part's clips are made from that part's images
  only, so no image appears in two splits; a part has as many clips as it has images;
* ``scenes`` — the dense multi-task benchmark (benchmarks.md #3, :mod:`.scenes`): fashion and mnist are
  split first and each part's scenes are made from that part's items; a part has as many scenes as
  the counts say; labels are the packed dense targets;
* ``pascal_context`` — PASCAL-Context in the PASCAL_MT layout (:mod:`.pascal`, MTLoRA's data) from
  ``data.roots.pascal_context``: test is the official val list (what the papers report on), validation
  a seeded draw from the train list; decoded on demand at the run's input size (every file checked
  to exist up front);
* a video dataset in its standard layout (``ucf101``, ``hmdb51``, ``kinetics400``; ``ucf101:2`` picks
  split fold 2), read from ``data.roots[<name>]`` and decoded on demand.  Test is the official test list
  (Kinetics: ``val.csv``, the set results are reported on); validation is carved from the training list.
  Every listed clip's frame count is read first (:func:`~.video.readable_videos`).

Unreadable image files and clips are an error naming the first; with ``skip_unreadable`` they are left out
before splitting, with a one-line warning on the ``loraplex.data`` logger.

Clips need ``frames``; images refuse it.  Augmentation is refused for clips: flips and crops change what
a motion means (a flipped left-to-right clip is a right-to-left one).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .motion import PATTERNS, motion_clips
from .pascal import PASCAL_NAME, PASCAL_TASKS, PascalDomain, pascal_domain, pascal_ids, pascal_target
from .scenes import SCENE_TASKS, dense_scenes, scene_target
from .sources import (
    FOLDER_PREFIX,
    KNOWN_CLASSES,
    FolderDomain,
    ImageSource,
    SourceMissingError,
    folder_path,
    load_source,
    num_classes,
    readable_folder,
)
from .sources.domainnet import DOMAINNET, domainnet_classes, domainnet_files
from .sources.domainsets import DOMAIN_SET_TEST, DOMAIN_SETS, domain_set_classes, domain_set_files
from .sources.imagenet_r import IMAGENET_R, IMAGENET_R_TEST, imagenet_r_files
from .sources.medmnist import MEDMNIST, medmnist_classes
from .sources.vtab import VTAB, VTAB_LISTS, protocol_lists, vtab_classes, vtab_files
from .splits import Splits, class_balanced, split
from .stream import DomainData
from .video import LAYOUTS, VideoDomain, VideoList, readable_videos

MOTION_PREFIX = "motion:"
PARTS = ("train", "val", "test")
TEST_LIST = {"ucf101": "test", "hmdb51": "test", "kinetics400": "val"}


SCENES = "scenes"
PASCAL = PASCAL_NAME
SCENE_SOURCES = (("fashion", 1), ("mnist", 11))  # item source, its first semseg class id

Counts = dict[str, int | float | None]


@dataclass(frozen=True)
class Ask:
    """What :func:`domain_parts` was asked, for a kind's parts builder."""

    name: str
    root: str | None
    seed: int
    counts: Counts
    size: int
    frames: int | None
    augment: bool
    class_balance: float
    skip_unreadable: bool


@dataclass(frozen=True)
class DomainKind:
    """One kind of domain: which names it takes, whether its samples are clips, its class count (None: a dense
    multi-task dataset, whose ``targets`` are how packed targets unpack into one task's and the tasks it has), and
    how its train / val / test parts are built."""

    name: str
    takes: Callable[[str], bool]
    parts: Callable[[Ask], dict[str, DomainData]]
    classes: Callable[[str], int] | None = None
    clips: bool = False
    targets: tuple[Callable, tuple[str, ...]] | None = None


def is_clip_domain(name: str) -> bool:
    return domain_kind(name).clips


def domain_classes(name: str) -> int:
    """Class count of a domain without loading its data when the name tells it."""
    kind = domain_kind(name)
    if kind.classes is None:
        raise ValueError(f"{name!r} is a dense multi-task dataset: its heads are per task, not per class")
    return kind.classes(name)


def domain_parts(
    name: str,
    *,
    root: str | None,
    seed: int,
    train: int | None,
    val: int | float,
    test: int | None,
    size: int,
    frames: int | None = None,
    augment: bool = False,
    class_balance: float = 0.0,
    skip_unreadable: bool = False,
) -> dict[str, DomainData]:
    """Deterministic, stratified ``{"train", "val", "test"}`` of one domain, at ``size`` px.

    Training images are kept at twice ``size`` when ``augment`` is on, so random crops keep their detail.
    ``skip_unreadable`` (``data.skip_unreadable``) leaves out the image files and video clips that cannot be read
    instead of stopping at the first with a :class:`~.sources.DataError`; it has no effect on other sources."""
    kind = domain_kind(name)
    if kind.clips and frames is None:
        raise ValueError(f"domain {name!r} is made of clips: set data.frames (e.g. 8)")
    if not kind.clips and frames is not None:
        raise ValueError(
            f"data.frames is set but domain {name!r} is an image source; use motion:{name} for moving-image clips"
        )
    if kind.clips and augment:
        raise ValueError("data.augment is for images: flips and crops change what a clip's motion means")
    counts = {"train": train, "val": val, "test": test}
    return kind.parts(Ask(name, root, seed, counts, size, frames, augment, class_balance, skip_unreadable))


def _in_memory(ask: Ask, source: ImageSource) -> Callable[[torch.Tensor, int], DomainData]:
    def part_domain(index: torch.Tensor, size: int) -> DomainData:
        return DomainData(ask.name, source.images[index], source.labels[index], len(source.classes)).resized(size)

    return part_domain


def _image_parts(ask: Ask) -> dict[str, DomainData]:
    source = load_source(ask.name, root=ask.root)
    return _split_parts(ask, source, _in_memory(ask, source))


def _folder_parts(ask: Ask) -> dict[str, DomainData]:
    spec = ask.name.removeprefix(FOLDER_PREFIX)
    return _file_parts(ask, *readable_folder(spec, skip_unreadable=ask.skip_unreadable))


def _domain_set_parts(ask: Ask) -> dict[str, DomainData]:
    """A domain of VLCS / Office-Home: its folder under the dataset's root, parted as a folder is (without
    ``test_per_domain``, :data:`~.sources.domainsets.DOMAIN_SET_TEST` of it is the test part)."""
    classes, paths, labels = domain_set_files(ask.name, ask.root, skip_unreadable=ask.skip_unreadable)
    return _file_parts(_held_out(ask, DOMAIN_SET_TEST, len(labels)), classes, paths, labels)


def _imagenet_r_parts(ask: Ask) -> dict[str, DomainData]:
    """ImageNet-R's class folders, parted as a folder is (without ``test_per_domain``,
    :data:`~.sources.imagenet_r.IMAGENET_R_TEST` of it is the test part: the papers' 80 / 20)."""
    classes, paths, labels = imagenet_r_files(ask.root, skip_unreadable=ask.skip_unreadable)
    return _file_parts(_held_out(ask, IMAGENET_R_TEST, len(labels)), classes, paths, labels)


def _domainnet_parts(ask: Ask) -> dict[str, DomainData]:
    """A DomainNet domain's listed files, its test list the official test split."""
    files = domainnet_files(ask.name, ask.root, skip_unreadable=ask.skip_unreadable)
    return _file_parts(ask, files.classes, files.paths, files.labels, files.official_test)


def _vtab_parts(ask: Ask) -> dict[str, DomainData]:
    """A VTAB-1K task, each part from its own list (:func:`~.sources.vtab.protocol_lists`): all of it, or a
    stratified seeded draw of the count asked; a val fraction is of the train list's size, drawn from the val list
    and capped at all of it (as for MedMNIST's own splits)."""
    files = vtab_files(ask.name, ask.root, skip_unreadable=ask.skip_unreadable)
    lists = protocol_lists(ask.name)
    source = ImageSource(ask.name, torch.empty(0, dtype=torch.uint8), files.labels, files.classes)
    pools = {part: torch.nonzero(files.listed == VTAB_LISTS.index(lists[part])).flatten() for part in PARTS}
    rows = {}
    for k, part in enumerate(PARTS):
        pool, count = pools[part], ask.counts[part]
        n = min(round(count * len(pools["train"])), len(pool)) if isinstance(count, float) else count
        if n is not None and n > len(pool):
            whole = "" if part == "val" else f" (data.{part}_per_domain: null takes all of it)"
            raise ValueError(
                f"asked for {n} {part} images of {ask.name}; its {part} list {lists[part]}.txt has {len(pool)}{whole}"
            )
        if n is not None and n < len(pool):
            pool_source = dataclasses.replace(source, labels=files.labels[pool])
            pool = pool[split(pool_source, seed=_part_seed(ask.seed, k), train=n, val=0, test=0).train]
        rows[part] = pool

    def part_domain(index: torch.Tensor, size: int) -> DomainData:
        return FolderDomain(
            ask.name, [files.paths[i] for i in index.tolist()], files.labels[index], len(files.classes), size
        )

    return _built_parts(ask, source, Splits(**rows), part_domain)


def _held_out(ask: Ask, share: float, total: int) -> Ask:
    """``ask`` with ``share`` of the ``total`` images as its test count when none is given: a dataset without an
    official test split holds out a fixed share (stratified, seeded)."""
    if ask.counts["test"] is not None:
        return ask
    return dataclasses.replace(ask, counts={**ask.counts, "test": round(share * total)})


def _file_parts(
    ask: Ask, classes: list[str], paths: list, labels: torch.Tensor, official_test: torch.Tensor | None = None
) -> dict[str, DomainData]:
    """Image files split by seed from their labels alone (and ``official_test``, the files of the dataset's own test
    split, when it has one); each part decodes its files on demand."""
    source = ImageSource(ask.name, torch.empty(0, dtype=torch.uint8), labels, classes, official_test)

    def part_domain(index: torch.Tensor, size: int) -> DomainData:
        return FolderDomain(ask.name, [paths[i] for i in index.tolist()], labels[index], len(classes), size)

    return _split_parts(ask, source, part_domain)


def _split_parts(
    ask: Ask, source: ImageSource, part_domain: Callable[[torch.Tensor, int], DomainData]
) -> dict[str, DomainData]:
    return _built_parts(ask, source, split(source, seed=ask.seed, **ask.counts), part_domain)


def _built_parts(
    ask: Ask, source: ImageSource, parts: Splits, part_domain: Callable[[torch.Tensor, int], DomainData]
) -> dict[str, DomainData]:
    out = {}
    for part in PARTS:
        index = getattr(parts, part)
        if part == "train" and ask.class_balance > 0:
            index = index[class_balanced(source.labels[index], ask.class_balance)]
        out[part] = part_domain(index, 2 * ask.size if part == "train" and ask.augment else ask.size)
    return out


def _medmnist_parts(ask: Ask) -> dict[str, DomainData]:
    """A MedMNIST set with the file's own splits: each part drawn from that split (all of it, or a stratified seeded
    draw of the count asked), never re-split. A val fraction is of the training split, as elsewhere, drawn from the
    file's val split and capped at all of it (0.2 and above: the whole val split of every 2D set)."""
    source = load_source(ask.name, root=ask.root)
    official = {"val": source.official_val, "test": source.official_test}
    official["train"] = ~(official["val"] | official["test"])
    rows = {}
    for k, part in enumerate(PARTS):
        pool = torch.nonzero(official[part]).flatten()
        count = ask.counts[part]
        n = min(round(count * int(official["train"].sum())), len(pool)) if isinstance(count, float) else count
        if n is not None and n > len(pool):
            raise ValueError(f"asked for {n} {part} images of {ask.name}; its official {part} split has {len(pool)}")
        if n is not None and n < len(pool):
            pool_source = ImageSource(ask.name, source.images[:0], source.labels[pool], source.classes)
            pool = pool[split(pool_source, seed=_part_seed(ask.seed, k), train=n, val=0, test=0).train]
        rows[part] = pool
    return _built_parts(ask, source, Splits(**rows), _in_memory(ask, source))


def _part_seed(seed: int, part: int) -> int:
    return int(np.random.SeedSequence((seed, part)).generate_state(1)[0])


def _motion_parts(ask: Ask) -> dict[str, DomainData]:
    source = load_source(ask.name.removeprefix(MOTION_PREFIX), root=ask.root)
    if source.images.dim() != 3:
        raise ValueError(f"{ask.name}: motion clips move grey images, and {source.name} is RGB")
    parts = split(source, seed=ask.seed, **ask.counts)
    out = {}
    for k, part in enumerate(PARTS):
        index = getattr(parts, part)
        clips = motion_clips(
            source.images[index],
            len(index),
            frames=ask.frames,
            canvas=ask.size,
            item=ask.size // 2,
            seed=_part_seed(ask.seed, k),
        )
        out[part] = DomainData(ask.name, clips.clips, clips.labels, len(PATTERNS), ask.frames)
    return out


def _scene_parts(ask: Ask) -> dict[str, DomainData]:
    counts = ask.counts
    if any(counts[part] is None or isinstance(counts[part], float) for part in PARTS):
        raise ValueError("scenes are generated: give data.train_per_domain, val_per_domain, test_per_domain as counts")
    sources = [(load_source(name), first) for name, first in SCENE_SOURCES]
    splits = [(source, first, split(source, seed=ask.seed, **counts)) for source, first in sources]
    out = {}
    for k, part in enumerate(PARTS):
        pools = [(src.images[getattr(s, part)], src.labels[getattr(s, part)] + first) for src, first, s in splits]
        scenes = dense_scenes(pools, int(counts[part]), size=ask.size, seed=_part_seed(ask.seed, k))
        out[part] = DomainData(SCENES, scenes.images, scenes.targets, 0)
    return out


def _pascal_parts(ask: Ask) -> dict[str, DomainData]:
    root, counts, size = ask.root, ask.counts, ask.size
    if root is None:
        raise SourceMissingError(
            f"{PASCAL} reads PASCAL_MT from disk: set data.roots.{PASCAL} "
            f"(e.g. --set data.roots.{PASCAL}=/data/PASCAL_MT)"
        )
    pool = len(pascal_ids(root, "train"))
    n_val = round(counts["val"] * pool) if isinstance(counts["val"], float) else int(counts["val"])
    n_train = pool - n_val if counts["train"] is None else int(counts["train"])
    if n_train + n_val > pool:
        raise ValueError(f"asked for {n_train} train + {n_val} val images of {PASCAL}; its train list has {pool}")
    ids = pascal_ids(root, "train")
    order = np.random.default_rng(ask.seed).permutation(pool)
    val_rows, train_rows = np.sort(order[:n_val]), np.sort(order[n_val : n_val + n_train])
    return {
        "train": PascalDomain(root, [ids[r] for r in train_rows], size),
        "val": PascalDomain(root, [ids[r] for r in val_rows], size),
        "test": pascal_domain(root, "val", size, limit=counts["test"]),
    }


def _layout(name: str) -> tuple[str, int]:
    """``("ucf101", 2)`` for ``ucf101:2``; other names (``folder:<path>``, ``fractals:…``) pass through."""
    layout, _, fold = name.partition(":")
    if layout not in LAYOUTS:
        return name, 1
    if fold and not fold.isdigit():
        raise ValueError(f"domain {name!r}: the part after ':' is a split fold (1, 2 or 3)")
    return layout, int(fold or 1)


def _video_parts(ask: Ask) -> dict[str, DomainData]:
    name, root = ask.name, ask.root
    layout, fold = _layout(name)
    if root is None:
        raise SourceMissingError(
            f"domain {name!r} reads the dataset from disk: set data.roots.{name} to its directory "
            f"(e.g. --set data.roots.{name}=/data/{layout})"
        )
    load = LAYOUTS[layout]
    folded = {} if layout == "kinetics400" else {"fold": fold}
    root = str(folder_path(root))
    train_list, test_list = load(root, "train", **folded), load(root, TEST_LIST[layout], **folded)
    listed = VideoList(
        name, train_list.paths + test_list.paths, train_list.labels + test_list.labels, train_list.classes
    )
    videos, kept = readable_videos(listed, skip_unreadable=ask.skip_unreadable)
    labels = torch.tensor(videos.labels, dtype=torch.int64)
    official_test = torch.tensor(kept, dtype=torch.int64) >= len(train_list)
    as_source = ImageSource(name, torch.empty(0, dtype=torch.uint8), labels, videos.classes, official_test)
    parts: Splits = split(as_source, seed=ask.seed, **ask.counts)
    return {
        part: VideoDomain(name, videos, getattr(parts, part).tolist(), frames=ask.frames, size=ask.size, seed=ask.seed)
        for part in PARTS
    }


def _video_classes(name: str) -> int:
    return KNOWN_CLASSES[_layout(name)[0]]


KINDS = (
    DomainKind(SCENES, lambda name: name == SCENES, _scene_parts, targets=(scene_target, SCENE_TASKS)),
    DomainKind(PASCAL, lambda name: name == PASCAL, _pascal_parts, targets=(pascal_target, PASCAL_TASKS)),
    DomainKind(
        "motion", lambda name: name.startswith(MOTION_PREFIX), _motion_parts, lambda _: len(PATTERNS), clips=True
    ),
    DomainKind("video", lambda name: _layout(name)[0] in LAYOUTS, _video_parts, _video_classes, clips=True),
    DomainKind("folder", lambda name: name.startswith(FOLDER_PREFIX), _folder_parts, num_classes),
    DomainKind("domain set", lambda name: name.partition(":")[0] in DOMAIN_SETS, _domain_set_parts, domain_set_classes),
    DomainKind(IMAGENET_R, lambda name: name == IMAGENET_R, _imagenet_r_parts, num_classes),
    DomainKind(
        DOMAINNET,
        lambda name: name.partition(":")[0] == DOMAINNET,
        _domainnet_parts,
        lambda name: domainnet_classes(name.partition(":")[2]),
    ),
    DomainKind(
        VTAB,
        lambda name: name.partition(":")[0] == VTAB,
        _vtab_parts,
        lambda name: vtab_classes(name.partition(":")[2]),
    ),
    DomainKind(
        "medmnist",
        lambda name: name.partition(":")[0] == MEDMNIST,
        _medmnist_parts,
        lambda name: medmnist_classes(name.partition(":")[2] or None),
    ),
    DomainKind("image source", lambda name: True, _image_parts, num_classes),
)
"""In the order names are tried: the first kind that takes a name is its kind (any other name is an image source)."""
DENSE_DOMAINS = tuple(kind.name for kind in KINDS if kind.targets is not None)


@functools.cache
def domain_kind(name: str) -> DomainKind:
    """The kind of a domain name, found once per name (a video name with a bad fold is a ValueError)."""
    return next(kind for kind in KINDS if kind.takes(name))


def dense_target_fn(name: str):
    """How a dense domain's packed targets unpack into one task's target, and the tasks it has."""
    targets = domain_kind(name).targets
    if targets is None:
        raise ValueError(f"{name!r} is not a dense multi-task dataset; use one of {list(DENSE_DOMAINS)}")
    return targets
