"""``emoji[-seen|-held]``: colour emoji rendered from Debian's ``fonts-noto-color-emoji``, labelled by Unicode's
own emoji groups.

The emoji list and its two-level structure (9 groups, ~100 sub-groups) come from ``emoji-test.txt`` of Debian's
``unicode-data``; every fully-qualified emoji is rendered once (ZWJ sequences as their single glyph, which needs
Pillow's raqm layout).  Skin-tone variants are left out (a person in five skin tones is one drawing five times) and
so is the ``Component`` group (bare skin tones and hair styles).  That gives 1,870 images.

Sub-groups are split between pre-training and downstream use (:data:`HELD_OUT_SUBGROUPS`): ``emoji-seen`` holds
the others, labelled by sub-group (sub-groups under ``MIN_PER_CLASS`` emoji merged into ``<group>/other``);
``emoji-held`` holds the held-out ones, labelled by **group** — a downstream task about emoji drawings the
backbone never saw, in categories it has to generalise to.  ``emoji`` is everything, by sub-group.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import PRETRAIN_SIZE, ImageSource, SourceMissingError, cache_dir
from .registry import Request, missing, register_source

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
INSTALL = "apt-get update && apt-get install -y fonts-noto-color-emoji unicode-data"
FONT_SIZE = 109  # the font's only bitmap strike (CBDT): any other size fails to load
SKIN_TONES = range(0x1F3FB, 0x1F400)
LEFT_OUT_GROUPS = ("Component",)
MIN_PER_CLASS = 8

HELD_OUT_SUBGROUPS = frozenset(
    {
        "face-affection", "face-neutral-skeptical", "face-unwell", "face-concerned", "cat-face", "heart",
        "hand-fingers-open", "hand-single-finger", "person-gesture", "person-role", "person-activity", "family",
        "animal-mammal", "animal-marine", "animal-bug", "plant-other",
        "food-fruit", "food-prepared", "food-sweet", "drink",
        "place-building", "transport-ground", "transport-air", "sky & weather",
        "event", "sport",
        "clothing", "musical-instrument", "office", "tool",
        "arrow", "zodiac", "geometric", "warning",
    }
)  # fmt: skip
"""About one sub-group in three of every group but Flags (whose 258 country flags would swamp a downstream set),
chosen for being drawable things with at least 9 emoji; ``emoji-held`` has 871 emoji over 8 groups (48 to 207
each), ``emoji-seen`` 995 over 43 classes."""


@dataclass(frozen=True)
class Emoji:
    text: str
    group: str
    subgroup: str


def list_emoji(test_file: str | Path = EMOJI_TEST) -> list[Emoji]:
    """Every fully-qualified emoji of ``emoji-test.txt`` in file order, minus skin tones and components."""
    path = Path(test_file)
    if not path.is_file():
        raise missing("emoji", f"the emoji source needs Unicode's emoji list {path}")
    out, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.partition(":")[2].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.partition(":")[2].strip()
        elif line.strip() and not line.startswith("#"):
            points, _, rest = line.partition(";")
            codes = [int(c, 16) for c in points.split()]
            qualified = rest.partition("#")[0].strip() == "fully-qualified"
            if qualified and group not in LEFT_OUT_GROUPS and not any(c in SKIN_TONES for c in codes):
                out.append(Emoji("".join(map(chr, codes)), group, subgroup))
    return out


def emoji_labels(
    emoji: list[Emoji],
    part: str,
    *,
    held: Collection[str] = HELD_OUT_SUBGROUPS,
    min_per_class: int = MIN_PER_CLASS,
) -> tuple[list[int], list[str], list[int]]:
    """(positions kept, class names, label per kept position) of one part: ``all`` and ``seen`` by sub-group
    (small ones merged into ``<group>/other``, what stays under ``min_per_class`` left out), ``held`` (the
    sub-groups ``held``) by group."""
    if part not in ("all", "seen", "held"):
        raise ValueError(f"emoji part must be all, seen or held, not {part!r}")
    keep = [i for i, e in enumerate(emoji) if part == "all" or (e.subgroup in held) == (part == "held")]
    if part == "held":
        names = [emoji[i].group for i in keep]
    else:
        sizes = Counter(emoji[i].subgroup for i in keep)
        names = [
            emoji[i].subgroup if sizes[emoji[i].subgroup] >= min_per_class else f"{emoji[i].group}/other" for i in keep
        ]
        sizes = Counter(names)  # what is still too small after merging is left out
        kept = [(i, n) for i, n in zip(keep, names, strict=True) if sizes[n] >= min_per_class]
        keep, names = [i for i, _ in kept], [n for _, n in kept]
    classes = sorted(set(names))
    index = {c: k for k, c in enumerate(classes)}
    return keep, classes, [index[n] for n in names]


def render(text: str, size: int) -> np.ndarray:
    """One emoji as uint8 RGB ``[size, size, 3]``: its glyph fitted into the square, centred, on white."""
    from PIL import Image, ImageDraw

    font = _font()
    left, top, right, bottom = font.getbbox(text)
    glyph = Image.new("RGBA", (right - left, bottom - top), (255, 255, 255, 0))
    ImageDraw.Draw(glyph).text((-left, -top), text, font=font, embedded_color=True)
    glyph = glyph.crop(glyph.getbbox() or (0, 0, 1, 1))
    glyph.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(glyph, ((size - glyph.width) // 2, (size - glyph.height) // 2))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def _font():
    from PIL import ImageFont, features

    if not EMOJI_FONT.is_file():
        raise missing("emoji", f"the emoji source needs the font {EMOJI_FONT}")
    if not features.check("raqm"):
        raise SourceMissingError("rendering emoji sequences needs Pillow built with raqm (libraqm + libfribidi)")
    return ImageFont.truetype(str(EMOJI_FONT), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)


def load_emoji(part: str, size: int = 64, cache: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 RGB images ``[N, size, size, 3]``, int64 labels, class names) of one part (see :func:`emoji_labels`).
    Every emoji is rendered once into ``cache`` (an ``.npz``), each part taken from it."""
    emoji = list_emoji()
    if cache is not None and Path(cache).exists():
        with np.load(cache) as f:
            images = f["images"]
    else:
        images = np.stack([render(e.text, size) for e in emoji])
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, images=images)
    keep, classes, labels = emoji_labels(emoji, part)
    return images[keep], np.asarray(labels, dtype=np.int64), classes


@register_source("emoji", parts=True, install=INSTALL)
def load_emoji_source(request: Request) -> ImageSource:
    """Noto colour emoji by Unicode sub-group or group, 64 px RGB on white, rendered once into the cache."""
    images, labels, classes = load_emoji(request.part, PRETRAIN_SIZE, cache=cache_dir() / f"emoji-{PRETRAIN_SIZE}.npz")
    return ImageSource(request.name, torch.from_numpy(images), torch.from_numpy(labels), classes)
