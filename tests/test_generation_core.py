"""The generation core's seams: static guidance on/off, the sampling loop split and continued,
diffusers' denoising_start/_end, the request path (GenerationRequest, Dispatcher)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.diffusion import samplers
from sd_jax.diffusion.sampling import sample, step_range
from sd_jax.request import Dispatcher, GenerationRequest, RequestError, bucket_sizes
from tiny_models import build_tiny_pipeline, nchw

SIZE = 32
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, set_alpha_to_one=False, clip_sample=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sd_tiny_core"))
    ref = build_tiny_pipeline(folder)
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]))
    return folder, ref, pipe


def _sampler_names():
    names = sorted(samplers.SCHEDULERS)
    return names + [n + "_karras" for n in names if samplers.SCHEDULERS[n].supports_karras]


def _toy_model(x, t, i):
    # Any smooth function of (x, t) stands in for the network: the loop's bookkeeping is under test.
    return 0.3 * jnp.tanh(x) + 1e-3 * t.astype(jnp.float32) * jnp.cos(x)


def _noise(i):
    return jax.random.normal(jax.random.fold_in(jax.random.key(7), i), (2, 4, 4, 3))


@pytest.mark.parametrize("name", _sampler_names())
def test_sampling_split_and_continued_equals_one_run(name):
    s = samplers.make_sampler(name, SD15_SCHEDULER, 8)
    x0 = _noise(0) * s.init_noise_sigma
    kw = dict(noise_fn=_noise)
    whole, _ = jax.jit(lambda x: sample(_toy_model, s, x, **kw))(x0)
    split = s.num_steps // 2 + 1
    first, state = jax.jit(lambda x: sample(_toy_model, s, x, end=split, **kw))(x0)
    second, _ = jax.jit(lambda x, st: sample(_toy_model, s, x, start=split, state=st, **kw))(first, state)
    np.testing.assert_array_equal(np.asarray(second), np.asarray(whole))
    assert not np.allclose(np.asarray(first), np.asarray(whole))  # the split point is really mid-way


@pytest.mark.parametrize("name, cls, steps, start, end", [
    ("euler", "EulerDiscreteScheduler", 20, None, 0.8),
    ("euler", "EulerDiscreteScheduler", 20, 0.8, None),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", 25, 0.7, None),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", 25, None, 0.7),
    ("heun", "HeunDiscreteScheduler", 10, 0.75, None),
])
def test_step_range_matches_diffusers(name, cls, steps, start, end):
    import diffusers
    sched = getattr(diffusers, cls).from_config(SD15_SCHEDULER)  # ignores keys the class lacks
    sched.set_timesteps(steps)
    ts = sched.timesteps.numpy()
    cutoff = lambda frac: int(round(1000 - frac * 1000))
    want_start, want_end = 0, len(ts)
    if end is not None:  # diffusers' StableDiffusionXLPipeline, "8.1 Apply denoising_end"
        want_end = len([t for t in ts if t >= cutoff(end)])
    if start is not None:  # diffusers' StableDiffusionXLImg2ImgPipeline.get_timesteps
        n = int((ts < cutoff(start)).sum())
        if sched.order == 2 and n % 2 == 0:
            n += 1
        want_start = len(ts) - n
    s = samplers.make_sampler(name, SD15_SCHEDULER, steps)
    assert step_range(s, denoising_start=start, denoising_end=end) == (want_start, want_end)
    assert 0 < want_end - want_start < len(ts)


def test_step_range_rejects_bad_fractions():
    s = samplers.make_sampler("euler", SD15_SCHEDULER, 10)
    with pytest.raises(ValueError, match="denoising_end must be in"):
        step_range(s, denoising_end=1.5)
    with pytest.raises(ValueError, match="leave no step"):
        step_range(s, denoising_start=0.6, denoising_end=0.5)


def test_guidance_one_matches_diffusers(tiny):
    import torch
    _, ref, pipe = tiny
    import diffusers
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    lat = np.random.RandomState(5).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    prompts = ["a red circle", "a blue square on a white background"]
    with torch.no_grad():
        want = ref(prompt=prompts, negative_prompt=["a cat", ""], latents=nchw(lat), num_inference_steps=5,
                   guidance_scale=1.0, height=SIZE, width=SIZE, output_type="np").images
    got = pipe(prompts, ["a cat", ""], latents=lat, num_inference_steps=5, guidance_scale=1.0, height=SIZE,
               width=SIZE, scheduler="ddim", output_type="np")
    assert np.abs(got - want).max() <= 5e-6  # as tests/test_pipeline.py's ATOL
    # The negative prompt is ignored without guidance (as in diffusers): same images without it.
    again = pipe(prompts, latents=lat, num_inference_steps=5, guidance_scale=1.0, height=SIZE, width=SIZE,
                 scheduler="ddim", output_type="np")
    np.testing.assert_array_equal(again, got)


def test_guidance_one_runs_the_unet_once_per_step(tiny):
    _, _, pipe = tiny

    def flops(g):
        lowered = pipe.lower(batch_size=2, height=SIZE, width=SIZE, num_inference_steps=3, scheduler="ddim",
                             guidance_scale=g, output="latent")
        return lowered.compile().cost_analysis()["flops"]

    ratio = flops(1.0) / flops(7.5)
    # Everything that remains (UNet and text encoder) runs on half the rows.
    assert 0.45 < ratio < 0.55, ratio


def test_output_types(tiny):
    _, _, pipe = tiny
    kw = dict(seed=3, num_inference_steps=2, height=SIZE, width=SIZE, scheduler="euler")
    f = pipe("a green square", output_type="np", **kw)
    u = pipe("a green square", output_type="uint8", **kw)
    lat = pipe("a green square", output_type="latent", **kw)
    pil = pipe("a green square", **kw)
    assert f.dtype == np.float32 and 0.0 <= f.min() and f.max() <= 1.0 and f.shape == (1, SIZE, SIZE, 3)
    assert u.dtype == np.uint8
    np.testing.assert_array_equal(u, np.round(f * 255).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(pil[0]), u[0])
    assert lat.shape == (1, SIZE // 2, SIZE // 2, 4) and lat.dtype == np.float32
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", output_type="pt", **kw)


def test_changing_prompt_seed_guidance_does_not_recompile(tiny):
    _, _, pipe = tiny
    kw = dict(num_inference_steps=3, height=SIZE, width=SIZE, scheduler="ddim", output_type="uint8")
    pipe("a red circle", seed=1, guidance_scale=3.0, **kw)
    n = pipe.compilations
    pipe("a blue square on a white background", "a cat", seed=77, guidance_scale=9.0, guidance_rescale=0.3, **kw)
    pipe(["x"], seed=[5], guidance_scale=[12.0], **kw)
    assert pipe.compilations == n
    pipe("a red circle", seed=1, guidance_scale=1.0, **kw)  # guidance off: another program
    assert pipe.compilations == n + 1


def test_dispatcher_groups_pads_and_keeps_order(tiny):
    _, _, pipe = tiny
    base = dict(steps=2, width=SIZE, height=SIZE, scheduler="euler")
    reqs = [GenerationRequest("a red circle", seed=1, guidance=5.0, **base),
            GenerationRequest("a red circle", seed=2, guidance=1.0, **base),        # unguided: its own group
            GenerationRequest("a white square", seed=3, guidance=5.0, **base),
            GenerationRequest("a white square", seed=4, guidance=5.0, **dict(base, steps=3)),
            GenerationRequest("a blue star", seed=5, guidance=5.0, **base)]
    d = Dispatcher(pipe, batch_size=2, output="float32")
    groups = d.plan(reqs)
    assert [[i for i, _ in g] for _, g in groups] == [[0, 2, 4], [1], [3]]
    got = d.generate(reqs)
    for r, img in zip(reqs, got):  # each image equals its request generated alone
        alone = Dispatcher(pipe, output="float32").generate([r])[0]
        assert np.abs(img - alone).max() <= 1e-5
    assert bucket_sizes(8, 20) == [8, 16, 24] and bucket_sizes(1, 4) == [1, 2, 4] and bucket_sizes(4, 2) == [4]


def test_dispatcher_precompiles_and_reuses_shapes(tiny):
    _, _, pipe = tiny
    r = GenerationRequest("a purple triangle", steps=2, width=SIZE, height=SIZE, scheduler="ddim", guidance=4.0)
    d = Dispatcher(pipe, batch_size=4, output="uint8")
    n0 = pipe.compilations
    assert d.precompile([r], sizes=[4]) == 1
    assert pipe.compilations == n0 + 1
    d.generate([r.replace(seed=s) for s in range(5)])  # 4 + 1: the 1 is padded to the compiled 4
    assert pipe.compilations == n0 + 1


@pytest.mark.parametrize("fields, match", [
    (dict(prompt=42), "prompt must be text"),
    (dict(guidance=float("nan")), "guidance .* finite"),
    (dict(guidance=float("inf")), "finite"),
    (dict(guidance_rescale=float("nan")), "guidance_rescale must be a finite"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
    (dict(guidance_end=0.0), "0 <= guidance_start < guidance_end <= 1"),
    (dict(guidance_start=0.5, guidance_end=0.5), "guidance_start < guidance_end"),
    (dict(guidance_end=1.5), "guidance_end <= 1"),
    (dict(guidance_start=float("nan")), "guidance_start must be a finite"),
    (dict(seed=-1), "seed"),
    (dict(seed=2**32), "seed"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps .* integer"),
    (dict(width=30), "multiples of 8"),
    (dict(scheduler="nope"), "unknown scheduler 'nope'"),
    (dict(mask="m.png"), "needs an image"),
    (dict(image="i.png", strength=0.0), "strength"),
])
def test_request_validation(fields, match):
    kw = dict(prompt="a red circle")
    kw.update(fields)
    with pytest.raises(RequestError, match=match):
        GenerationRequest(**kw)


def test_request_canonical_fields():
    r = GenerationRequest("x", scheduler="Euler-A", steps=np.int64(4), clip_skip=0, guidance=np.float32(2))
    assert (r.scheduler, r.steps, r.clip_skip, r.guidance, r.mode, r.guided) == ("euler_a", 4, None, 2.0, "txt2img", True)
