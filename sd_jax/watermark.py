"""The invisible watermark SDXL puts in its images, in JAX (no OpenCV, PyWavelets or torch).

diffusers' ``StableDiffusionXLWatermarker`` (as Stability AI's reference code) marks every
image of at least 256 px width with a fixed 48-bit message, using the ``invisible-watermark``
package's ``dwtDct`` encoder (``imwatermark.maxDct.EmbedMaxDct``).  What that encoder does,
for an RGB image ``x`` in [0, 255] (float32; the package gets it as BGR):

1. OpenCV's float ``BGR2YUV``: ``Y = .114 B + .587 G + .299 R``, ``U = .492 (B - Y) + .5``,
   ``V = .877 (R - Y) + .5`` (``.5``: OpenCV's float "delta");
2. one level of the Haar wavelet transform of ``U`` (only ``U``: the scales are 0, 36, 36 but
   the loop runs over the first two channels), giving ``cA, (cH, cV, cD)``;
3. ``cA`` is cut into 4x4 blocks, row by row; block ``n`` carries bit ``n mod 48``: its
   largest-magnitude coefficient other than the first, ``v``, becomes
   ``sign(v) * (|v| // 36 + 0.25 + 0.5 * bit) * 36`` (no DCT is taken, whatever the name says);
4. the inverse transform is given ``(cA, (cV, cH, cD))``, the two detail bands swapped (so
   each 2x2 block of ``U`` comes back transposed), and OpenCV's ``YUV2BGR`` turns it back:
   ``B = Y + 2.032 (U - .5)``, ``G = Y - .395 (U - .5) - .581 (V - .5)``, ``R = Y + 1.14 (V - .5)``.

Everything is elementwise or per block, so it runs inside the generation's ``jax.jit`` on the
decoded image, before it is clipped and rounded (diffusers marks the unclipped image too).
The decoder reads bit ``k`` as the mean over its blocks of ``|v| mod 36 > 18``.
``tests/test_watermark.py`` checks this against the package's encoder and decoder.
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["WATERMARK_MESSAGE", "WATERMARK_BITS", "MIN_WIDTH", "applies", "encode_dwt_dct", "apply_watermark"]

# Stability AI's message (generative-models, scripts/demo/streamlit_helpers.py), as diffusers has it.
WATERMARK_MESSAGE = 0b101100111110110010010000011110111011000110011110
WATERMARK_BITS = tuple(int(b) for b in bin(WATERMARK_MESSAGE)[2:])
MIN_WIDTH = 256          # diffusers leaves narrower images unmarked
_MIN_AREA = 256 * 256    # imwatermark refuses smaller images
_SCALE = 36.0            # EmbedMaxDct's scale of the U channel
_BLOCK = 4
_S = 0.7071067811865476  # the Haar filters' 1/sqrt(2)


def applies(height: int, width: int) -> bool:
    """Whether an image of this size is marked (diffusers: width >= 256; imwatermark: area >= 256^2)."""
    return width >= MIN_WIDTH and height * width >= _MIN_AREA


def _haar(x):
    """One level of the 2-D Haar transform of float32 [..., 2m, 2n]: (cA, cH, cV, cD) [..., m, n]."""
    a, b = x[..., 0::2, :], x[..., 1::2, :]       # along rows first, as pywt.dwt2
    lo, hi = (a + b) * _S, (a - b) * _S
    ll, lh = (lo[..., 0::2] + lo[..., 1::2]) * _S, (lo[..., 0::2] - lo[..., 1::2]) * _S
    hl, hh = (hi[..., 0::2] + hi[..., 1::2]) * _S, (hi[..., 0::2] - hi[..., 1::2]) * _S
    return ll, hl, lh, hh                          # cA, cH (rows' detail), cV (columns'), cD


def _ihaar(ca, ch, cv, cd):
    """The inverse of :func:`_haar`."""
    def cols(even, odd):    # [..., m, n] x 2 -> [..., m, 2n]
        return jnp.stack([even, odd], axis=-1).reshape(even.shape[:-1] + (-1,))

    def rows(even, odd):    # [..., m, n] x 2 -> [..., 2m, n]
        return jnp.stack([even, odd], axis=-2).reshape(even.shape[:-2] + (-1, even.shape[-1]))
    lo = cols((ca + cv) * _S, (ca - cv) * _S)
    hi = cols((ch + cd) * _S, (ch - cd) * _S)
    return rows((lo + hi) * _S, (lo - hi) * _S)


def _floordiv(v, s: float):
    """numpy's float floor division (``npy_divmod``) of ``v >= 0`` by ``s > 0``, which differs
    from ``floor(v / s)`` where ``v / s`` rounds up to an integer."""
    mod = jnp.fmod(v, s)
    div = (v - mod) / s
    fl = jnp.floor(div)
    return jnp.where(div - fl > 0.5, fl + 1, fl)


def _embed(ca, bits):
    """Step 3 on float32 [B, m, n] coefficients."""
    k = _BLOCK
    B, m, n = ca.shape
    rows, cols = m // k, n // k
    blocks = ca[:, :rows * k, :cols * k].reshape(B, rows, k, cols, k).transpose(0, 1, 3, 2, 4).reshape(B, rows, cols, k * k)
    pos = jnp.argmax(jnp.abs(blocks[..., 1:]), axis=-1) + 1            # first of equal magnitudes, as numpy
    v = jnp.take_along_axis(blocks, pos[..., None], axis=-1)[..., 0]
    bit = jnp.asarray(bits, jnp.float32)[jnp.arange(rows * cols) % len(bits)].reshape(rows, cols)
    q = (_floordiv(jnp.abs(v), _SCALE) + 0.25 + 0.5 * bit) * _SCALE
    new = jnp.where(v >= 0, q, -q)
    blocks = jnp.where(jnp.arange(k * k) == pos[..., None], new[..., None], blocks)
    marked = blocks.reshape(B, rows, cols, k, k).transpose(0, 1, 3, 2, 4).reshape(B, rows * k, cols * k)
    return ca.at[:, :rows * k, :cols * k].set(marked)


def encode_dwt_dct(rgb, bits=WATERMARK_BITS):
    """``imwatermark``'s ``WatermarkEncoder.encode(bgr, "dwtDct")`` with ``bits`` set, on RGB.

    rgb: float32 [B, H, W, 3] in [0, 255] (H * W >= 256^2); returns the marked images, float32,
    not clipped (as the package returns them)."""
    rgb = jnp.asarray(rgb, jnp.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = b * 0.114 + g * 0.587 + r * 0.299
    u = (b - y) * 0.492 + 0.5
    v = (r - y) * 0.877 + 0.5
    H, W = u.shape[-2:]
    h, w = H // 4 * 4, W // 4 * 4
    ca, ch, cv, cd = _haar(u[:, :h, :w])
    ca = _embed(ca, bits)
    u = u.at[:, :h, :w].set(_ihaar(ca, cv, ch, cd))      # the bands swapped, as the package does
    uc, vc = u - 0.5, v - 0.5
    out_b = y + uc * 2.032
    out_g = y + uc * -0.395 + vc * -0.581
    out_r = y + vc * 1.14
    return jnp.stack([out_r, out_g, out_b], axis=-1)


def apply_watermark(images):
    """diffusers' ``StableDiffusionXLWatermarker.apply_watermark`` on NHWC: float32 [B, H, W, 3]
    in [-1, 1] (the VAE's output, not clipped) -> marked, clipped to [-1, 1]; images that
    :func:`applies` says no to come back as they are."""
    if not applies(images.shape[1], images.shape[2]):
        return images
    x = encode_dwt_dct(255 * (images.astype(jnp.float32) / 2 + 0.5))
    return jnp.clip(2 * (x / 255 - 0.5), -1.0, 1.0)
