"""SDXL text-to-image against diffusers' StableDiffusionXLPipeline on a tiny random model.

The model is built by diffusers PyTorch (two text encoders, the second with a projection;
two tokenizers, the second padding with ``!``; the SDXL-shaped tiny UNet with ``text_time``
conditioning; SDXL's Euler scheduler config), saved with ``save_pretrained`` and read by
sd-jax's loader.  Images are compared as float32 in [0, 1] (``output_type="np"``), the
same initial latents on both sides.  Measured on the dev VM (x86-64, float32 both sides):
images <= 7.2e-7, prompt and pooled embeddings <= 1.1e-6; tolerances ATOL = 5e-6 (images)
and 1e-4 (embeddings).
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from tiny_models import nchw

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a small red circle at the top left on a blue background", "a green square"]
NEG = ["a yellow triangle", "a blue circle"]
STEPS = 5
SIZE = 32          # the tiny VAE downsamples by 2 -> 16x16 latents (the UNet's sample_size)
ATOL = 5e-6
EMB_TOL = 1e-4


def _tokenizer(folder, pad=None):
    from transformers import CLIPTokenizer
    from sd_jax.data.tokenizer import write_tokenizer
    vocab = write_tokenizer(folder)
    if pad is not None:  # OpenCLIP's tokenizer (SDXL's tokenizer_2) pads with "!"
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            with open(path) as f:
                cfg = json.load(f)
            cfg["pad_token"] = pad
            with open(path, "w") as f:
                json.dump(cfg, f)
    return CLIPTokenizer.from_pretrained(folder), vocab


def build_tiny_sdxl(folder, seed=0, force_zeros=True, in_channels=4, **unet_kw):
    """in_channels=9: an SDXL inpainting model (StableDiffusionXLInpaintPipeline); unet_kw:
    UNetConfig.tiny_sdxl overrides."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, \
        StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_jax.families import sdxl_scheduler_config
    from sd_jax.models.unet import UNetConfig
    from sd_jax.models.vae import VAEConfig

    torch.manual_seed(seed)
    tok, vocab = _tokenizer(os.path.join(folder, "_tok"))
    tok2, _ = _tokenizer(os.path.join(folder, "_tok2"), pad="!")
    assert tok2.pad_token_id == 0 and tok.pad_token_id == tok.eos_token_id
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    te = CLIPTextModel(CLIPTextConfig(num_hidden_layers=2, pad_token_id=tok.eos_token_id, **common)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(num_hidden_layers=3, projection_dim=32, hidden_act="gelu",
                                                     pad_token_id=0, **common)).eval()
    ucfg = UNetConfig.tiny_sdxl(cross_attention_dim=64, projection_class_embeddings_input_dim=32 + 6 * 8,
                                in_channels=in_channels, **unet_kw).to_dict()
    unet = UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")}).eval()
    vcfg = VAEConfig.tiny().to_dict()
    vae = AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")}).eval()
    with torch.no_grad():  # keep random outputs in a range where comparisons mean something
        unet.conv_out.weight.mul_(0.1)
    sched = EulerDiscreteScheduler.from_config({k: v for k, v in sdxl_scheduler_config().items()
                                                if not k.startswith("_")})
    cls = StableDiffusionXLInpaintPipeline if in_channels == 9 else StableDiffusionXLPipeline
    pipe = cls(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=sched, force_zeros_for_empty_prompt=force_zeros,
                                     add_watermarker=False)
    pipe.save_pretrained(folder)
    pipe = cls.from_pretrained(folder, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl_tiny"))
    ref = build_tiny_sdxl(folder)
    from sd_jax.pipeline import StableDiffusionPipeline
    return folder, ref, StableDiffusionPipeline.from_pretrained(folder)


def init_latents(n, seed=0):
    return np.random.RandomState(seed).randn(n, SIZE // 2, SIZE // 2, 4).astype(np.float32)


def _ref_images(ref, prompts, neg, lat, guidance):
    with torch.no_grad():
        return ref(prompt=prompts, negative_prompt=neg, latents=nchw(lat), num_inference_steps=STEPS,
                   guidance_scale=guidance, height=SIZE, width=SIZE, output_type="np").images


def _close(ours, theirs, atol=ATOL):
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    diff = float(np.abs(ours - theirs).max())
    print(f"max |diff| {diff:.2e}")
    assert diff <= atol, diff


def test_loads_as_sdxl(tiny):
    from sd_jax import families
    folder, _, pipe = tiny
    assert pipe.family is families.SDXL
    assert pipe.models.text_encoder_2.config.projection_dim == 32
    assert set(pipe.tokenizers) == {"tokenizer", "tokenizer_2"}
    assert pipe.tokenizers["tokenizer_2"].pad_token == "!"
    assert pipe.options == {"force_zeros_for_empty_prompt": True}
    assert pipe.default_size == SIZE


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_prompt_embeddings_match_diffusers(tiny, clip_skip):
    """Measured max |diff|: <= 1.1e-6 (context and pooled, both sides); tolerance 1e-4."""
    from sd_jax.tokenizer import tokenize
    _, ref, pipe = tiny
    with torch.no_grad():
        pe, npe, pooled, npooled = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=True, negative_prompt=NEG,
                                                     clip_skip=clip_skip)
    enc = pipe.family.prompt
    for prompts, ctx_ref, pool_ref, skip in ((PROMPTS, pe, pooled, clip_skip), (NEG, npe, npooled, None)):
        ids = tuple(tokenize(pipe.tokenizers[t], prompts) for t in enc.tokenizers)
        ctx, pool = enc.encode(pipe.models, pipe.params, ids, skip)
        assert ctx.shape == (2, 77, 64) and pool.shape == (2, 32)
        for ours, theirs in ((ctx, ctx_ref), (pool, pool_ref)):
            diff = float(np.abs(np.asarray(ours) - theirs.numpy()).max())
            print(f"embedding max |diff| {diff:.2e}")
            assert diff <= EMB_TOL, diff
    # the second tokenizer pads with its own token ("!", id 0), the first with EOS
    ids2 = tokenize(pipe.tokenizers["tokenizer_2"], PROMPTS[1:])
    assert ids2[0, -1] == 0 and tokenize(pipe.tokenizers["tokenizer"], PROMPTS[1:])[0, -1] != 0


def test_txt2img_empty_negative_is_zeros_as_diffusers(tiny):
    """guidance 5, no negative prompt: diffusers zeros the negative conditioning
    (force_zeros_for_empty_prompt); measured max |diff| ~7e-7."""
    _, ref, pipe = tiny
    lat = init_latents(2)
    want = _ref_images(ref, PROMPTS, None, lat, 5.0)
    got = pipe(PROMPTS, latents=lat, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE,
               output_type="np")
    _close(got, want)
    assert got.std() > 0.01


def test_txt2img_negative_prompt_and_per_sample_zeros(tiny):
    """A non-empty negative prompt is encoded; in one batch a sample with an empty one gets
    zeros (traced per sample: the same compiled program)."""
    _, ref, pipe = tiny
    lat = init_latents(2, seed=1)
    kw = dict(latents=lat, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np")
    want = _ref_images(ref, PROMPTS, NEG, lat, 5.0)
    got = pipe(PROMPTS, NEG, **kw)
    _close(got, want)
    n = pipe.compilations
    mixed = pipe(PROMPTS, [NEG[0], ""], **kw)
    assert pipe.compilations == n  # an empty negative prompt does not recompile
    _close(mixed[:1], want[:1])
    _close(mixed[1:], _ref_images(ref, PROMPTS[1:], None, lat[1:], 5.0))
    assert np.abs(mixed[1] - want[1]).max() > 1e-3  # zeros are not the encoded negative prompt


def test_txt2img_without_guidance(tiny):
    _, ref, pipe = tiny
    lat = init_latents(2, seed=2)
    want = _ref_images(ref, PROMPTS, None, lat, 1.0)
    got = pipe(PROMPTS, latents=lat, num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE,
               output_type="np")
    _close(got, want)


def test_force_zeros_false_encodes_the_empty_prompt(tmp_path):
    """A model whose model_index.json says force_zeros_for_empty_prompt: false encodes ""."""
    from sd_jax.pipeline import StableDiffusionPipeline
    ref = build_tiny_sdxl(str(tmp_path), seed=3, force_zeros=False)
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path))
    assert pipe.options == {"force_zeros_for_empty_prompt": False}
    lat = init_latents(1, seed=5)
    want = _ref_images(ref, PROMPTS[:1], None, lat, 5.0)
    got = pipe(PROMPTS[:1], latents=lat, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE,
               output_type="np")
    _close(got, want)


def test_diffusers_save_round_trip(tiny, tmp_path):
    """sd-jax writes the SDXL folder back (text_encoder_2/, tokenizer_2/, model_index.json
    with the pipeline options) and diffusers loads it."""
    from diffusers import StableDiffusionXLPipeline
    _, ref, pipe = tiny
    out = str(tmp_path / "saved")
    pipe.save_pretrained(out, format="diffusers")
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["force_zeros_for_empty_prompt"] is True and "safety_checker" not in index
    again = StableDiffusionXLPipeline.from_pretrained(out, add_watermarker=False)
    for name in ("text_encoder_2", "unet"):
        a, b = getattr(ref, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.tokenizer_2.pad_token == "!"


def test_sd_jax_checkpoint_round_trip(tiny, tmp_path):
    """An SDXL model saved as an sd-jax (orbax) checkpoint loads back as SDXL, with its second
    tokenizer and pipeline options, and generates the same image."""
    from sd_jax import families
    from sd_jax.pipeline import StableDiffusionPipeline
    _, _, pipe = tiny
    out = str(tmp_path / "ckpt")
    pipe.save_pretrained(out, format="orbax")
    again = StableDiffusionPipeline.from_pretrained(out)
    assert again.family is families.SDXL and again.options == pipe.options
    assert again.tokenizers["tokenizer_2"].pad_token == "!"
    kw = dict(latents=init_latents(1, seed=6), num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
              output_type="np")
    np.testing.assert_array_equal(again(PROMPTS[:1], **kw), pipe(PROMPTS[:1], **kw))


# ------------------------------------------------------------------ prompt_2, micro-conditioning
MICRO = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(24, 40),
             negative_original_size=(16, 24), negative_crops_coords_top_left=(2, 6), negative_target_size=(32, 8))


def test_add_time_ids_match_diffusers():
    """Every rule of diffusers' ``_get_add_time_ids`` (txt2img; img2img/inpaint with and without
    the aesthetic score; negative sizes given, partly given, not given): equal, not close."""
    import types
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from sd_jax.micro_conditioning import add_time_ids
    from sd_jax.request import GenerationRequest
    partial = {k: v for k, v in MICRO.items() if k != "negative_target_size"}
    for kw in ({}, MICRO, partial):
        r = GenerationRequest("x", height=SIZE, width=SIZE + 8, aesthetic_score=7.5, negative_aesthetic_score=1.5,
                              **kw)
        size = (SIZE, SIZE + 8)
        orig, crops, target = kw.get("original_size", size), kw.get("crops_coords_top_left", (0, 0)), \
            kw.get("target_size", size)
        n_orig, n_crops, n_target = (kw.get("negative_original_size"), kw.get("negative_crops_coords_top_left", (0, 0)),
                                     kw.get("negative_target_size"))
        # txt2img: StableDiffusionXLPipeline.__call__'s rule, then its _get_add_time_ids
        fake = types.SimpleNamespace(unet=types.SimpleNamespace(config=types.SimpleNamespace(addition_time_embed_dim=8),
                                                                add_embedding=types.SimpleNamespace(
                                                                    linear_1=types.SimpleNamespace(in_features=80))))
        pos = StableDiffusionXLPipeline._get_add_time_ids(fake, orig, crops, target, torch.float32, 32)
        neg = (StableDiffusionXLPipeline._get_add_time_ids(fake, n_orig, n_crops, n_target, torch.float32, 32)
               if n_orig is not None and n_target is not None else pos)
        assert add_time_ids(r, "txt2img", False) == (tuple(pos[0].tolist()), tuple(neg[0].tolist()))
        for aesthetic, k in ((False, 6), (True, 5)):
            fake.config = types.SimpleNamespace(requires_aesthetics_score=aesthetic)
            fake.unet.add_embedding.linear_1.in_features = 8 * k + 32
            want = StableDiffusionXLImg2ImgPipeline._get_add_time_ids(
                fake, orig, crops, target, 7.5, 1.5, n_orig or orig, n_crops, n_target or target, torch.float32, 32)
            for mode in ("img2img", "inpaint"):
                assert add_time_ids(r, mode, aesthetic) == tuple(tuple(t[0].tolist()) for t in want)


def test_micro_conditioning_is_checked():
    from sd_jax.request import GenerationRequest, RequestError
    for kw, msg in ((dict(original_size=(0, 64)), "original_size must be two positive integers"),
                    (dict(negative_target_size=(64,)), "negative_target_size must be two positive"),
                    (dict(target_size="64x64"), "target_size must be two positive"),
                    (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left must be two non-negative"),
                    (dict(prompt_2=3), "prompt_2 must be text"),
                    (dict(aesthetic_score="high"), "aesthetic_score must be a number")):
        with pytest.raises(RequestError, match=msg) as e:
            GenerationRequest("x", **kw)
        assert "\n" not in str(e.value)


def test_prompt_2_micro_conditioning_and_clip_skip_match_diffusers(tiny):
    """prompt_2 / negative_prompt_2, non-default micro-conditioning on both sides and clip_skip 1
    (diffusers applies it to the prompt, not the negative prompt).  The reference gets its
    embeddings from its own ``encode_prompt`` (its ``__call__`` with clip_skip fails under
    transformers 5).  One image: with several, diffusers 0.42 interleaves the negative and
    positive time ids (``torch.cat([neg, pos]).repeat(batch, 1)``), so its rows 2..B get the
    other side's when they differ.  Changing the micro-conditioning does not recompile.
    Measured max |diff| ~7e-7."""
    import jax
    from sd_jax import sharding
    from sd_jax.pipeline import StableDiffusionPipeline
    folder, ref, _ = tiny
    pipe = StableDiffusionPipeline.from_pretrained(folder, mesh=sharding.make_mesh(jax.devices()[:1]))
    lat = init_latents(1, seed=7)
    with torch.no_grad():
        pe, npe, pooled, npooled = ref.encode_prompt(PROMPTS[:1], "a blue square", device="cpu",
                                                     num_images_per_prompt=1, do_classifier_free_guidance=True,
                                                     negative_prompt=NEG[:1], negative_prompt_2="green", clip_skip=1)
        want = ref(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
                   negative_pooled_prompt_embeds=npooled, latents=nchw(lat), num_inference_steps=STEPS,
                   guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np", **MICRO).images
    kw = dict(latents=lat, num_inference_steps=STEPS, guidance_scale=5.0, height=SIZE, width=SIZE, output_type="np",
              prompt_2="a blue square", negative_prompt_2="green", clip_skip=1)
    got = pipe(PROMPTS[:1], NEG[:1], **kw, **MICRO)
    _close(got, want)
    n = pipe.compilations
    other = pipe(PROMPTS[:1], NEG[:1], **kw, **dict(MICRO, original_size=(1024, 1024), negative_target_size=(8, 8)))
    assert pipe.compilations == n
    assert np.abs(other - got).max() > 1e-4
