"""Training data: sources of (image, caption) pairs and a resumable batch iterator.

A *source* has ``size`` (image side), ``num_examples`` (``None`` = unlimited) and
``get(index) -> (float32 [size, size, 3] in [-1, 1], caption)``.

* ``SyntheticShapes(seed, size, split)`` -- the generated shapes dataset
  (``sd_jax.data.shapes``), unlimited.
* ``ImageCaptionFolder(path, size)`` -- a folder of images with same-named
  ``.txt`` captions, or with a Hugging Face imagefolder-style
  ``metadata.jsonl`` (``{"file_name": ..., "text": ...}`` per line).

``batches(source, batch_size, seed, start_step=0)`` yields
``{"pixels": float32 [B, H, W, 3], "captions": list[str]}``; the batch at step
``k`` depends only on ``(source, seed, k)``, so a run resumed at
``start_step=k`` sees exactly the data an uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from sd_jax.data import shapes

__all__ = [
    "IMAGE_EXTENSIONS",
    "SyntheticShapes",
    "ImageCaptionFolder",
    "load_image",
    "image_problem",
    "batches",
    "to_pixels",
    "swap_left_right",
    "crop_box",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def to_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Load an image as RGB, resize its shorter side to ``size``, centre-crop to
    ``size`` x ``size``; float32 [size, size, 3] in [-1, 1]."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size, (255, 255, 255))
            im.paste(rgba, mask=rgba.getchannel("A"))
        else:
            im = im.convert("RGB")
    nw, nh, left, top = crop_box(*im.size, size)
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    im = im.crop((left, top, left + size, top + size))
    return to_pixels(np.asarray(im))


def crop_box(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """How :func:`load_image` crops a ``w`` x ``h`` image: ``(resized w, resized h, left, top)``
    (shorter side resized to ``size``, then a centred ``size`` x ``size`` crop)."""
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def image_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with an image file, or None: found without decoding the pixels (the
    header and size, PNG chunk checksums, the JPEG end marker, WebP's declared length), so a
    folder of thousands is checked in seconds.  A JPEG without an end marker at its end is
    decoded to tell a truncated one from one with trailing data."""
    try:
        with Image.open(path) as im:
            fmt, (w, h) = im.format, im.size
            im.verify()
        if w < 1 or h < 1:
            return "has no pixels"
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if fmt == "WEBP":
                declared = int.from_bytes(f.read(8)[4:8], "little") + 8
                if size < declared:
                    return f"is truncated ({size} of {declared} bytes)"
            elif fmt == "JPEG":
                f.seek(max(0, size - 4096))
                if b"\xff\xd9" not in f.read():
                    with Image.open(path) as im:
                        im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, struct.error, ...
        return f"cannot be read ({' '.join(str(e).split()) or type(e).__name__})"
    return None


class SyntheticShapes:
    """The generated shapes dataset as a source (unlimited: ``len`` is ``None``)."""

    def __init__(self, seed: int, size: int = 64, split: str = "train", max_shapes: int = 1):
        if split not in shapes.SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {shapes.SPLITS}")
        self.seed, self.size, self.split, self.max_shapes = int(seed), int(size), split, int(max_shapes)

    num_examples = None  # unlimited

    def get(self, index: int) -> tuple[np.ndarray, str]:
        image, caption, _ = shapes.sample(self.seed, index, self.size, self.split, self.max_shapes)
        return to_pixels(image), caption

    def geometry(self, index: int) -> tuple[int, int, int, int, int]:
        """``(original h, original w, crop top, crop left, resized w)``: generated at ``size``, uncropped."""
        return self.size, self.size, 0, 0, self.size

    def __repr__(self) -> str:
        return f"SyntheticShapes(seed={self.seed}, size={self.size}, split={self.split!r}, max_shapes={self.max_shapes})"


class ImageCaptionFolder:
    """Images (png/jpg/jpeg/webp, searched recursively) with captions.

    Captions come from ``metadata.jsonl`` in the folder if present (one JSON
    object per line with ``file_name`` relative to the folder and ``text``;
    every image must be listed), otherwise from a ``.txt`` file next to each
    image with the same stem.  Every image is checked when the folder is opened
    (:func:`image_problem`): a bad one is a ValueError naming it, or with
    ``skip_bad`` is left out (``skipped`` lists them).  Images are read lazily;
    up to ``cache`` decoded images are kept in memory.
    """

    def __init__(self, path: str | os.PathLike, size: int = 64, cache: int = 4096, skip_bad: bool = False):
        self.path, self.size, self._cache_size = Path(path), int(size), int(cache)
        if not self.path.is_dir():
            raise ValueError(f"image folder not found: {self.path}")
        images = sorted(
            p for p in self.path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        metadata = self.path / "metadata.jsonl"
        if metadata.is_file():
            self.items = self._from_metadata(metadata, images)
        else:
            if not images:
                raise ValueError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) in {self.path}")
            self.items = []
            for p in images:
                txt = p.with_suffix(".txt")
                if not txt.is_file():
                    raise ValueError(f"image {p.relative_to(self.path)} has no caption file {txt.name} (and there is no metadata.jsonl)")
                self.items.append((p, txt.read_text(encoding="utf-8").strip()))
        self.skipped: list[tuple[Path, str]] = []
        for p, _ in self.items:
            problem = image_problem(p)
            if problem is not None:
                if not skip_bad:
                    raise ValueError(f"image {p} {problem}; replace or remove it, or pass --skip-bad-images "
                                     f"to train without the bad images")
                self.skipped.append((p, problem))
        if self.skipped:
            bad = {p for p, _ in self.skipped}
            self.items = [item for item in self.items if item[0] not in bad]
            if not self.items:
                raise ValueError(f"none of the images in {self.path} can be read (e.g. {self.skipped[0][0]} "
                                 f"{self.skipped[0][1]})")
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def _from_metadata(self, metadata: Path, images: list[Path]) -> list[tuple[Path, str]]:
        items: list[tuple[Path, str]] = []
        listed: set[Path] = set()
        with open(metadata, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{metadata}: line {lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                    raise ValueError(f'{where}: expected an object with a "file_name" string')
                text = row.get("text", row.get("caption"))
                if not isinstance(text, str):
                    raise ValueError(f'{where}: expected a "text" string caption')
                p = (self.path / row["file_name"]).resolve()
                if not p.is_file():
                    raise ValueError(f"{where}: image not found: {row['file_name']}")
                if p.suffix.lower() not in IMAGE_EXTENSIONS:
                    raise ValueError(f"{where}: not an image file: {row['file_name']}")
                listed.add(p)
                items.append((p, text.strip()))
        if not items:
            raise ValueError(f"no images listed in {metadata}")
        for p in images:
            if p.resolve() not in listed:
                raise ValueError(f"image {p.relative_to(self.path)} has no caption (not listed in {metadata.name})")
        return items

    @property
    def num_examples(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def get(self, index: int) -> tuple[np.ndarray, str]:
        path, caption = self.items[index]
        pixels = self._cache.get(index)
        if pixels is None:
            try:
                pixels = load_image(path, self.size)
            except (OSError, ValueError, SyntaxError) as e:  # changed since the folder was checked
                raise ValueError(f"cannot read image {path}: {' '.join(str(e).split())}") from None
            if self._cache_size > 0:
                self._cache[index] = pixels
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(index)
        return pixels, caption

    def geometry(self, index: int) -> tuple[int, int, int, int, int]:
        """``(original h, original w, crop top, crop left, resized w)`` of image ``index`` as
        :func:`load_image` crops it (from the file's header; SDXL's micro-conditioning)."""
        path = self.items[index][0]
        with Image.open(path) as im:
            w, h = im.size
        nw, _, left, top = crop_box(w, h, self.size)
        return h, w, top, left, nw

    def summary(self) -> str:
        """One line for the training log: how many images, and how many were skipped."""
        line = f"data: {len(self.items)} images from {self.path}"
        if self.skipped:
            p, problem = self.skipped[0]
            line += f"; skipped {len(self.skipped)} that cannot be read (e.g. {p} {problem})"
        return line

    def __repr__(self) -> str:
        return f"ImageCaptionFolder({str(self.path)!r}, size={self.size}, n={len(self.items)})"


_LR = {"left": "right", "right": "left"}


def swap_left_right(caption: str) -> str:
    """Swap the words "left" and "right" (for horizontally flipped images)."""
    return re.sub(r"\b(left|right)\b", lambda m: _LR[m.group(1)], caption)


def _indices(num: int | None, batch_size: int, seed: int, step: int, perms: dict[int, np.ndarray]) -> list[int]:
    if num is None:  # unlimited source: fresh random examples per (seed, step)
        rng = np.random.default_rng([seed, step])
        return [int(i) for i in rng.integers(0, 2**62, size=batch_size)]
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(pos, num)
        if epoch not in perms:
            if len(perms) >= 2:
                perms.pop(min(perms))
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(num)
        out.append(int(perms[epoch][offset]))
    return out


def batches(
    source: Any,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    random_flip: bool = False,
    tokenizer: Callable[[list[str]], np.ndarray] | None = None,
    time_ids: bool = False,
) -> Iterator[dict[str, Any]]:
    """Endless iterator of ``{"pixels": float32 [B,H,W,3] in [-1,1], "captions": [str]*B}``.

    The batch at step ``k`` depends only on ``(source, seed, k)``:

    * unlimited sources (``num_examples is None``): ``batch_size`` example
      indices drawn from ``default_rng([seed, k])``;
    * finite sources: the examples are read as one stream, epoch after epoch,
      each epoch in the order ``default_rng([seed, epoch]).permutation(n)``
      (no example dropped, batches may span two epochs).

    ``random_flip`` mirrors each image with probability 1/2 (drawn from
    ``(seed, k)``) and swaps "left"/"right" in its caption.  ``tokenizer``, if
    given, is called on the captions and its result stored as
    ``batch["input_ids"]`` (e.g. ``lambda c: tok(c, padding="max_length",
    max_length=77, truncation=True, return_tensors="np").input_ids``).

    ``time_ids``: also ``batch["time_ids"]``, float32 [B, 6], SDXL's micro-conditioning of
    each image as diffusers' ``train_text_to_image_sdxl.py`` builds it: original size (h, w),
    crop top-left (y, x), target size (``size``, ``size``), from the source's ``geometry``.
    A flipped image's crop left is the crop's left in the mirrored resized image
    (``resized w - left - size``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    num = source.num_examples
    if num is not None and num < 1:
        raise ValueError("source has no examples")
    perms: dict[int, np.ndarray] = {}
    step = start_step
    while True:
        pixels, captions = [], []
        indices = _indices(num, batch_size, seed, step, perms)
        for i in indices:
            x, c = source.get(i)
            pixels.append(x)
            captions.append(c)
        out = np.stack(pixels).astype(np.float32, copy=False)
        if random_flip:
            flip = np.random.default_rng([seed, step, 1]).random(batch_size) < 0.5
            out[flip] = out[flip, :, ::-1]
            captions = [swap_left_right(c) if f else c for c, f in zip(captions, flip)]
        batch: dict[str, Any] = {"pixels": out, "captions": captions}
        if tokenizer is not None:
            batch["input_ids"] = np.asarray(tokenizer(captions))
        if time_ids:
            rows = []
            for j, i in enumerate(indices):
                oh, ow, top, left, nw = source.geometry(i)
                if random_flip and flip[j]:
                    left = nw - left - source.size
                rows.append((oh, ow, top, left, source.size, source.size))
            batch["time_ids"] = np.asarray(rows, np.float32)
        yield batch
        step += 1


def data_source(config, notes: list):
    """The training images: the caption folder ``config.data`` (its summary added to ``notes``),
    or the synthetic shapes dataset when there is none."""
    if config.data is not None:
        source = ImageCaptionFolder(config.data, config.size, skip_bad=config.skip_bad_images)
        notes.append(source.summary())
        return source
    return SyntheticShapes(config.seed, config.size, "train", config.max_shapes)
