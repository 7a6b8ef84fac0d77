"""SDXL's micro-conditioning: the ``add_time_ids`` rows of a request, as diffusers builds them.

SDXL's UNet adds an embedding of a few numbers to its timestep embedding (Podell et al. 2023,
"SDXL", sec. 2.2): the size of the training image before it was resized (``original_size``),
the top-left corner of the crop taken from it (``crops_coords_top_left``) and either the
size of the image to make (``target_size``, the base model: 6 numbers) or an aesthetic score
(the refiner, ``requires_aesthetics_score``: 5 numbers).  Sizes are (height, width).

The rules differ between diffusers' pipelines, and are followed here as they are:

* text-to-image (``StableDiffusionXLPipeline``): the negative row is the positive one unless
  *both* ``negative_original_size`` and ``negative_target_size`` are given; then it is those
  with ``negative_crops_coords_top_left``.
* img2img and inpainting (``StableDiffusionXLImg2ImgPipeline`` /
  ``StableDiffusionXLInpaintPipeline``): the negative sizes default to the positive ones;
  with the aesthetic score the negative row takes ``negative_crops_coords_top_left``, without
  it the positive crop corner (``_get_add_time_ids``).

The rows are host arrays fed to the compiled generation as traced inputs, so changing them
never recompiles.
"""
from __future__ import annotations

import numpy as np


def add_time_ids(request, mode: str, aesthetic: bool) -> tuple[tuple, tuple]:
    """(positive, negative) ``add_time_ids`` of one resolved request (``height``/``width`` set).

    mode: ``"txt2img"``, ``"img2img"`` or ``"inpaint"`` (which diffusers pipeline's rules);
    aesthetic: the model's ``requires_aesthetics_score`` (the refiner)."""
    r = request
    size = (r.height, r.width)
    original, target = r.original_size or size, r.target_size or size
    crops, neg_crops = r.crops_coords_top_left, r.negative_crops_coords_top_left
    if mode == "txt2img":
        pos = original + crops + target
        both = r.negative_original_size is not None and r.negative_target_size is not None
        neg = r.negative_original_size + neg_crops + r.negative_target_size if both else pos
        return pos, neg
    neg_original = r.negative_original_size or original
    neg_target = r.negative_target_size or target
    if aesthetic:
        return original + crops + (r.aesthetic_score,), neg_original + neg_crops + (r.negative_aesthetic_score,)
    return original + crops + target, neg_original + crops + neg_target


def time_id_rows(requests, mode: str, aesthetic: bool, guidance: bool) -> dict:
    """The batch arrays ``time_ids`` (and ``neg_time_ids`` with guidance): float32 [B, K]."""
    rows = [add_time_ids(r, mode, aesthetic) for r in requests]
    out = {"time_ids": np.asarray([p for p, _ in rows], np.float32)}
    if guidance:
        out["neg_time_ids"] = np.asarray([n for _, n in rows], np.float32)
    return out
