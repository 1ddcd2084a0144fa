"""``fontdigits[:<per_class>]``: the ten digits typeset in every usable TrueType / OpenType font installed, 28 px
grey, white on black like ``mnist`` — a third, printed, digit domain for domain-heterogeneity runs (one label space
with ``mnist``, handwritten, and ``digits``, 8×8 scans).

Fonts are the ``.ttf`` / ``.otf`` files under ``/usr/share/fonts`` (or the directory ``root`` names), in path order.
A font is used only when each of the ten digits renders as a glyph of its own: fonts that fail to load at an
arbitrary size (bitmap-only colour emoji), lack digits (blank glyphs, or the ``.notdef`` box — "tofu" — of script and
symbol fonts) or map several digits to one glyph are skipped, and so is a font whose ten glyphs are pixel-identical
to an earlier one's (Noto's script families share their Latin digits). :data:`INSTALL`'s packages give about 230.

Each image is one digit of one font (each class cycles through the fonts in its own seeded order, so every font
appears about equally often in every class), drawn with a seeded random stroke thickness, scale, rotation and
shift, then fitted as MNIST was made: the glyph's longer side scaled to about 20 px inside a 28 px square. The default
is :data:`PER_CLASS` images per class (5,000, as many as ``mnist``); all are rendered once (seed 0) into
``~/.cache/loraplex``, keyed by the font list. No official test split: a run carves its splits by seed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .common import ImageSource, cache_dir, log
from .registry import Request, missing, register_source

FONT_ROOT = "/usr/share/fonts"
FONT_SUFFIXES = (".ttf", ".otf")
FONT_PACKAGES = (
    "fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf fonts-urw-base35 fonts-noto-core "
    "fonts-crosextra-carlito fonts-crosextra-caladea fonts-ebgaramond fonts-linuxlibertine fonts-cantarell "
    "fonts-open-sans fonts-lato fonts-hack fonts-comic-neue fonts-sil-gentium fonts-sil-andika fonts-stix "
    "fonts-firacode fonts-inconsolata"
)
INSTALL = f"apt-get update && apt-get install -y {FONT_PACKAGES}"
DIGITS = "0123456789"
SIZE = 28  # mnist's size
BOX = 20  # MNIST fitted each digit into a 20 px box inside its 28 px square
PER_CLASS = 500
RENDER_PX = 64  # glyphs are drawn at this font size, transformed, then reduced to the box
MIN_FONTS = 2
FEW_FONTS = 20  # fewer usable fonts than this is a narrow domain: say so
RENDER_VERSION = 2  # part of the cache key: bump when rendering changes
NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no text font maps: what it draws is the font's .notdef glyph

SCALE = (0.8, 1.1)  # × BOX, the glyph's longer side
ANGLE = 8.0  # degrees, either way
SHIFT = 2  # px, either way, on each axis
STROKES = (0, 1, 2, 3)  # extra outline at RENDER_PX (≈ 0–1 px at the final size): bolder or lighter weights


@dataclass(frozen=True)
class Style:
    """How one image is drawn: its stroke (px at :data:`RENDER_PX`), scale (× :data:`BOX`), rotation (degrees,
    counter-clockwise) and shift (px, x then y)."""

    stroke: int = 0
    scale: float = 1.0
    angle: float = 0.0
    shift: tuple[int, int] = (0, 0)


def font_files(root: str | Path = FONT_ROOT) -> list[Path]:
    """Every ``.ttf`` / ``.otf`` file under ``root``, sorted (hidden ones left out): the candidates, before checks."""
    base = Path(root).expanduser()
    if not base.is_dir():
        return []
    return sorted(
        p
        for p in base.rglob("*")
        if p.suffix.lower() in FONT_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(base).parts)
    )


def _font(path: Path, px: int = RENDER_PX):
    from PIL import ImageFont

    return ImageFont.truetype(str(path), px)


def _glyph(font, text: str, stroke: int = 0) -> np.ndarray | None:
    """``text`` drawn white on black, cropped to its ink; None when it draws nothing."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(image).text((-left, -top), text, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
    ink = image.getbbox()
    return None if ink is None else np.asarray(image.crop(ink))


def _inspect(path: Path) -> tuple[str | None, bytes]:
    """(why the font cannot typeset the ten digits or None, a signature of its ten glyphs)."""
    try:
        font = _font(path)
        glyphs = [_glyph(font, d) for d in DIGITS]
        notdef = _glyph(font, NOTDEF_PROBE)
    except OSError as err:
        return f"does not load ({err})", b""
    if any(g is None for g in glyphs):
        return "has no glyph for some digits", b""
    if notdef is not None and any(g.shape == notdef.shape and np.array_equal(g, notdef) for g in glyphs):
        return "draws some digits as its .notdef box (tofu)", b""
    keys = [_key(g) for g in glyphs]
    if len(set(keys)) < len(DIGITS):
        return "draws several digits with one glyph", b""
    return None, b"".join(keys)


def digit_problem(path: Path) -> str | None:
    """Why a font cannot typeset the ten digits (None when it can): it does not load at :data:`RENDER_PX`, a digit
    draws nothing or the ``.notdef`` box (tofu), or two digits share one glyph."""
    return _inspect(path)[0]


def _key(glyph: np.ndarray) -> bytes:
    return hashlib.sha1(glyph.tobytes() + str(glyph.shape).encode()).digest()


def usable_fonts(paths: Sequence[Path]) -> list[Path]:
    """The fonts of ``paths`` that typeset the ten digits (see :func:`digit_problem`), pixel-identical ones once."""
    kept, seen = [], set()
    for path in paths:
        problem, signature = _inspect(path)
        if problem is None and signature not in seen:
            seen.add(signature)
            kept.append(path)
    log.debug(f"fontdigits: {len(kept)} usable fonts of {len(paths)} (the others lack digits, tofu, or duplicate)")
    return kept


def render_digit(font_path: str | Path, digit: int, style: Style | None = None, *, font=None) -> np.ndarray:
    """One digit as uint8 ``[SIZE, SIZE]``, white on black: drawn at :data:`RENDER_PX` with ``style.stroke``,
    rotated, its longer side scaled to ``style.scale × BOX``, centred and shifted, its brightest pixel stretched to
    255. ``font`` skips reloading the file."""
    from PIL import Image

    style = style or Style()
    glyph = _glyph(font if font is not None else _font(Path(font_path)), DIGITS[digit], style.stroke)
    if glyph is None:
        raise ValueError(f"font {font_path} draws nothing for {digit}")
    image = Image.fromarray(glyph).rotate(style.angle, resample=Image.Resampling.BICUBIC, expand=True)
    image = image.crop(image.getbbox() or (0, 0, 1, 1))
    ratio = style.scale * BOX / max(image.size)
    fitted = (max(1, round(image.width * ratio)), max(1, round(image.height * ratio)))
    image = image.resize(fitted, Image.Resampling.LANCZOS)
    canvas = Image.new("L", (SIZE, SIZE), 0)
    x = (SIZE - image.width) // 2 + style.shift[0]
    y = (SIZE - image.height) // 2 + style.shift[1]
    canvas.paste(image, (x, y))
    out = np.asarray(canvas, dtype=np.float32)
    # a hairline weight fades to grey once reduced: stretch every digit to full white, as MNIST's strokes are
    return np.rint(out * (255.0 / max(out.max(), 1.0))).astype(np.uint8)


def draw_style(rng: np.random.Generator) -> Style:
    """A seeded random :class:`Style` within :data:`STROKES`, :data:`SCALE`, :data:`ANGLE` and :data:`SHIFT`."""
    return Style(
        stroke=int(rng.choice(STROKES)),
        scale=float(rng.uniform(*SCALE)),
        angle=float(rng.uniform(-ANGLE, ANGLE)),
        shift=(int(rng.integers(-SHIFT, SHIFT + 1)), int(rng.integers(-SHIFT, SHIFT + 1))),
    )


def make_font_digits(
    fonts: Sequence[Path], per_class: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images ``[10 · per_class, SIZE, SIZE]``, int64 labels, int64 font index per image), class by class.
    Class ``d`` takes the fonts in a seeded order of its own, cycling when ``per_class`` exceeds the font count."""
    if not fonts or per_class < 1:
        raise ValueError(f"need at least one font and one image per class, got {len(fonts)} fonts, {per_class}")
    rng = np.random.default_rng(seed)
    loaded = [_font(Path(p)) for p in fonts]
    images = np.empty((len(DIGITS) * per_class, SIZE, SIZE), dtype=np.uint8)
    which = np.empty(len(images), dtype=np.int64)
    for digit in range(len(DIGITS)):
        order = np.resize(rng.permutation(len(fonts)), per_class)
        for j, f in enumerate(order.tolist()):
            n = digit * per_class + j
            images[n] = render_digit(fonts[f], digit, draw_style(rng), font=loaded[f])
            which[n] = f
    labels = np.repeat(np.arange(len(DIGITS), dtype=np.int64), per_class)
    return images, labels, which


def fonts_key(paths: Sequence[Path]) -> str:
    """A short key of a font list (paths and sizes): a cache holds what one set of installed fonts gave."""
    text = "\n".join(f"{p}\t{p.stat().st_size}" for p in paths)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _per_class(argument: str | None) -> int:
    """The ``<per_class>`` of ``fontdigits:<per_class>`` (default :data:`PER_CLASS`)."""
    if argument is None:
        return PER_CLASS
    if not argument.isdigit() or int(argument) < 1:
        raise ValueError(f"source 'fontdigits:{argument}': expected fontdigits:<images per class>, e.g. fontdigits:200")
    return int(argument)


def _classes(argument: str | None) -> int:
    _per_class(argument)
    return len(DIGITS)


@register_source("fontdigits", argument="<per_class>", optional=True, classes=_classes, install=INSTALL)
def load_fontdigits(request: Request) -> ImageSource:
    """`request.root` is the font directory (default :data:`FONT_ROOT`). Rendered once into the cache."""
    per_class = _per_class(request.argument)
    root = Path(request.root or FONT_ROOT).expanduser()
    candidates = font_files(root)
    cache = cache_dir() / f"fontdigits-{per_class}x{SIZE}-v{RENDER_VERSION}-{fonts_key(candidates)}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    else:
        fonts = usable_fonts(candidates)
        if len(fonts) < MIN_FONTS:
            raise missing(
                "fontdigits",
                f"fontdigits found {len(fonts)} font(s) that typeset the ten digits under {root} "
                f"({len(candidates)} .ttf/.otf files); it needs at least {MIN_FONTS}",
            )
        if len(fonts) < FEW_FONTS:
            log.warning(f"fontdigits: only {len(fonts)} usable fonts under {root}; for more, `{INSTALL}`")
        images, labels, _ = make_font_digits(fonts, per_class, seed=0)
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
        np.savez(partial, images=images, labels=labels)
        os.replace(partial, cache)  # whole or absent: a killed render leaves no half cache
    return ImageSource(request.name, torch.from_numpy(images), torch.from_numpy(labels), list(DIGITS))
