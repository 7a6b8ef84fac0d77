"""SDXL refiner, base -> refiner hand-off, img2img and inpainting against diffusers 0.42.

Tiny random models saved by diffusers PyTorch: the SDXL base of test_sdxl_pipeline and a
refiner (``StableDiffusionXLImg2ImgPipeline`` with no first text encoder / tokenizer,
``requires_aesthetics_score``, a UNet taking 5 time ids), read by sd-jax's loader.  Images
as float32 in [0, 1] on both sides, the same noise; the reference encodes init images to
the posterior mean as sd-jax does.  Measured on the dev VM (float32 both sides): <= 1e-6;
tolerance ATOL = 5e-6 (2/255 would be 7.8e-3).
"""
import json
import os

import numpy as np
import pytest

from test_sdxl_pipeline import NEG, PROMPTS, SIZE, _close, _tokenizer, build_tiny_sdxl, init_latents
from tiny_models import nchw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEPS = 5


def build_tiny_refiner(folder, seed=1):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from sd_jax.families import sdxl_scheduler_config
    from sd_jax.models.unet import UNetConfig
    from sd_jax.models.vae import VAEConfig

    torch.manual_seed(seed)
    tok2, vocab = _tokenizer(os.path.join(folder, "_tok2"), pad="!")
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tok2.bos_token_id, eos_token_id=tok2.eos_token_id, num_hidden_layers=3, projection_dim=32,
        hidden_act="gelu", pad_token_id=0)).eval()
    # the refiner's UNet: 32-wide context (encoder 2 alone), 5 time ids (size, crop, aesthetic score);
    # one ResNet and transformer layer per block (it compiles with the base in one program)
    ucfg = UNetConfig.tiny_sdxl(cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8,
                                layers_per_block=1, transformer_layers_per_block=(1, 1)).to_dict()
    unet = UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")}).eval()
    vcfg = VAEConfig.tiny().to_dict()
    vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
    sched = EulerDiscreteScheduler.from_config({k: v for k, v in sdxl_scheduler_config().items()
                                                if not k.startswith("_")})
    pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                            tokenizer_2=tok2, unet=unet, scheduler=sched,
                                            requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                            add_watermarker=False)
    pipe.save_pretrained(folder)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load(folder):
    """One device: the batch is not padded to the 8 fake devices (compiles and runs faster)."""
    import jax
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base_dir, ref_dir = str(tmp_path_factory.mktemp("sdxl_base")), str(tmp_path_factory.mktemp("sdxl_refiner"))
    base_ref, refiner_ref = build_tiny_sdxl(base_dir), build_tiny_refiner(ref_dir)
    return base_ref, load(base_dir), refiner_ref, load(ref_dir), ref_dir


@pytest.fixture
def mean_posterior(monkeypatch):
    # sd-jax encodes init images to the posterior mean; make the reference do the same.
    from diffusers.models.autoencoders import vae as dvae
    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _image(seed):
    return (np.random.RandomState(seed).rand(SIZE, SIZE, 3) * 255).astype(np.uint8)


def test_refiner_folder_loads_and_saves_as_the_hub_holds_it(models, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from sd_jax import families
    _, _, refiner_ref, refiner, ref_dir = models
    with open(os.path.join(ref_dir, "model_index.json")) as f:
        index = json.load(f)
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    assert refiner.family is families.SDXL_REFINER and refiner.models.text_encoder is None
    assert refiner.options == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    assert set(refiner.tokenizers) == {"tokenizer_2"}
    out = str(tmp_path / "saved")
    refiner.save_pretrained(out, format="diffusers")
    with open(os.path.join(out, "model_index.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in ("_class_name", "text_encoder", "tokenizer", "requires_aesthetics_score")} == \
        {k: index[k] for k in ("_class_name", "text_encoder", "tokenizer", "requires_aesthetics_score")}
    again = StableDiffusionXLImg2ImgPipeline.from_pretrained(out, add_watermarker=False)
    a, b = refiner_ref.unet.state_dict(), again.unet.state_dict()
    assert again.text_encoder is None and all(torch.equal(a[k], b[k]) for k in a)


def test_refiner_img2img_matches_diffusers(models, mean_posterior, monkeypatch):
    """The refiner on its own: img2img with strength and non-default aesthetic scores."""
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as mod
    _, _, refiner_ref, refiner, _ = models
    noise = init_latents(1, seed=4)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: nchw(noise))
    image = _image(5)
    kw = dict(strength=0.6, num_inference_steps=STEPS * 2, guidance_scale=6.0, aesthetic_score=7.0,
              negative_aesthetic_score=2.0)
    with torch.no_grad():
        want = refiner_ref(PROMPTS[:1], negative_prompt=NEG[:1], output_type="np",
                           image=torch.from_numpy(image[None].transpose(0, 3, 1, 2) / 255.0).float(), **kw).images
    got = refiner(PROMPTS[:1], NEG[:1], image=image, latents=noise, height=SIZE, width=SIZE, output_type="np", **kw)
    _close(got, want)


def test_refiner_inpaint_blending_matches_diffusers(models, mean_posterior, monkeypatch):
    """StableDiffusionXLInpaintPipeline on a 4-channel UNet (the refiner's, the smallest here):
    masked latent blending after every step, aesthetic-score time ids."""
    from PIL import Image
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as mod
    _, _, refiner_ref, refiner, _ = models
    ref = StableDiffusionXLInpaintPipeline(**refiner_ref.components, requires_aesthetics_score=True,
                                           force_zeros_for_empty_prompt=False)
    ref.set_progress_bar_config(disable=True)
    noise = init_latents(1, seed=6)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **k: nchw(noise))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    image = _image(7)
    kw = dict(strength=0.7, num_inference_steps=STEPS + 1, guidance_scale=5.0, height=SIZE, width=SIZE,
              output_type="np", aesthetic_score=5.0)
    with torch.no_grad():
        want = ref(PROMPTS[:1], image=Image.fromarray(image), mask_image=Image.fromarray(mask), **kw).images
    got = refiner(PROMPTS[:1], image=image, mask_image=mask, latents=noise, **kw)
    _close(got, want)


def test_sdxl_inpainting_unet_matches_diffusers(tmp_path, mean_posterior, monkeypatch):
    """A 9-channel SDXL inpainting UNet (StableDiffusionXLInpaintPipeline folder), with
    non-default micro-conditioning under the img2img/inpaint rules (the negative row takes the
    positive crop corner) and strength < 1."""
    from PIL import Image
    from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_inpaint as mod
    from sd_jax import families
    ref = build_tiny_sdxl(str(tmp_path), seed=2, in_channels=9, layers_per_block=1, transformer_layers_per_block=(1, 1))
    pipe = load(str(tmp_path))
    assert pipe.family is families.SDXL and pipe.models.unet.config.in_channels == 9
    noise = init_latents(1, seed=8)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:20, 8:28] = 255
    image = _image(9)
    micro = dict(original_size=(48, 40), crops_coords_top_left=(8, 4), negative_original_size=(24, 24),
                 negative_target_size=(16, 32))
    kw = dict(strength=0.75, num_inference_steps=STEPS + 3, guidance_scale=5.0, height=SIZE, width=SIZE,
              output_type="np", **micro)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **k: nchw(noise))
    with torch.no_grad():
        want = ref(PROMPTS[:1], negative_prompt=NEG[:1], image=Image.fromarray(image),
                   mask_image=Image.fromarray(mask), **kw).images
    got = pipe(PROMPTS[:1], NEG[:1], image=image, mask_image=mask, latents=noise, **kw)
    _close(got, want)
    assert pipe.save_pretrained(str(tmp_path / "saved"), format="diffusers") is None
    with open(tmp_path / "saved" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusionXLInpaintPipeline"


def test_refiner_pairing_errors(models):
    from sd_jax.ensemble import SDXLEnsemble
    from sd_jax.request import RequestError
    _, base, _, refiner, _ = models
    for switch in (0.0, 1.0, 1.5, "0.8"):
        with pytest.raises(RequestError, match=r"switch must be in \(0, 1\)"):
            SDXLEnsemble(base, refiner, switch)
    with pytest.raises(RequestError, match="continues an SDXL base model"):
        SDXLEnsemble(refiner, refiner)
    ens = SDXLEnsemble(base, refiner)
    with pytest.raises(RequestError, match="text-to-image"):
        ens(PROMPTS[0], image=_image(1))


def _cli_error(capsys, argv):
    from sd_jax import cli
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd-jax: error:") and err.count("\n") == 1, err
    return err


def test_cli_refiner_errors_are_one_line(models, tmp_path, monkeypatch, capsys):
    """A switch outside (0, 1), a refiner for a non-SDXL base, a refiner as the only model."""
    monkeypatch.setenv("SD_JAX_CACHE", str(tmp_path / "xla"))
    _, base, _, refiner, ref_dir = models
    shapes = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")
    out = str(tmp_path / "a.png")
    for argv, fragment in (
            (["--model", shapes, "--refiner", ref_dir, "--refiner-switch", "1.5"], "--refiner-switch must be in (0, 1)"),
            (["--model", shapes, "--refiner-switch", "0.5"], "--refiner-switch needs --refiner"),
            (["--model", shapes, "--refiner", ref_dir], "continues an SDXL base model"),
            (["--model", ref_dir], "is an SDXL refiner")):
        assert fragment in _cli_error(capsys, ["generate", "x", "-o", out, "--size", "32x32", *argv])
    assert not os.path.exists(out)


def test_cli_base_to_refiner_hand_off_matches_diffusers(models, tmp_path, monkeypatch):
    """``sd-jax generate --model BASE --refiner REFINER --refiner-switch 0.8`` (base and refiner in
    one compiled function, the latents handed over on the devices) against diffusers' ensemble
    of experts: base with ``denoising_end=0.8`` (latents out), refiner with ``denoising_start=0.8``
    on those latents, from sd-jax's seeded noise.  The PNG is uint8: within one grey level."""
    import jax
    from PIL import Image
    from sd_jax import cli, sharding
    monkeypatch.setenv("SD_JAX_CACHE", str(tmp_path / "xla"))
    make_mesh = sharding.make_mesh  # one device, as the other tests here
    monkeypatch.setattr(sharding, "make_mesh", lambda devices=None: make_mesh(devices or jax.devices()[:1]))
    base_ref, base, refiner_ref, refiner, ref_dir = models
    out, seed = str(tmp_path / "a.png"), 3
    assert cli.main(["generate", PROMPTS[0], "--negative", NEG[0], "--model", base.source, "--refiner", ref_dir,
                     "--refiner-switch", "0.8", "--size", f"{SIZE}x{SIZE}", "--steps", str(STEPS), "--guidance", "5",
                     "--seed", str(seed), "--scheduler", "euler", "--no-progress", "-o", out]) == 0
    got = np.asarray(Image.open(out).convert("RGB"), np.float32)[None] / 255
    # sd-jax's initial noise for this seed (pipeline._generate's noise_at(0))
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(np.uint32(seed)), 0), (SIZE // 2, SIZE // 2, 4))
    with torch.no_grad():
        mid = base_ref(PROMPTS[:1], negative_prompt=NEG[:1], latents=nchw(np.asarray(noise)[None]),
                       num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE, denoising_end=0.8,
                       output_type="latent").images
        want = refiner_ref(PROMPTS[:1], negative_prompt=NEG[:1], image=mid, num_inference_steps=STEPS,
                           guidance_scale=5.0, denoising_start=0.8, output_type="np").images
    _close(got, want, atol=1 / 255)
    assert got.std() > 0.01


def test_batch_job_records_the_refiner():
    """A batch job's settings name the refiner and switch (a resume with others is a changed job);
    a job without one is written as before."""
    import argparse
    from sd_jax.batch import job_of_args
    args = argparse.Namespace(negative="", seed=0, steps=None, guidance=None, rescale=0.0, size=None, scheduler=None,
                              clip_skip=None, dtype="fp32", refiner=None, refiner_switch=None)
    plain = job_of_args(args, "base", [])
    assert "refiner" not in plain["settings"]
    args.refiner = "/models/sdxl-refiner-1.0/"
    job = job_of_args(args, "base", [])
    assert (job["settings"]["refiner"], job["settings"]["refiner_switch"]) == ("sdxl-refiner-1.0", 0.8)
    args.refiner_switch = 0.7
    assert job_of_args(args, "base", [])["settings"]["refiner_switch"] == 0.7
