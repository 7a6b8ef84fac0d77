"""End-to-end generation against diffusers' StableDiffusionPipeline on a tiny random model.

Images are compared as diffusers gives them, float32 in [0, 1] (``output_type="np"`` on both
sides): every pixel within ATOL.  Measured on the dev VM (x86-64, 2026-11-29): at most 9.2e-7
over these tests (float32 on both sides; what differs is the order of float32 operations in
two frameworks' kernels); ATOL leaves 5x for other CPUs.  Half a grey level would be 2e-3.
"""
import os

import jax
import numpy as np
import pytest

from tiny_models import build_tiny_pipeline, nchw

PROMPTS = ["a small red circle at the top left on a blue background", "a green square"]
NEG = ["a yellow triangle", ""]
STEPS = 6
SIZE = 32          # pixels; the tiny VAE downsamples by 2 -> 16x16 latents
ATOL = 5e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_tiny"))
    ref = build_tiny_pipeline(folder)
    from sd_jax.pipeline import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    return folder, ref, pipe



def init_latents(n, seed=0):
    return np.random.RandomState(seed).randn(n, SIZE // 2, SIZE // 2, 4).astype(np.float32)


def use_scheduler(ref, name):
    import diffusers
    cls, extra = {"ddim": ("DDIMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
                  "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
                  "pndm": ("PNDMScheduler", {"skip_prk_steps": True})}[name]
    ref.scheduler = getattr(diffusers, cls).from_config(ref.scheduler.config, **extra)


def assert_images_close(ours, theirs, atol=ATOL):
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    diff = np.abs(ours - theirs)
    assert diff.max() <= atol, f"max diff {diff.max():.2e}, mean {diff.mean():.2e}"


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmpp_2m", "pndm"])
def test_txt2img_matches_diffusers(tiny, scheduler):
    import torch
    _, ref, pipe = tiny
    lat = init_latents(2)
    use_scheduler(ref, scheduler)
    with torch.no_grad():
        want = ref(prompt=PROMPTS, negative_prompt=NEG, latents=nchw(lat), num_inference_steps=STEPS,
                   guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np").images
    got = pipe(PROMPTS, NEG, latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
               scheduler=scheduler, output_type="np")
    assert got.shape == (2, SIZE, SIZE, 3) and got.dtype == np.float32
    assert_images_close(got, want)
    assert got.std() > 0.01  # not a constant image


def test_guidance_rescale_matches_diffusers(tiny):
    import torch
    _, ref, pipe = tiny
    use_scheduler(ref, "ddim")
    lat = init_latents(1, seed=3)
    with torch.no_grad():
        want = ref(prompt=PROMPTS[:1], latents=nchw(lat), num_inference_steps=STEPS, guidance_scale=5.0,
                   guidance_rescale=0.7, height=SIZE, width=SIZE, output_type="np").images
    got = pipe(PROMPTS[:1], latents=lat, num_inference_steps=STEPS, guidance_scale=5.0, guidance_rescale=0.7,
               height=SIZE, width=SIZE, scheduler="ddim", output_type="np")
    assert_images_close(got, want)


def test_guidance_window_is_diffusers_guiders(tiny):
    """The guided steps of a window are those diffusers' ClassifierFreeGuidance(start=, stop=)
    guider enables (``_is_cfg_enabled``), for every step count and window of a grid."""
    from diffusers.guiders import ClassifierFreeGuidance
    from sd_jax.diffusion.denoisers import guidance_window
    checked = 0
    for start in (0.0, 0.1, 0.25, 0.33, 0.5, 0.83):
        for stop in (0.2, 0.5, 0.8, 0.83, 0.999, 1.0):
            if start >= stop:
                continue
            guider = ClassifierFreeGuidance(guidance_scale=7.5, start=start, stop=stop)
            for n in (1, 3, 6, 7, 20, 30, 50):
                want = []
                for j in range(n):
                    guider.set_state(step=j, num_inference_steps=n, timestep=None)
                    want.append(float(guider._is_cfg_enabled()))
                for first in (0, 4):  # img2img: the window is over the steps that run
                    got = guidance_window(start, stop, first, first + n)
                    assert got[:first].sum() == 0 and got[first:].tolist() == want, (start, stop, n, first)
                    checked += 1
    assert checked > 300


def _dynamic_cfg_reference(ref, prompt, lat, steps, scale, end):
    """diffusers' own recipe for guidance that stops early (the "dynamic classifier-free
    guidance" pipeline callback of its docs): after step int(end * n) - 1 the callback keeps only
    the prompt's half of the embeddings and turns guidance off."""
    import torch
    stop = int(end * steps)

    def callback(pipe, i, t, kwargs):
        if i == stop - 1:
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kwargs
    with torch.no_grad():
        return ref(prompt=[prompt], latents=nchw(lat), num_inference_steps=steps, guidance_scale=scale,
                   height=SIZE, width=SIZE, output_type="np", callback_on_step_end=callback,
                   callback_on_step_end_tensor_inputs=["prompt_embeds"]).images


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_guidance_end_matches_diffusers_dynamic_cfg(tiny, scheduler):
    """guidance_end: the last steps take the conditional prediction, as diffusers' documented
    callback does; one call with a different window per image (traced: one compiled program
    for any window), and the same window in every sampler step as diffusers'."""
    _, ref, pipe = tiny
    use_scheduler(ref, scheduler)
    lat = init_latents(2, seed=5)
    want = np.concatenate([_dynamic_cfg_reference(ref, PROMPTS[i], lat[i:i + 1], STEPS, 7.5, end)
                           for i, end in enumerate((0.5, 0.34))])
    got = pipe(PROMPTS, latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, guidance_end=[0.5, 0.34],
               height=SIZE, width=SIZE, scheduler=scheduler, output_type="np")
    assert_images_close(got, want)
    full = pipe(PROMPTS, latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                scheduler=scheduler, output_type="np")
    assert np.abs(full - got).max() > 1e-3  # the window changed the images
    n = pipe.compilations
    again = pipe(PROMPTS, latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, guidance_end=[0.9, 0.67],
                 guidance_start=[0.2, 0.0], height=SIZE, width=SIZE, scheduler=scheduler, output_type="np")
    assert pipe.compilations == n and np.abs(again - got).max() > 1e-3


def test_unguided_steps_run_the_conditional_half_alone():
    """Inside the sampling scan, a step at which no image of the batch is guided calls the model
    on the conditional half only (half the UNet work); a step at which any image is guided runs
    the doubled batch. Either way each image gets u + g (c - u) inside its window, c outside."""
    import jax.numpy as jnp

    from sd_jax.diffusion.denoisers import Conditioning, classifier_free_guidance
    sizes = []

    def make(cond):
        def fn(x, t, i):
            jax.debug.callback(lambda n: sizes.append(int(n)), jnp.asarray(x.shape[0]))
            return x * cond.context.mean(axis=(1, 2))[:, None, None, None] + t
        return fn

    rng = np.random.default_rng(0)
    cond, uncond = (Conditioning(jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)) for _ in range(2))
    window = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]], jnp.float32)
    scale = jnp.asarray([7.5, 3.0])
    fn = classifier_free_guidance(make, cond, uncond, scale, jnp.zeros(2), window)
    x = jnp.asarray(rng.normal(size=(2, 2, 2, 1)), jnp.float32)
    outs = jax.jit(lambda x: jax.lax.scan(lambda c, i: (c, fn(x, 0.5, i)), 0, jnp.arange(4))[1])(x)
    jax.effects_barrier()
    assert sizes == [4, 4, 2, 2]
    c = make(cond)(x, 0.5, 0)
    u = make(uncond)(x, 0.5, 0)
    guided = u + scale[:, None, None, None] * (c - u)
    for i in range(4):
        want = np.where(np.asarray(window[:, i])[:, None, None, None] > 0, guided, c)
        np.testing.assert_allclose(outs[i], want, rtol=1e-6, atol=1e-6)


def test_model_generation_defaults(tiny, tmp_path):
    """A model's generation_defaults.json sets the guidance window of requests that give none (an
    explicit one wins); it survives conversion to an sd-jax checkpoint and back to a diffusers
    folder, which diffusers still loads; a bad file is a one-line error naming it."""
    import json
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline as Reference

    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.weights.safetensors_io import CheckpointError
    folder, _, plain = tiny
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    (model / "generation_defaults.json").write_text(json.dumps({"guidance_end": 0.5}))
    pipe = StableDiffusionPipeline.from_pretrained(str(model))
    assert pipe.generation_defaults == {"guidance_end": 0.5}
    lat = init_latents(1, seed=6)
    kw = dict(latents=lat, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
              scheduler="ddim", output_type="np")
    np.testing.assert_array_equal(pipe(PROMPTS[:1], **kw), plain(PROMPTS[:1], guidance_end=0.5, **kw))
    np.testing.assert_array_equal(pipe(PROMPTS[:1], guidance_end=1.0, **kw), plain(PROMPTS[:1], **kw))
    r, _ = pipe.resolve(pipe.requests("x")[0])
    assert (r.guidance_start, r.guidance_end) == (0.0, 0.5)
    with pytest.raises(ValueError, match="generation_defaults.json"):   # start 0.6 >= the model's end 0.5
        pipe.resolve(pipe.requests("x", guidance_start=0.6)[0])

    pipe.save_pretrained(str(tmp_path / "ckpt"))
    again = StableDiffusionPipeline.from_pretrained(str(tmp_path / "ckpt"))
    assert again.generation_defaults == {"guidance_end": 0.5}
    again.save_pretrained(str(tmp_path / "back"), format="diffusers")
    assert json.loads((tmp_path / "back" / "generation_defaults.json").read_text()) == {"guidance_end": 0.5}
    Reference.from_pretrained(str(tmp_path / "back"), safety_checker=None)  # diffusers ignores the file

    for text, what in (('{"guidance_end": 2}', "guidance_end must be a number in [0, 1]"),
                       ('{"steps": 20}', "unknown setting(s) steps"),
                       ('{"guidance_start": 0.5, "guidance_end": 0.5}', "below guidance_end"),
                       ("{nope", "not valid JSON")):
        (model / "generation_defaults.json").write_text(text)
        with pytest.raises(CheckpointError) as e:
            StableDiffusionPipeline.from_pretrained(str(model))
        assert what in str(e.value) and "generation_defaults.json" in str(e.value) and "\n" not in str(e.value)


def _mean_posterior(monkeypatch):
    # sd-jax encodes init images to the posterior mean (a trained VAE's std is ~1e-3 of
    # the latent scale); make the reference do the same so the two can be compared.
    from diffusers.models.autoencoders import vae as dvae
    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def test_img2img_matches_diffusers(tiny, monkeypatch):
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as mod
    _, ref, pipe = tiny
    _mean_posterior(monkeypatch)
    noise = init_latents(1, seed=1)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: nchw(noise))
    image = (np.random.RandomState(2).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    i2i = StableDiffusionImg2ImgPipeline(**ref.components)
    use_scheduler(i2i, "ddim")
    with torch.no_grad():
        want = i2i(prompt=PROMPTS[:1], image=torch.from_numpy(image[None].transpose(0, 3, 1, 2) / 127.5 - 1).float(),
                   strength=0.6, num_inference_steps=10, guidance_scale=6.0, output_type="np").images
    got = pipe(PROMPTS[:1], image=image, strength=0.6, latents=noise, num_inference_steps=10, guidance_scale=6.0,
               height=SIZE, width=SIZE, scheduler="ddim", output_type="np")
    assert_images_close(got, want)


def _mask():
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[8:24, 4:20] = 255
    return m


@pytest.mark.parametrize("channels", [4, 9])
def test_inpaint_matches_diffusers(tiny, tmp_path, monkeypatch, channels):
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from sd_jax.pipeline import StableDiffusionPipeline
    _mean_posterior(monkeypatch)
    if channels == 9:
        folder = str(tmp_path / "inpaint")
        ref = build_tiny_pipeline(folder, in_channels=9, seed=1)
        pipe = StableDiffusionPipeline.from_pretrained(folder)
    else:  # an ordinary checkpoint: masked latent blending after every step
        _, base, pipe = tiny
        ref = StableDiffusionInpaintPipeline(**base.components)
    use_scheduler(ref, "ddim")
    ref.set_progress_bar_config(disable=True)
    noise = init_latents(1, seed=4)
    image = (np.random.RandomState(5).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)
    from PIL import Image
    with torch.no_grad():
        want = ref(prompt=PROMPTS[:1], image=Image.fromarray(image), mask_image=Image.fromarray(_mask()),
                   latents=nchw(noise), strength=1.0, num_inference_steps=STEPS, guidance_scale=7.0,
                   height=SIZE, width=SIZE, output_type="np").images
    got = pipe(PROMPTS[:1], image=image, mask_image=_mask(), latents=noise, strength=1.0, num_inference_steps=STEPS,
               guidance_scale=7.0, height=SIZE, width=SIZE, scheduler="ddim", output_type="np")
    assert_images_close(got, want)


def test_same_image_whatever_batch_position_and_device_count(tiny):
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    folder, _, pipe8 = tiny
    assert pipe8.mesh.devices.size == 8
    pipe1 = StableDiffusionPipeline.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]))
    kw = dict(num_inference_steps=4, height=SIZE, width=SIZE, scheduler="euler_a", output_type="uint8")
    alone = pipe1(PROMPTS[1], seed=11, **kw)[0]
    batch1 = pipe1([PROMPTS[0], PROMPTS[1], PROMPTS[0]], seed=[3, 11, 5], **kw)
    batch8 = pipe8([PROMPTS[0], PROMPTS[0], PROMPTS[1]], seed=[9, 5, 11], **kw)
    # XLA may tile a convolution differently for another batch size: allow one level.
    for other in (batch1[1], batch8[2]):
        assert np.abs(alone.astype(int) - other.astype(int)).max() <= 1
    assert np.abs(batch1[2].astype(int) - batch8[1].astype(int)).max() <= 1
    assert np.abs(batch1[0].astype(int) - batch1[2].astype(int)).max() > 0  # seeds matter


def test_scan_and_python_loop_agree(tiny):
    _, _, pipe = tiny
    kw = dict(seed=4, num_inference_steps=4, height=SIZE, width=SIZE, scheduler="dpmpp_2m", output_type="np")
    a = pipe(PROMPTS[0], loop="scan", **kw)
    b = pipe(PROMPTS[0], loop="python", **kw)
    assert np.abs(a - b).max() <= 1e-5
    kw["num_inference_steps"] = 1  # the eager debug loop is slow: one step shows it computes the same
    c = pipe(PROMPTS[0], loop="debug", **kw)
    assert np.abs(pipe(PROMPTS[0], loop="scan", **kw) - c).max() <= 1e-4


def test_orbax_and_diffusers_round_trip(tiny, tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline as TorchPipeline
    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.weights.convert import flatten
    from sd_jax.weights.safetensors_io import load_file
    folder, ref, pipe = tiny
    from sd_jax.weights.safetensors_io import CheckpointError
    pipe.save_pretrained(str(tmp_path / "ckpt"), format="orbax")
    pipe.save_pretrained(str(tmp_path / "ckpt"), format="orbax")  # saving over an sd-jax checkpoint replaces it
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="not an sd-jax checkpoint"):
        pipe.save_pretrained(str(tmp_path / "other"), format="orbax")
    assert (tmp_path / "other" / "keep.txt").read_text() == "user data"
    back = StableDiffusionPipeline.from_pretrained(str(tmp_path / "ckpt"))
    a, b = flatten(jax.device_get(pipe.params)), flatten(jax.device_get(back.params))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    back.save_pretrained(str(tmp_path / "export"), format="diffusers")
    for comp, fname in [("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                        ("text_encoder", "model")]:
        orig = load_file(os.path.join(folder, comp, fname + ".safetensors"))
        new = load_file(str(tmp_path / "export" / comp / (fname + ".safetensors")))
        canon = lambda k: k if k.startswith("text_model.") or comp != "text_encoder" else "text_model." + k
        orig = {canon(k): v for k, v in orig.items() if not k.endswith("position_ids")}
        assert orig.keys() == new.keys()
        assert all(np.array_equal(orig[k], new[k]) for k in orig), comp
    loaded = TorchPipeline.from_pretrained(str(tmp_path / "export"), safety_checker=None)
    lat = init_latents(1)
    kw = dict(num_inference_steps=3, guidance_scale=7.5, height=SIZE, width=SIZE, output_type="np")
    use_scheduler(ref, "ddim")
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    with torch.no_grad():
        x = loaded(prompt=PROMPTS[:1], latents=nchw(lat), **kw).images
        y = ref(prompt=PROMPTS[:1], latents=nchw(lat), **kw).images
    np.testing.assert_allclose(x, y, atol=1e-6)  # same weights, same PyTorch code


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=30, width=32), "multiples of 8"),
    (dict(scheduler="nope"), "nope"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(seed=-1), "seed"),
    (dict(strength=0.01, image=np.zeros((SIZE, SIZE, 3), np.uint8)), "no denoising step"),
])
def test_bad_generation_arguments(tiny, kwargs, match):
    _, _, pipe = tiny
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=4)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe("a red circle", **kw)


def test_bad_model_folders(tiny, tmp_path):
    import shutil
    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.weights.safetensors_io import CheckpointError
    folder, _, _ = tiny
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="missing its vae/"):
        StableDiffusionPipeline.from_pretrained(str(broken))
    shutil.copytree(os.path.join(folder, "vae"), broken / "vae")
    w = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        StableDiffusionPipeline.from_pretrained(str(broken))
    w.unlink()
    (broken / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        StableDiffusionPipeline.from_pretrained(str(broken))
    with pytest.raises(CheckpointError, match="not found"):
        StableDiffusionPipeline.from_pretrained(str(tmp_path / "nowhere"))
