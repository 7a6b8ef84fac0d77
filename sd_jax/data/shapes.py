"""Synthetic captioned "shapes" dataset.

Every example is a pure function of ``(seed, index, size, split, max_shapes)``:
``sample(seed, index)`` derives its own ``numpy.random.Generator`` from
``(seed, index)`` so examples can be produced in any order, on any worker, and a
resumed training run sees exactly the same data.

An image holds one (optionally two) filled shape(s) -- circle, square or
triangle -- in a named colour, small or large, at one of nine positions, on a
solid background of another named colour.  Shapes are drawn with PIL at 4x the
target resolution and downsampled, so edges are anti-aliased.

Captions are plain English, e.g. ``"a small red circle at the top left on a
blue background"``; the phrasing varies (size, position or background are
sometimes left out, the sentence template changes) so that a model learns each
word on its own.  ``parse_prompt`` reads such a caption back into labels.

Colour/shape combinations in ``HELD_OUT`` never appear in the ``train`` split;
the ``heldout`` split shows only them, ``all`` shows everything.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "POSITIONS",
    "SIZES",
    "HELD_OUT",
    "SPLITS",
    "sample",
    "batch",
    "caption_for",
    "parse_prompt",
    "position_name",
    "vocabulary",
]

# Named colours, chosen far apart in RGB (smallest pairwise distance ~110).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 15, 15),
    "orange": (255, 130, 0),
    "yellow": (255, 240, 0),
    "green": (0, 170, 0),
    "blue": (20, 40, 230),
    "purple": (140, 20, 190),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Position name -> (x, y) centre as a fraction of the image (y grows downwards).
_LO, _MID, _HI = 0.28, 0.5, 0.72
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (_LO, _LO),
    "top": (_MID, _LO),
    "top right": (_HI, _LO),
    "left": (_LO, _MID),
    "center": (_MID, _MID),
    "right": (_HI, _MID),
    "bottom left": (_LO, _HI),
    "bottom": (_MID, _HI),
    "bottom right": (_HI, _HI),
}

# Size name -> half extent of the shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.12, "large": 0.21}

# (colour, shape) pairs never shown by the "train" split.  Each shape is held
# out in at least one colour and every colour involved is seen with the other
# shapes, so a model can only get these right by composing words.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("green", "triangle"),
    ("purple", "circle"),
    ("yellow", "square"),
    ("orange", "triangle"),
)

SPLITS = ("train", "heldout", "all")

_SIZE_JITTER = 0.08  # relative
_POS_JITTER = 0.025  # fraction of the image side
_SUPERSAMPLE = 4
_GAP = 0.03  # min distance between two shapes' boxes (fraction of the side)

_TRAIN_COMBOS = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT]
_ALL_COMBOS = [(c, s) for c in COLORS for s in SHAPES]


def _combos(split: str) -> list[tuple[str, str]]:
    if split == "train":
        return _TRAIN_COMBOS
    if split == "heldout":
        return list(HELD_OUT)
    if split == "all":
        return _ALL_COMBOS
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _rng(seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([int(seed), int(index)])


# Pairs of positions far enough apart that two large shapes never overlap.
def _far(a: str, b: str) -> bool:
    (ax, ay), (bx, by) = POSITIONS[a], POSITIONS[b]
    return max(abs(ax - bx), abs(ay - by)) > 0.4


_POSITION_PAIRS = [(a, b) for a in POSITIONS for b in POSITIONS if _far(a, b)]


# --------------------------------------------------------------------------- labels


def _sample_labels(rng: np.random.Generator, split: str, max_shapes: int) -> dict[str, Any]:
    if max_shapes not in (1, 2):
        raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
    combos = _combos(split)
    n = 1 if max_shapes == 1 else int(rng.integers(1, 3))
    if n == 1:
        positions = [list(POSITIONS)[int(rng.integers(len(POSITIONS)))]]
    else:
        positions = list(_POSITION_PAIRS[int(rng.integers(len(_POSITION_PAIRS)))])
    objects = []
    for pos in positions:
        color, shape = combos[int(rng.integers(len(combos)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        objects.append({"color": color, "shape": shape, "size": size, "position": pos})
    used = {o["color"] for o in objects}
    bg_choices = [c for c in COLORS if c not in used]
    background = bg_choices[int(rng.integers(len(bg_choices)))]
    labels: dict[str, Any] = {
        "objects": objects,
        "background": background,
        # Caption style (see caption_for).
        "template": int(rng.integers(len(_TEMPLATES))),
        "mention_size": bool(rng.random() >= 0.25),
        "mention_position": bool(rng.random() >= 0.25),
        "mention_background": bool(rng.random() >= 0.15),
    }
    # Convenience copies of the first object's labels at the top level.
    labels.update(objects[0])
    return labels


# --------------------------------------------------------------------------- captions

_POSITION_PHRASES = {
    "top left": "at the top left",
    "top right": "at the top right",
    "bottom left": "at the bottom left",
    "bottom right": "at the bottom right",
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
}

# {objs}: object phrases joined with "and"; {bg}: background colour.
_TEMPLATES = (
    "{objs} on {a_bg} {bg} background",
    "{a_bg} {bg} background with {objs}",
    "{objs}, {bg} background",
    "an image of {objs} on {a_bg} {bg} background",
)
_NO_BG_TEMPLATES = ("{objs}", "an image of {objs}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _object_phrase(obj: dict[str, Any], size: bool, position: bool) -> str:
    words = ([obj["size"]] if size else []) + [obj["color"], obj["shape"]]
    phrase = f"{_article(words[0])} {' '.join(words)}"
    if position:
        phrase += " " + _POSITION_PHRASES[obj["position"]]
    return phrase


def caption_for(labels: dict[str, Any]) -> str:
    """The caption of an example from its labels (as returned by ``sample``).

    Style keys (``template``, ``mention_size``, ``mention_position``,
    ``mention_background``) are optional; without them the full canonical
    caption is produced.  Labels may give either ``objects`` (a list of dicts
    with color/shape/size/position) or those keys at the top level.
    """
    objects = labels.get("objects") or [
        {k: labels[k] for k in ("color", "shape", "size", "position")}
    ]
    size = labels.get("mention_size", True)
    position = labels.get("mention_position", True)
    objs = " and ".join(_object_phrase(o, size, position) for o in objects)
    template = int(labels.get("template", 0))
    if labels.get("mention_background", True):
        bg = labels["background"]
        return _TEMPLATES[template % len(_TEMPLATES)].format(objs=objs, bg=bg, a_bg=_article(bg))
    return _NO_BG_TEMPLATES[template % len(_NO_BG_TEMPLATES)].format(objs=objs)


# --------------------------------------------------------------------------- drawing


def _geometry(labels: dict[str, Any], rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, h) per object, as fractions of the image side, with jitter.

    With two objects the jitter is re-drawn until their bounding boxes are at
    least ``_GAP`` apart (falling back to no jitter), so shapes never touch.
    """
    def draw_once(jitter: bool) -> list[tuple[float, float, float]]:
        geo = []
        for obj in labels["objects"]:
            sj = rng.uniform(-_SIZE_JITTER, _SIZE_JITTER) if jitter else 0.0
            px, py = rng.uniform(-_POS_JITTER, _POS_JITTER, size=2) if jitter else (0.0, 0.0)
            fx, fy = POSITIONS[obj["position"]]
            geo.append((fx + px, fy + py, SIZES[obj["size"]] * (1.0 + sj)))
        return geo

    def apart(geo: list[tuple[float, float, float]]) -> bool:
        for i in range(len(geo)):
            for j in range(i):
                (ax, ay, ah), (bx, by, bh) = geo[i], geo[j]
                if max(abs(ax - bx), abs(ay - by)) - ah - bh < _GAP:
                    return False
        return True

    for _ in range(20):
        geo = draw_once(True)
        if len(geo) == 1 or apart(geo):
            return geo
    return draw_once(False)


def _draw(labels: dict[str, Any], rng: np.random.Generator, size: int) -> np.ndarray:
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLORS[labels["background"]])
    draw = ImageDraw.Draw(img)
    for obj, (fx, fy, fh) in zip(labels["objects"], _geometry(labels, rng)):
        cx, cy, h = fx * big, fy * big, fh * big
        fill = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif obj["shape"] == "square":
            s = 0.9 * h
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif obj["shape"] == "triangle":  # isosceles, pointing up
            t = 0.9 * h
            draw.polygon([(cx, cy - t), (cx + h, cy + t), (cx - h, cy + t)], fill=fill)
        else:  # pragma: no cover - labels come from SHAPES
            raise ValueError(f"unknown shape {obj['shape']!r}")
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8).copy()


def sample(
    seed: int,
    index: int,
    size: int = 64,
    split: str = "train",
    max_shapes: int = 1,
) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Example ``index`` of the dataset ``seed``: ``(image uint8 [size,size,3], caption, labels)``.

    ``labels`` holds ``objects`` (list of {color, shape, size, position}),
    ``background``, the caption style keys, and the first object's
    color/shape/size/position at the top level.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    rng = _rng(seed, index)
    labels = _sample_labels(rng, split, max_shapes)
    image = _draw(labels, rng, size)
    return image, caption_for(labels), labels


def batch(
    seed: int,
    start: int,
    n: int,
    size: int = 64,
    split: str = "train",
    max_shapes: int = 1,
) -> tuple[np.ndarray, list[str]]:
    """Examples ``start .. start+n-1``: ``(images uint8 [n,size,size,3], captions)``."""
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    captions = []
    for i in range(n):
        images[i], caption, _ = sample(seed, start + i, size, split, max_shapes)
        captions.append(caption)
    return images, captions


# --------------------------------------------------------------------------- parsing

_COLOR_SYNONYMS = {"grey": None, "gray": None, "violet": "purple"}
_SHAPE_SYNONYMS = {
    "circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
    "dot": "circle", "ball": "circle",
    "square": "square", "squares": "square", "box": "square", "rectangle": "square",
    "triangle": "triangle", "triangles": "triangle",
}
_SIZE_SYNONYMS = {
    "small": "small", "tiny": "small", "little": "small",
    "large": "large", "big": "large", "huge": "large",
}
_VERTICAL = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom"}
_HORIZONTAL = {"left": "left", "right": "right"}
_CENTER = {"center", "centre", "middle"}


def position_name(vertical: str | None, horizontal: str | None) -> str:
    """Combine 'top'/'bottom'/None and 'left'/'right'/None into a POSITIONS name."""
    if vertical and horizontal:
        return f"{vertical} {horizontal}"
    return vertical or horizontal or "center"


def _parse_position(words: list[str]) -> str | None:
    vertical = horizontal = None
    center = False
    for w in words:
        if w in _VERTICAL and vertical is None:
            vertical = _VERTICAL[w]
        elif w in _HORIZONTAL and horizontal is None:
            horizontal = _HORIZONTAL[w]
        elif w in _CENTER:
            center = True
    if vertical or horizontal:
        return position_name(vertical, horizontal)
    return "center" if center else None


def parse_prompt(prompt: str) -> dict[str, Any]:
    """Read the labels a caption asks for.

    Returns ``{"color", "shape", "background", "position", "size", "objects"}``;
    the first four single keys describe the first shape mentioned, ``objects``
    lists every shape, and any part the prompt doesn't mention is ``None``.
    Understands the dataset's captions and common variants ("big", "upper left",
    "in the middle", "blue background with ...").
    """
    words = re.findall(r"[a-z]+", prompt.lower())
    background = None
    bg_index = set()
    for i, w in enumerate(words):
        if w in ("background", "backdrop") and i > 0:
            c = _COLOR_SYNONYMS.get(words[i - 1], words[i - 1])
            if c in COLORS:
                background = c
                bg_index.add(i - 1)

    # Split into object segments at each shape noun: colour and size words come
    # before the noun, position words after it (up to the next object's words).
    nouns = [i for i, w in enumerate(words) if w in _SHAPE_SYNONYMS]
    objects: list[dict[str, Any]] = []
    if nouns:
        for k, n in enumerate(nouns):
            before_start = nouns[k - 1] + 1 if k else 0
            after_end = nouns[k + 1] if k + 1 < len(nouns) else len(words)
            before = [(j, words[j]) for j in range(before_start, n) if j not in bg_index]
            after = words[n + 1 : after_end]
            # Stop the position span where the next object's description begins.
            for j, w in enumerate(after):
                if w in ("and", "with") or w in COLORS or w in _SIZE_SYNONYMS:
                    after = after[:j]
                    break
            colors = [c for _, w in before if (c := _COLOR_SYNONYMS.get(w, w)) in COLORS]
            sizes = [_SIZE_SYNONYMS[w] for _, w in before if w in _SIZE_SYNONYMS]
            objects.append({
                "color": colors[-1] if colors else None,
                "shape": _SHAPE_SYNONYMS[words[n]],
                "size": sizes[-1] if sizes else None,
                "position": _parse_position(after),
            })
    else:
        colors = [c for i, w in enumerate(words)
                  if i not in bg_index and (c := _COLOR_SYNONYMS.get(w, w)) in COLORS]
        sizes = [_SIZE_SYNONYMS[w] for w in words if w in _SIZE_SYNONYMS]
        if colors or sizes:
            objects.append({"color": colors[0] if colors else None, "shape": None,
                            "size": sizes[0] if sizes else None,
                            "position": _parse_position(words)})
    first = objects[0] if objects else {"color": None, "shape": None, "size": None, "position": None}
    return {**first, "background": background, "objects": objects}


def vocabulary() -> list[str]:
    """Every word that can appear in a caption of this dataset."""
    words: set[str] = set(COLORS) | set(SHAPES) | set(SIZES) | {"background"}
    for text in list(_TEMPLATES) + list(_NO_BG_TEMPLATES) + list(_POSITION_PHRASES.values()):
        words.update(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", text)))
    words.update({"a", "an", "and"})
    return sorted(words)
