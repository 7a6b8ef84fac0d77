"""Read a (generated) shapes image back into labels, and score it against its prompt.

``evaluate(image)`` works on any square-ish uint8 RGB image (resized to 64x64
internally):

* background: the named colour most border pixels are nearest to (its actual
  RGB is the median of those pixels);
* shape pixels: far (> ``_LOOSE``) from the background RGB, cleaned with a 3x3
  majority filter and split into 4-connected components (tiny ones dropped);
* per component: colour = nearest named colour of the median of its interior
  pixels.  Coverage ``alpha`` (0 = background, 1 = that colour) undoes
  anti-aliasing and blur: the outline is where the lightly smoothed, 4x
  upsampled coverage crosses 0.5, giving a sub-pixel bounding box.  Shape:
  triangle if a triangle template (pointing up or down) fitted to the box has
  a better intersection-over-union with the outline than a circle or square
  template; otherwise square vs circle by the fill ratio (soft area / box
  area: 1 vs pi/4; the soft area is preserved by blur).  Position from the
  box centre on a 3x3 grid; size from the larger box side.

Measured on dataset images (``split="all"``, 600 samples): 100% of all five
labels right on clean images and with gaussian noise sigma 8-15 plus a
gaussian blur of radius 0.8-1.0; ~95% with sigma 25 plus blur 1.2.

The largest component is the image's shape (keys ``color``, ``shape``,
``position``, ``size``); ``objects`` lists all of them, largest first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .shapes import COLORS, parse_prompt, position_name

__all__ = ["evaluate", "score", "nearest_color"]

_SIDE = 64  # working resolution
_UP = 4  # upsampling for the sub-pixel outline
_BORDER = 2  # border ring width (pixels) used for the background
_LOOSE = 50.0  # RGB distance from the background that marks candidate shape pixels
_MIN_AREA = 6  # pixels at 64x64; smaller components are noise
_POS_LO, _POS_HI = 0.39, 0.61  # grid thresholds (dataset centres: 0.28 / 0.5 / 0.72)
_FILL_SQUARE = 0.87  # soft area / bbox area: circle pi/4, square 1
_SIZE_SPLIT = 0.30  # larger bbox side / image side (dataset: small <= 0.26, large >= 0.35)

_NAMES = list(COLORS)
_RGB = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)


def nearest_color(rgb) -> str:
    """Name of the named colour nearest (Euclidean RGB) to ``rgb``."""
    rgb = np.asarray(rgb, dtype=np.float32).reshape(3)
    return _NAMES[int(np.argmin(((_RGB - rgb) ** 2).sum(-1)))]


def _nearest_index(pixels: np.ndarray) -> np.ndarray:
    return np.argmin(((pixels[..., None, :] - _RGB) ** 2).sum(-1), axis=-1)


def _to_working(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"evaluate expects a uint8 image, got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"evaluate expects an HxWx3 image, got shape {image.shape}")
    if image.shape[:2] != (_SIDE, _SIDE):
        image = np.asarray(Image.fromarray(image).resize((_SIDE, _SIDE), Image.Resampling.BOX))
    return image.astype(np.float32)


def _majority3(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask.astype(np.int8), 1)
    h, w = mask.shape
    count = sum(padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3))
    return count >= 5


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of ``mask`` as boolean masks (min-label propagation)."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    for _ in range(h * w):
        padded = np.pad(labels, 1, constant_values=big)
        nb = np.minimum.reduce([
            padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]
        ])
        nb = np.where(mask, nb, big)
        if np.array_equal(nb, labels):
            break
        labels = nb
    return [labels == v for v in np.unique(labels[mask])]


def _erode(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def _dilate(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def _smooth(a: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing (edge-replicated)."""
    p = np.pad(a, 1, mode="edge")
    a = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (a[:, :-2] + 2 * a[:, 1:-1] + a[:, 2:]) / 4


def _templates(ys: np.ndarray, xs: np.ndarray, top: float, bottom: float, left: float, right: float):
    """Ideal shapes filling the box [top, bottom] x [left, right], sampled at (ys, xs)."""
    cx, cy = (left + right) / 2, (top + bottom) / 2
    hw, hh = max((right - left) / 2, 1e-3), max((bottom - top) / 2, 1e-3)
    inside = (ys >= top) & (ys <= bottom) & (xs >= left) & (xs <= right)
    circle = ((xs - cx) / hw) ** 2 + ((ys - cy) / hh) ** 2 <= 1.0
    t_up = (ys - top) / (2 * hh)  # 0 at the top, 1 at the bottom
    up = inside & (np.abs(xs - cx) <= hw * t_up)
    down = inside & (np.abs(xs - cx) <= hw * (1.0 - t_up))
    return {"circle": circle, "square": inside, "triangle": up, "triangle_down": down}


def _upsample(a: np.ndarray, nearest: bool = False) -> np.ndarray:
    h, w = a.shape
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    out = Image.fromarray(a.astype(np.float32), mode="F").resize((w * _UP, h * _UP), resample)
    return np.asarray(out)


def _describe(comp: np.ndarray, img: np.ndarray, bg_rgb: np.ndarray) -> dict[str, Any]:
    interior = _erode(comp)
    px = img[interior] if interior.sum() >= 4 else img[comp]
    rgb = np.median(px, axis=0)
    color = nearest_color(rgb)
    # Coverage along the background -> shape colour direction (0 = background,
    # 1 = shape): undoes anti-aliasing and blur.
    d = rgb - bg_rgb
    alpha = ((img - bg_rgb) @ d) / max(float(d @ d), 1e-6)
    region = _dilate(comp)
    near = _dilate(_dilate(region))
    # Soft area: blur preserves it; not clipped at 0 so background noise averages out.
    soft_area = float(np.clip(alpha[near], -1.0, 1.0).sum())

    # Sub-pixel outline: smoothed coverage, upsampled, thresholded at 0.5.
    rows, cols = np.nonzero(near)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    a_up = _upsample(_smooth(alpha)[r0:r1, c0:c1])
    reg_up = _upsample(region[r0:r1, c0:c1], nearest=True) > 0.5
    mask = (a_up > 0.5) & reg_up
    if mask.sum() < _MIN_AREA * _UP * _UP:
        mask = _upsample(comp[r0:r1, c0:c1], nearest=True) > 0.5
    ys, xs = (np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5) / _UP
    ys, xs = ys + r0, xs + c0
    my, mx = ys[mask], xs[mask]
    half = 0.5 / _UP
    top, bottom, left, right = my.min() - half, my.max() + half, mx.min() - half, mx.max() + half
    width, height = right - left, bottom - top

    fill = soft_area / max(width * height, 1e-6)
    ious = {}
    for name, t in _templates(ys, xs, top, bottom, left, right).items():
        ious[name] = float((mask & t).sum() / max((mask | t).sum(), 1))
    if max(ious["triangle"], ious["triangle_down"]) > max(ious["circle"], ious["square"]):
        shape = "triangle"
    else:
        shape = "square" if fill > _FILL_SQUARE else "circle"
    cx = (left + right) / 2 / _SIDE
    cy = (top + bottom) / 2 / _SIDE
    col = "left" if cx < _POS_LO else "right" if cx > _POS_HI else None
    row = "top" if cy < _POS_LO else "bottom" if cy > _POS_HI else None
    extent = max(width, height) / _SIDE
    return {
        "color": color,
        "shape": shape,
        "position": position_name(row, col),
        "size": "large" if extent > _SIZE_SPLIT else "small",
        "center": (float(cx), float(cy)),
        "extent": float(extent),
        "area": soft_area / _SIDE**2,
        "fill": fill,
        "ious": ious,
    }


def evaluate(image: np.ndarray) -> dict[str, Any]:
    """Labels read from an image: ``{background, color, shape, position, size, objects}``.

    ``color``/``shape``/``position``/``size`` describe the largest shape
    (``None`` if no shape is found); ``objects`` holds one such dict (plus
    ``center`` (x, y) and ``extent`` as fractions of the side, ``area`` as a
    fraction of the image, ``fill`` and template ``ious``) per shape found,
    largest first.
    """
    img = _to_working(image)
    ring = np.ones((_SIDE, _SIDE), bool)
    ring[_BORDER:-_BORDER, _BORDER:-_BORDER] = False
    border = img[ring]
    idx = _nearest_index(border)
    bg_i = int(np.bincount(idx, minlength=len(_NAMES)).argmax())
    background = _NAMES[bg_i]
    bg_rgb = np.median(border[idx == bg_i], axis=0)

    dist = np.sqrt(((img - bg_rgb) ** 2).sum(-1))
    mask = _majority3(dist > _LOOSE)
    comps = [c for c in _components(mask) if c.sum() >= _MIN_AREA]
    comps.sort(key=lambda c: -int(c.sum()))
    objects = [_describe(c, img, bg_rgb) for c in comps]
    first = objects[0] if objects else {}
    return {
        "background": background,
        "color": first.get("color"),
        "shape": first.get("shape"),
        "position": first.get("position"),
        "size": first.get("size"),
        "objects": objects,
    }


_FIELDS = ("color", "shape", "position", "size")


def score(prompt: str, image: np.ndarray) -> dict[str, Any]:
    """Does ``image`` show what ``prompt`` asks for?

    Returns ``{color_ok, shape_ok, background_ok, position_ok, size_ok,
    count_ok, all_ok, parsed, found}``.  A field the prompt doesn't mention is
    ``None`` (and doesn't count against ``all_ok``).  With several shapes in the
    prompt each is matched to a distinct detected shape (greedily, by the
    number of agreeing fields) and a field is ok only if it is ok for all.
    ``count_ok`` (number of shapes found == number asked for) is reported but
    not part of ``all_ok``.
    """
    want = parse_prompt(prompt)
    found = evaluate(image)
    out: dict[str, Any] = {
        "background_ok": None if want["background"] is None else want["background"] == found["background"]
    }
    wanted = want["objects"]
    available = list(found["objects"])
    per_field: dict[str, list[bool]] = {f: [] for f in _FIELDS}
    for obj in wanted:
        best, best_hits = None, -1
        for cand in available:
            hits = sum(obj[f] is not None and obj[f] == cand[f] for f in _FIELDS)
            if hits > best_hits:
                best, best_hits = cand, hits
        if best is not None:
            available.remove(best)
        for f in _FIELDS:
            if obj[f] is not None:
                per_field[f].append(best is not None and obj[f] == best[f])
    for f in _FIELDS:
        out[f"{f}_ok"] = all(per_field[f]) if per_field[f] else None
    out["count_ok"] = len(found["objects"]) == len(wanted) if wanted else None
    checks = [v for k, v in out.items() if k.endswith("_ok") and k != "count_ok" and v is not None]
    out["all_ok"] = all(checks) if checks else None
    out["parsed"] = want
    out["found"] = found
    return out
