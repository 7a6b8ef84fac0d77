"""Tiled VAE decode and encode: overlapping tiles, seams blended linearly.

The VAE decoder's activations at full resolution (``B x H x W x (2*256 + 2*128)`` values for
SD's VAE: 0.8 GB per 512 px image in float32, 12.9 GB at 2048 px) and its mid-block attention
(one head over every latent token) grow with the image.  Tiled, the image is decoded one tile
at a time inside one ``lax.scan``, so the peak is one tile's activations plus the output,
whatever the image size.

What is the same as diffusers' ``AutoencoderKL.tiled_decode`` / ``tiled_encode``: tiles of
``sample_size`` pixels (``sample_size / f`` latents: 64 for SD 1.x/2.x, 128 for SDXL's VAE)
overlapping by a quarter (``tile_overlap_factor = 0.25``), each decoded on its own (its
GroupNorm statistics and attention see only the tile), blended linearly across the overlap
(``a * (1 - t) + b * t``).  What differs: every tile has the same shape (one compiled loop
body, so the memory is bounded; diffusers decodes ragged tiles at the right and bottom
edges), tiles are spread evenly with overlaps of at least a quarter, and the blend weights
are separable ramps normalised to sum to one.  So the result is not bit-equal to diffusers'
tiled decode; like it, it differs from the untiled decode by the tiles' own normalisation
statistics (small for images without large-scale structure) and most near the seams.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

OVERLAP = 0.25        # of a tile, as diffusers' tile_overlap_factor


def layout(n: int, tile: int, overlap: int, align: int = 1) -> tuple[list[int], int]:
    """Tile starts along an axis of ``n`` cells, and the tile length (``min(tile, n)``).

    Tiles are spread evenly between 0 and ``n - tile`` with overlaps of at least ``overlap``
    cells; starts are multiples of ``align`` (``n`` and ``tile`` must be multiples of it).
    """
    if n <= tile:
        return [0], n
    count = 1 + math.ceil((n - tile) / (tile - overlap))
    span = (n - tile) // align
    return [round(i * span / (count - 1)) * align for i in range(count)], tile


def blend_weights(starts: list[int], tile: int, n: int) -> np.ndarray:
    """float32 [tiles, tile]: each tile's weight along one axis of ``n`` cells.

    Across each overlap a tile's weight ramps linearly from 0 to 1 (away from its edge that
    has a neighbour), at the cell centres; the weights of all tiles sum to 1 at every cell.
    """
    x = np.arange(tile) + 0.5
    w = np.ones((len(starts), tile))
    for i, s in enumerate(starts):
        if i > 0:            # overlap with the previous tile: [s, end of previous)
            w[i] *= np.clip(x / (starts[i - 1] + tile - s), 0, 1)
        if i < len(starts) - 1:
            w[i] *= np.clip((tile - x) / (s + tile - starts[i + 1]), 0, 1)
    total = np.zeros(n)
    for s, wi in zip(starts, w):
        total[s:s + tile] += wi
    return (w / np.stack([total[s:s + tile] for s in starts])).astype(np.float32)


def tiled_map(fn, x, *, tile: int, overlap: int, up: int = 1, down: int = 1):
    """``fn`` applied tile by tile to ``x`` [B, H, W, C] and the outputs blended.

    ``fn`` maps [B, h, w, C] to [B, h*up/down, w*up/down, C'] (decode: ``up = f``; encode:
    ``down = f``).  Tiles are ``tile`` x ``tile`` cells of ``x`` (less where ``x`` is
    smaller), overlapping by at least ``overlap``; one at a time in a ``lax.scan``.
    Returns float32 [B, H*up/down, W*up/down, C'].
    """
    b, h, w, c = x.shape
    ys, th = layout(h, tile, overlap, down)
    xs, tw = layout(w, tile, overlap, down)
    if len(ys) == len(xs) == 1:
        return fn(x).astype(jnp.float32)
    wy = jnp.asarray(blend_weights([s * up // down for s in ys], th * up // down, h * up // down))
    wx = jnp.asarray(blend_weights([s * up // down for s in xs], tw * up // down, w * up // down))
    out_tile = jax.eval_shape(fn, jax.ShapeDtypeStruct((b, th, tw, c), x.dtype))
    pairs = np.array([(i, j) for i in range(len(ys)) for j in range(len(xs))], np.int32)
    ys, xs = jnp.asarray(ys, jnp.int32), jnp.asarray(xs, jnp.int32)

    def one(acc, ij):
        i, j = ij[0], ij[1]
        t = jax.lax.dynamic_slice(x, (0, ys[i], xs[j], 0), (b, th, tw, c))
        o = fn(t).astype(jnp.float32) * (wy[i][:, None] * wx[j][None, :])[None, :, :, None]
        at = (0, ys[i] * up // down, xs[j] * up // down, 0)
        return jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, at, o.shape) + o, at), None

    acc = jnp.zeros((b, h * up // down, w * up // down, out_tile.shape[-1]), jnp.float32)
    return jax.lax.scan(one, acc, jnp.asarray(pairs))[0]


def decode(model, params, latents, tile: int):
    """:meth:`AutoencoderKL.decode` in tiles of ``tile`` x ``tile`` latents (raw latents
    [B, h, w, C] -> float32 images [B, h*f, w*f, out_channels])."""
    f = model.config.downscale_factor
    fn = lambda z: model.apply({"params": params}, z, method="decode")  # noqa: E731
    return tiled_map(fn, latents, tile=tile, overlap=int(tile * OVERLAP), up=f)


def encode(model, params, images, tile: int):
    """:meth:`AutoencoderKL.encode` in tiles of ``tile * f`` pixels: images [B, H, W, C]
    (H, W multiples of f) -> (mean, logvar), each float32 [B, H/f, W/f, latent_channels]."""
    f = model.config.downscale_factor

    def fn(x):
        return jnp.concatenate(model.apply({"params": params}, x, method="encode"), axis=-1)

    h = tiled_map(fn, images, tile=tile * f, overlap=int(tile * OVERLAP) * f, down=f)
    return jnp.split(h, 2, axis=-1)
