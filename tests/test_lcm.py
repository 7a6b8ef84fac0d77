"""LCM-distilled UNets (``time_cond_proj_dim``: guidance as an embedding) and the ``lcm`` sampler in the
pipeline, against diffusers 0.42 PyTorch (fp32).

The sampler alone is checked step by step against ``LCMScheduler`` in tests/test_schedulers.py.
Here: the guidance embedding and the UNet's ``time_embedding.cond_proj`` (tiny SD 1.x and SDXL
UNets saved by diffusers, <= 1e-4), and whole images of a tiny ``LatentConsistencyModelPipeline``
(within 2/255, 4 steps, guidance 8, the LCM noise fed from sd-jax's seeds).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.models.embeddings import get_guidance_scale_embedding  # noqa: E402
from sd_jax.models.unet import UNetConfig, load  # noqa: E402
from test_unet import TOL, _inputs, _run, _torch_unet  # noqa: E402
from tiny_models import build_tiny_pipeline, nchw  # noqa: E402

PROJ = 32
LCM = diffusers.LatentConsistencyModelPipeline


def test_guidance_embedding_equals_diffusers():
    """Equal up to the sines' arguments ``1000 w f``: torch's and XLA's float32 ``exp`` differ by an ulp
    in some frequencies ``f``, which at ``1000 w = 7000`` moves the argument by up to ~4e-4
    (measured 1.1e-4 on the embedding); the odd width pads with a zero as diffusers."""
    w = np.array([7.0, 0.0, 0.5], np.float32)
    for dim in (PROJ, 7):
        ref = LCM.get_guidance_scale_embedding(None, torch.from_numpy(w), embedding_dim=dim).numpy()
        np.testing.assert_allclose(np.asarray(get_guidance_scale_embedding(w, dim)), ref, rtol=0, atol=5e-4)


def _torch_out(m, x, t, ctx, cond, added):
    with torch.inference_mode():
        out = m(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.as_tensor(t), torch.from_numpy(ctx),
                timestep_cond=torch.from_numpy(np.array(cond)),
                added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
    return out.numpy().transpose(0, 2, 3, 1)


def test_unet_time_cond_proj_parity(tmp_path):
    """A tiny SDXL UNet (as latent-consistency/lcm-sdxl) with ``time_cond_proj_dim=32`` saved by diffusers:
    <= 1e-4 with per-sample guidance embeddings (w = 7 and 1.5), which change diffusers' output (so
    cond_proj is exercised).  The SD 1.x UNet's cond_proj is the same code: the pipeline test below
    loads one from a LatentConsistencyModelPipeline folder."""
    cfg = UNetConfig.from_dict({**UNetConfig.tiny_sdxl().to_dict(), "time_cond_proj_dim": PROJ})
    assert cfg.time_cond_proj_dim == PROJ
    tm = _torch_unet(cfg)
    tm.save_pretrained(tmp_path / "unet")
    model, params = load(str(tmp_path / "unet"), dtype=jnp.float32)
    assert params["time_embedding"]["cond_proj"]["kernel"].shape == (cfg.block_out_channels[0], PROJ)
    x, ctx = _inputs(cfg, 8, seq=5)
    t = np.array([999, 259])
    cond = np.asarray(get_guidance_scale_embedding(np.array([7.0, 1.5], np.float32), PROJ))
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    added = {"text_embeds": np.random.default_rng(3).standard_normal((2, pooled)).astype(np.float32),
             "time_ids": np.array([[64, 64, 0, 0, 64, 64]] * 2, np.float32)}
    ref = _torch_out(tm, x, t, ctx, cond, added)
    out = np.asarray(_run(model, params, x, t, ctx, added, None, None, cond))
    diff = float(np.abs(out - ref).max())
    assert diff < TOL, diff
    # the embedding matters: with the two swapped diffusers' output is another
    assert np.abs(_torch_out(tm, x, t, ctx, cond[::-1].copy(), added) - ref).max() > 1e-3


@pytest.fixture(scope="module")
def lcm_pipes(tmp_path_factory):
    """A tiny LatentConsistencyModelPipeline folder (LCMScheduler, UNet with time_cond_proj_dim=32) built
    from the tiny SD 1.x components; (torch pipeline, sd-jax pipeline)."""
    root = tmp_path_factory.mktemp("lcm_tiny")
    sd = build_tiny_pipeline(str(root / "sd"))
    cfg = {k: v for k, v in sd.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel(**{**cfg, "time_cond_proj_dim": PROJ}).eval()
    missing, unexpected = unet.load_state_dict(sd.unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and not unexpected
    sched = diffusers.LCMScheduler.from_config({k: v for k, v in sd.scheduler.config.items()
                                                if k not in ("steps_offset", "set_alpha_to_one")})
    pipe = LCM(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=unet, scheduler=sched,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = str(root / "lcm")
    pipe.save_pretrained(folder)
    pipe = LCM.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    ours = StableDiffusionPipeline.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]))
    return pipe, ours, str(root)


def test_lcm_unet_file_into_a_base_model(lcm_pipes):
    """``--unet FILE`` / ``unet=``: an LCM-distilled UNet-only file (latent-consistency/lcm-sdxl's kind) into
    an ordinary base model gets the base's UNet plus ``time_cond_proj_dim`` from its ``cond_proj``; an
    ordinary UNet file into an LCM model drops it again."""
    from sd_jax.weights import loader
    from sd_jax.weights.convert import params_to_state_dict
    from sd_jax.weights.safetensors_io import load_file

    root = lcm_pipes[2]
    base = loader.load(os.path.join(root, "sd"))
    assert base.models.unet.config.time_cond_proj_dim is None
    path = os.path.join(root, "lcm", "unet", "diffusion_pytorch_model.safetensors")
    lcm = loader.with_unet(base, path)
    assert lcm.models.unet.config == base.models.unet.config.__class__.from_dict(
        {**base.models.unet.config.to_dict(), "time_cond_proj_dim": PROJ})
    got, want = params_to_state_dict(lcm.params["unet"]), load_file(path)
    assert set(got) == set(want)
    np.testing.assert_array_equal(got["time_embedding.cond_proj.weight"], want["time_embedding.cond_proj.weight"])
    plain = loader.with_unet(lcm, os.path.join(root, "sd", "unet", "diffusion_pytorch_model.safetensors"))
    assert plain.models.unet.config == base.models.unet.config


def test_lcm_pipeline_images_equal_diffusers(lcm_pipes, monkeypatch):
    """4 steps, guidance 8, two prompts: images within 2/255 of diffusers' LatentConsistencyModelPipeline
    fed the same initial latents and the same per-step noise (sd-jax's, drawn from each image's seed);
    the UNet runs once per step (no classifier-free guidance), and the guidance scale reaches it."""
    ref_pipe, pipe, _ = lcm_pipes
    assert pipe.scheduler_name == "lcm"
    prompts, seeds, steps, guidance = ["a red cube", "two blue spheres"], [3, 11], 4, 8.0
    r, plan = pipe.resolve(pipe.requests(prompts, seed=seeds, num_inference_steps=steps,
                                         guidance_scale=guidance, height=32, width=32)[0])
    assert plan.sampler.name == "lcm" and not plan.guidance
    shape = plan.latent_shape
    # sd-jax's noise: step k of a sample is normal(fold_in(key(seed), k)); k = 0 is the initial latents
    noise = [np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(s), k), shape))
                       for s in seeds]) for k in range(steps + 1)]
    step = {"k": 0}

    def fake_randn(shape_, generator=None, device=None, dtype=None, layout=None):
        step["k"] += 1
        return nchw(noise[step["k"]]).to(dtype or torch.float32)

    monkeypatch.setattr(sys.modules[type(ref_pipe.scheduler).__module__], "randn_tensor", fake_randn)
    calls = {"n": 0}
    unet_forward = ref_pipe.unet.forward

    def counted(*a, **kw):
        calls["n"] += 1
        return unet_forward(*a, **kw)

    monkeypatch.setattr(ref_pipe.unet, "forward", counted)
    ref = ref_pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32,
                   latents=nchw(noise[0]), output_type="np").images
    assert calls["n"] == steps and step["k"] == steps - 1
    out = np.asarray(pipe(prompts, seed=seeds, num_inference_steps=steps, guidance_scale=guidance,
                          height=32, width=32, output_type="np"))
    diff = float(np.abs(out - ref).max())
    assert diff <= 2 / 255, diff
    other = np.asarray(pipe(prompts, seed=seeds, num_inference_steps=steps, guidance_scale=2.0,
                            height=32, width=32, output_type="np"))
    assert np.abs(other - out).max() > 1e-3
