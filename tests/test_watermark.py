"""SDXL's invisible watermark (sd_jax.watermark) against the ``invisible-watermark`` package
(``imwatermark``: OpenCV + PyWavelets) and diffusers' ``StableDiffusionXLWatermarker``.

Test images are smooth colour fields with noise (what a decoder is meant for; pure noise
saturates once marked).  Measured on the dev VM: sd-jax's marked image differs from the
package's by <= 4.6e-5 (on the 0..255 scale: float32 rounding of the same arithmetic, OpenCV
and PyWavelets summing in their own order); tolerance 1e-3.  The whole SDXL pipeline at 256 px
is compared with diffusers' (its watermarker on): see ``test_sdxl_pipeline_marks_as_diffusers``.
"""
import numpy as np
import pytest

from sd_jax import watermark as wm

torch = pytest.importorskip("torch")
import imwatermark  # noqa: E402  (in the test extra: missing, the test fails rather than skips)

TOL = 1e-3  # on the 0..255 scale


def _images(n, h, w, seed=0):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        base = [128 + 60 * np.sin(xx / (17 + 5 * i) + c) * np.cos(yy / (29 - 3 * i) - c) for c in range(3)]
        out.append(np.stack(base, -1) + rng.normal(0, 8, (h, w, 3)))
    return np.asarray(out, np.float32)


def _package_encode(rgb):
    enc = imwatermark.WatermarkEncoder()
    enc.set_watermark("bits", list(wm.WATERMARK_BITS))
    return np.stack([enc.encode(np.ascontiguousarray(x[..., ::-1]), "dwtDct")[..., ::-1] for x in rgb])


def _package_decode(u8) -> list:
    return list(imwatermark.WatermarkDecoder("bits", 48).decode(np.ascontiguousarray(u8[..., ::-1]), "dwtDct"))


def test_message_is_diffusers():
    from diffusers.pipelines.stable_diffusion_xl.watermark import WATERMARK_BITS, WATERMARK_MESSAGE
    assert wm.WATERMARK_MESSAGE == WATERMARK_MESSAGE and list(wm.WATERMARK_BITS) == WATERMARK_BITS


@pytest.mark.parametrize("h, w", [(256, 320), (264, 300)])   # 264x300: blocks that do not tile the image
def test_encoder_matches_the_package_and_decodes(h, w):
    import jax
    x = _images(2, h, w)
    ours = np.asarray(jax.jit(wm.encode_dwt_dct)(x))
    ref = _package_encode(x)
    diff = float(np.abs(ours - ref).max())
    print(f"max |diff| {diff:.2e} (0..255)")
    assert diff <= TOL, diff
    assert float(np.abs(ref - x).max()) > 5   # the mark is there to compare
    u8 = lambda im: np.clip(np.round(im), 0, 255).astype(np.uint8)
    # dwtDct is not robust on every image (the package misreads a few bits of its own mark on
    # the second, busier one): the decoder reads the same from both, and the 48 bits from the first.
    for a, b in zip(ours, ref):
        assert _package_decode(u8(a)) == _package_decode(u8(b))
    assert _package_decode(u8(ours[0])) == list(wm.WATERMARK_BITS)


def test_apply_watermark_is_diffusers_watermarker():
    """On [-1, 1] NHWC images, VAE overshoot included (not clipped before marking, as diffusers);
    narrower than 256 px: untouched."""
    import jax
    from diffusers.pipelines.stable_diffusion_xl.watermark import StableDiffusionXLWatermarker
    x = _images(2, 256, 256, seed=1) / 127.5 - 1.0
    x[0, :8, :8] = 1.3                          # past the VAE's range
    ref = StableDiffusionXLWatermarker().apply_watermark(torch.from_numpy(x).permute(0, 3, 1, 2))
    ref = ref.permute(0, 2, 3, 1).numpy()
    ours = np.asarray(jax.jit(wm.apply_watermark)(x))
    assert float(np.abs(ours - ref).max()) <= TOL / 127.5
    small = x[:, :, :248]
    assert not wm.applies(256, 248) and wm.applies(256, 256)
    np.testing.assert_array_equal(np.asarray(wm.apply_watermark(small)), small)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from test_single_file_sdxl import build_sdxl
    from sd_jax.pipeline import StableDiffusionPipeline
    folder = str(tmp_path_factory.mktemp("sdxl_wm"))
    build_sdxl(folder, vae_levels=4)      # the VAE downscales by 8: 256 px from 32x32 latents
    return folder, StableDiffusionPipeline.from_pretrained(folder)


def test_sdxl_pipeline_marks_as_diffusers(sdxl):
    """256 px (latents 32x32), one Euler step, guidance 1; both sides get
    the same initial latents.  Marked images: equal to diffusers' (watermarker on) within
    1/255 for all but a few pixels (a tie in a block's largest coefficient could move it;
    measured: none), and they decode alike; ``watermark=False``: diffusers with the
    watermarker off."""
    from diffusers import StableDiffusionXLPipeline
    from tiny_models import nchw
    from sd_jax import families
    folder, pipe = sdxl
    assert pipe.family is families.SDXL and pipe.watermark
    lat = np.random.RandomState(0).randn(1, 32, 32, 4).astype(np.float32)
    kw = dict(num_inference_steps=1, guidance_scale=1.0, height=256, width=256)
    ours = pipe("a red circle", latents=lat, output_type="np", **kw)
    ours_u8 = np.round(ours * 255).astype(np.uint8)     # what output_type="uint8" rounds on the device
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=True)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe("a red circle", latents=nchw(lat), output_type="np", **kw).images
    far = np.abs(ours - ref) > 1 / 255
    print(f"pixels off by > 1/255: {far.mean():.2e}")
    assert far.mean() <= 1e-3, far.mean()
    # A random-weight model's image is no photograph: the decoder need not find all 48 bits in
    # it (test_encoder_matches_the_package_and_decodes shows it does on an image it can), but
    # it reads the same from sd-jax's image as from diffusers'.
    assert _package_decode(ours_u8[0]) == _package_decode(np.round(ref[0] * 255).astype(np.uint8))
    # Off (pipe.watermark = False, from_pretrained(watermark=False), --no-watermark): the plan
    # says so, and the images are those of the unmarked path the other SDXL tests compare.
    from sd_jax.request import GenerationRequest

    def marks(width=256, output="uint8"):
        return pipe.resolve(GenerationRequest("x", steps=1, height=256, width=width), output=output)[1].watermark
    assert marks() and not marks(output="latent") and not marks(width=248)
    pipe.watermark = False
    try:
        assert not marks()
    finally:
        pipe.watermark = True


def test_no_watermark_flag(sdxl):
    from sd_jax import cli, commands
    folder, _ = sdxl
    for flags, on in (([], True), (["--no-watermark"], False)):
        args = cli.build_parser().parse_args(["generate", "a cat", "--model", folder] + flags)
        assert commands.load(args).watermark is on


def test_batch_job_records_no_watermark():
    """A batch folder made with the mark is not silently continued without it (and jobs
    written before the flag existed read the same)."""
    from sd_jax import batch

    class Args:
        negative, seed, steps, guidance, rescale, size, scheduler, clip_skip, dtype = "", 0, None, None, 0.0, None, None, None, "fp32"
    raw = [(1, {"prompt": "a"})]
    marked = batch.job_of_args(Args, "m", raw)
    assert "watermark" not in marked["settings"]
    Args.no_watermark = True
    assert batch.job_changes(marked, batch.job_of_args(Args, "m", raw)) == ["--no-watermark (default) -> False"]
