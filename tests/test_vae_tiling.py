"""Tiled VAE decode/encode (sd_jax.models.vae_tiling): the tiling is exact, the VAE in tiles is as
close to the untiled VAE as diffusers' own tiled_decode/tiled_encode are (on the same weights),
its compiled memory does not grow with the image, and the pipeline tiles when asked or needed."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import memory
from sd_jax.models import vae_tiling
from sd_jax.models.vae import AutoencoderKL, VAEConfig

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "sd-jax-shapes")
FAST = {"xla_backend_optimization_level": 0}  # LLVM -O0: half the compile time, same arithmetic


def _run(fn, *args):
    return jax.jit(fn).lower(*args).compile(FAST)(*args)


@pytest.mark.parametrize("n,tile,overlap,align", [(37, 16, 4, 1), (100, 32, 8, 1), (17, 16, 4, 1),
                                                  (96, 32, 8, 4), (12, 16, 4, 1)])
def test_layout_covers_and_weights_blend_linearly(n, tile, overlap, align):
    starts, t = vae_tiling.layout(n, tile, overlap, align)
    assert t == min(tile, n) and starts[0] == 0 and starts[-1] + t == n
    assert all(s % align == 0 for s in starts)
    assert all(b - a <= t - overlap for a, b in zip(starts, starts[1:]))      # overlaps >= overlap
    w = vae_tiling.blend_weights(starts, t, n)
    total = np.zeros(n)
    for s, wi in zip(starts, w):
        total[s:s + t] += wi
    np.testing.assert_allclose(total, 1.0, atol=1e-6)                          # a partition of unity
    if len(starts) > 1:  # in a plain two-tile overlap the next tile ramps up linearly: (x + 0.5) / overlap
        ov = starts[0] + t - starts[1]
        if len(starts) == 2 or starts[1] + t - starts[2] <= t - ov:
            np.testing.assert_allclose(w[1][:ov], (np.arange(ov) + 0.5) / ov, atol=1e-6)


def test_tiled_map_is_exact_for_local_maps():
    """Upsampling (decode-like) and pooling (encode-like) maps in tiles give the untiled result."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 36, 52, 3)), jnp.float32)
    up = lambda t: jnp.repeat(jnp.repeat(t, 4, 1), 4, 2)  # noqa: E731
    pool = lambda t: t.reshape(t.shape[0], t.shape[1] // 4, 4, t.shape[2] // 4, 4, 3).mean((2, 4))  # noqa: E731
    np.testing.assert_allclose(vae_tiling.tiled_map(up, x, tile=16, overlap=4, up=4), up(x), atol=1e-6)
    np.testing.assert_allclose(vae_tiling.tiled_map(pool, x, tile=16, overlap=4, down=4), pool(x), atol=1e-6)


def test_tiled_vae_is_as_close_to_untiled_as_diffusers_tiling():
    """The shipped VAE (f=4, tiles of 8 latents = 32 px as its sample_size says) on a 128 px
    image of four shapes scenes, 5x5 tiles.  Every tile normalises with its own GroupNorm
    statistics and attends only within itself (in diffusers too), so a tiled decode is not
    the untiled one; what is asserted (mean abs, images in [-1, 1]):
      * untiled decode: sd-jax = diffusers within 1e-4;
      * |tiled - untiled| of sd-jax <= 1.1 x diffusers' tiled_decode's own + 0.01 (encode too);
      * sd-jax's tiled decode = diffusers' tiled_decode within 0.03 (their last tiles are
        ragged, ours are evenly spread: the blends differ near the right and bottom edges)."""
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from sd_jax.data import shapes
    from sd_jax.models import vae as V
    model, params = V.load(os.path.join(SHIPPED, "vae"))
    ref = TorchVAE.from_pretrained(os.path.join(SHIPPED, "vae")).eval()
    tile = 8
    assert (ref.tile_latent_min_size, ref.tile_overlap_factor) == (tile, vae_tiling.OVERLAP)
    img = np.concatenate([np.concatenate([shapes.sample(0, 2 * i + j, size=64, max_shapes=2)[0]
                                          for j in range(2)], 1) for i in range(2)], 0)
    x = jnp.asarray(img[None] / 127.5 - 1, jnp.float32)
    mean, _ = _run(lambda x: model.apply({"params": params}, x, method="encode"), x)
    ours = np.asarray(_run(lambda z: model.apply({"params": params}, z, method="decode"), mean))
    ours_t = np.asarray(_run(lambda z: vae_tiling.decode(model, params, z, tile), mean))
    enc_t = np.asarray(_run(lambda x: vae_tiling.encode(model, params, x, tile), x)[0])
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))  # noqa: E731
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    with torch.no_grad():
        theirs, theirs_t = nhwc(ref.decode(nchw(mean)).sample), nhwc(ref.tiled_decode(nchw(mean)).sample)
        ref.enable_tiling()
        their_enc_t = nhwc(ref.encode(nchw(x)).latent_dist.mean)
    d = lambda a, b: float(np.abs(a - b).mean())  # noqa: E731
    assert np.abs(ours - theirs).max() < 1e-4
    assert d(ours_t, ours) <= 1.1 * d(theirs_t, theirs) + 0.01, (d(ours_t, ours), d(theirs_t, theirs))
    assert d(enc_t, mean) <= 1.1 * d(their_enc_t, mean) + 0.01, (d(enc_t, mean), d(their_enc_t, mean))
    assert d(ours_t, theirs_t) < 0.03


def test_tiled_decode_memory_does_not_grow_with_the_image():
    """XLA's memory analysis: the tiled decode's temporaries are the same at 32x32 and 64x64
    latents (one tile's activations; the output is its own buffer, not a temporary), where the
    untiled decode's grow 4x (3.5 -> 14 MiB for this VAE; measured, not asserted here)."""
    model = AutoencoderKL(VAEConfig.tiny())
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))["params"]

    def temp(n):
        z = jax.ShapeDtypeStruct((1, n, n, 4), jnp.float32)
        fn = jax.jit(lambda p, z: vae_tiling.decode(model, p, z, 16))
        return fn.lower(params, z).compile(FAST).memory_analysis().temp_size_in_bytes

    small, large = temp(32), temp(64)
    assert 0 < large <= small * 1.05, (small, large)


def test_tiling_is_chosen_by_mode_and_memory():
    vae = VAEConfig.sd15()                                  # tiles of 64 latents = 512 px
    kw = dict(batch=1, dtype_bytes=4, vae_attention="blocked")
    need = max(memory.vae_decode_terms(vae, 1, 2048, 2048, 4, "blocked").values())
    assert memory.vae_tile("auto", vae, height=2048, width=2048, available_bytes=need, **kw) == 64
    assert memory.vae_tile("auto", vae, height=2048, width=2048, available_bytes=4 * need, **kw) is None
    assert memory.vae_tile("auto", vae, height=2048, width=2048, available_bytes=None, **kw) is None
    assert memory.vae_tile("auto", vae, height=512, width=512, available_bytes=1, **kw) is None   # one tile
    assert memory.vae_tile("on", vae, height=1024, width=512, available_bytes=None, **kw) == 64
    assert memory.vae_tile("off", vae, height=8192, width=8192, available_bytes=1, **kw) is None
    with pytest.raises(ValueError, match="choose one of auto, on, off"):
        memory.vae_tile("yes", vae, height=8192, width=8192, available_bytes=1, **kw)
    # The memory estimate counts one tile (and the output) instead of the whole decoder.
    est = dict(batch=1, height=4096, width=4096, vae_attention="blocked", unet_attention="blocked")
    untiled = memory.estimate(memory_unet(), vae, **est)
    tiled = memory.estimate(memory_unet(), vae, vae_tile=64, **est)
    assert tiled.terms["VAE decoder in tiles"] < untiled.terms["VAE decoder at full resolution"] / 20


def memory_unet():
    from sd_jax.models.unet import UNetConfig
    return UNetConfig.sd15()


def test_pipeline_tiles_when_asked(monkeypatch):
    """pipe.vae_tiling: "auto" leaves a small image untiled; "on" makes the generation decode the
    shipped model's 64x64 image in tiles of 8 latents (3x3 tiles); traced, not compiled (the
    untiled path is every other generation test's)."""
    from sd_jax.pipeline import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED)
    calls = []
    decode = vae_tiling.decode
    monkeypatch.setattr(vae_tiling, "decode", lambda m, p, z, tile: calls.append((z.shape, tile)) or decode(m, p, z, tile))
    assert pipe.vae_tiling == "auto" and memory.pipeline_vae_tile(pipe, 1, 64, 64) is None
    pipe.vae_tiling = "on"
    assert memory.pipeline_vae_tile(pipe, 1, 64, 64) == 8
    pipe.lower(height=64, width=64, num_inference_steps=1)
    assert [(shape[1:], tile) for shape, tile in calls] == [((16, 16, 4), 8)]
