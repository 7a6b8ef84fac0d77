"""CLIP vision tower + CLIPImageProcessor preprocessing: parity with transformers 5 (PyTorch,
float32, random weights saved with save_pretrained and loaded by sd-jax).

Tolerances:
* model outputs (last_hidden_state, pooler_output, image_embeds; magnitude ~1): max abs
  diff <= 1e-4 (measured <= 1e-6 at the tiny config, both activations);
* preprocessing: bit-equal to CLIPImageProcessor where no resize happens (crop, rescale
  and normalise only).  With a resize, PIL's fixed-point bicubic is not reproduced: a
  pixel may differ by up to 2 uint8 steps (2/255/std ~ 0.031 after normalising; measured
  1 step shrinking 512 px to 224 on 0.06% of values, 2 steps enlarging 64 px noise to 224
  on 0.9%; 0 when shrinking small images), so the test allows 2 steps on <= 2% of values.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from sd_jax.models import clip_vision as cv
from sd_jax.weights.safetensors_io import CheckpointError

ATOL = 1e-4
STEP = 1 / 255 / min(cv.CLIP_STD)        # one uint8 step after normalising

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=30, patch_size=6, projection_dim=24)


def hf_vision_config(**kw):
    return transformers.CLIPVisionConfig(**{**TINY, **kw})


def make_hf(folder, kind, hidden_act="quick_gelu", seed=0):
    """Save a random transformers model; return (the torch model, its vision tower)."""
    torch.manual_seed(seed)
    vcfg = hf_vision_config(hidden_act=hidden_act)
    if kind == "full":
        tcfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4,
                                           bos_token_id=0, eos_token_id=2)
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=tcfg.to_dict(), vision_config=vcfg.to_dict(), projection_dim=24)).eval()
    elif kind == "proj":
        model = transformers.CLIPVisionModelWithProjection(vcfg).eval()
    else:
        model = transformers.CLIPVisionModel(vcfg).eval()
    model.save_pretrained(folder)
    return model, getattr(model, "vision_model", model)   # CLIPVisionModel is its own tower


def pixels(n=2, seed=0):
    return np.random.RandomState(seed).randn(n, 30, 30, 3).astype(np.float32)


def maxdiff(a, b):
    a = np.asarray(a, np.float32)
    b = b.detach().float().numpy()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


CASES = {
    "with_projection-quick_gelu": ("proj", "quick_gelu"),
    "with_projection-gelu": ("proj", "gelu"),
    "no_projection-gelu-unprefixed_keys": ("plain", "gelu"),
    "full_clipmodel-quick_gelu": ("full", "quick_gelu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(tmp_path, case):
    kind, act = CASES[case]
    hf, tower = make_hf(tmp_path, kind, act)
    keys = torch_load_file(os.path.join(tmp_path, "model.safetensors"))
    if kind == "plain":       # transformers 5's CLIPVisionModel: keys without vision_model.
        assert "embeddings.class_embedding" in keys
    if kind == "full":        # the text half is in the folder and ignored
        assert any(k.startswith("text_model.") for k in keys) and "logit_scale" in keys

    model, params = cv.load(tmp_path)
    assert model.config.hidden_act == act
    assert model.config.projection_dim == (None if kind == "plain" else 24)
    x = pixels()
    out = jax.jit(model.apply)({"params": params}, x)
    with torch.no_grad():
        t = torch.tensor(x.transpose(0, 3, 1, 2))
        ref = tower(t)
        # transformers 5's get_image_features: an output whose pooler_output is projected
        embeds = (hf.get_image_features(pixel_values=t).pooler_output if kind == "full"
                  else hf(t).image_embeds if kind == "proj" else None)
    assert out["last_hidden_state"].shape == (2, 26, 32)
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state) <= ATOL
    assert maxdiff(out["pooler_output"], ref.pooler_output) <= ATOL
    if embeds is None:
        assert "image_embeds" not in out
    else:
        assert maxdiff(out["image_embeds"], embeds) <= ATOL


def test_activation_matters(tmp_path):
    """The two activations give different outputs, so each parity case tests its own."""
    make_hf(tmp_path / "a", "proj", "quick_gelu")
    make_hf(tmp_path / "b", "proj", "gelu")
    (ma, pa), (mb, pb) = cv.load(tmp_path / "a"), cv.load(tmp_path / "b")
    x = pixels()
    assert np.abs(np.asarray(ma.apply({"params": pa}, x)["image_embeds"])
                  - np.asarray(mb.apply({"params": pb}, x)["image_embeds"])).max() > 1e-3


def test_projection_size_not_matching_config(tmp_path):
    make_hf(tmp_path, "proj")
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["projection_dim"] = 16
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"visual_projection\.weight has shape \(24, 32\).*"
                                              r"projection_dim=16"):
        cv.load(tmp_path)


def test_full_clipmodel_projection_size_not_matching_config(tmp_path):
    make_hf(tmp_path, "full")
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["projection_dim"] = 40
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"projection_dim=40"):
        cv.load(tmp_path)


def test_missing_and_unexpected_keys(tmp_path):
    make_hf(tmp_path, "proj")
    path = os.path.join(tmp_path, "model.safetensors")
    sd = torch_load_file(path)
    sd.pop("vision_model.post_layernorm.weight")
    sd["vision_model.extra.weight"] = torch.zeros(3)
    torch_save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"1 missing: vision_model\.post_layernorm\.weight.*"
                                              r"1 unexpected: vision_model\.extra\.weight"):
        cv.load(tmp_path)


def test_folder_without_vision_model(tmp_path):
    torch.manual_seed(0)
    transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a CLIP vision model"):
        cv.load(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        cv.load(tmp_path / "nowhere")


def test_config_round_trip_through_transformers(tmp_path):
    c = cv.CLIPVisionConfig.tiny(hidden_act="gelu")
    hf_cfg = transformers.CLIPVisionConfig(**{k: v for k, v in c.to_dict().items()
                                              if k not in ("architectures", "model_type")})
    transformers.CLIPVisionModelWithProjection(hf_cfg).save_pretrained(tmp_path)
    model, params = cv.load(tmp_path)
    assert model.config == c
    assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(
        lambda a: a.shape, cv.CLIPVisionModel(c).param_shapes())
    assert cv.CLIPVisionConfig.from_dict(c.to_dict()) == c
    assert cv.CLIPVisionConfig.from_dict(cv.CLIPVisionConfig.tiny(projection_dim=None).to_dict()) \
        == cv.CLIPVisionConfig.tiny(projection_dim=None)
    with pytest.raises(CheckpointError, match="patch_size"):
        cv.CLIPVisionConfig.from_dict({**c.to_dict(), "patch_size": 7})


def test_wrong_image_size_is_refused():
    model = cv.CLIPVisionModel(cv.CLIPVisionConfig.tiny())
    params = model.init_params(jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[batch, 30, 30, 3\].*preprocess"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 3)))


# ---- preprocessing ---------------------------------------------------------------------

def processor(size):
    return transformers.CLIPImageProcessor(size={"shortest_edge": size},
                                           crop_size={"height": size, "width": size})


def hf_preprocess(proc, images):
    return proc(list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("shape", [(2, 30, 30, 3), (2, 30, 41, 3), (1, 47, 30, 3)])
def test_preprocess_without_resize_is_bit_equal(shape):
    """Shortest side already image_size: only crop, rescale and normalise apply."""
    images = np.random.RandomState(1).randint(0, 256, shape).astype(np.uint8)
    got = np.asarray(jax.jit(lambda x: cv.preprocess(x, 30))(images))
    ref = hf_preprocess(processor(30), images)
    assert got.dtype == np.float32 and got.shape == (shape[0], 30, 30, 3)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shape", [(2, 64, 48, 3), (1, 100, 77, 3), (2, 20, 25, 3), (1, 12, 18, 3)])
def test_preprocess_with_resize_within_tolerance(shape):
    """Shrinking and enlarging (bicubic, antialiased): within 2 uint8 steps, and nearly
    every value equal."""
    images = np.random.RandomState(2).randint(0, 256, shape).astype(np.uint8)
    got = np.asarray(jax.jit(lambda x: cv.preprocess(x, 30))(images))
    ref = hf_preprocess(processor(30), images)
    d = np.abs(got - ref)
    assert got.shape == ref.shape == (shape[0], 30, 30, 3)
    assert d.max() <= 2 * STEP + 1e-6, d.max() / STEP
    assert (d > 1e-6).mean() <= 0.02


def test_preprocess_default_is_clip_224_and_refuses_bad_input():
    images = np.random.RandomState(3).randint(0, 256, (1, 224, 260, 3)).astype(np.uint8)
    got = np.asarray(cv.preprocess(images))
    np.testing.assert_array_equal(got, hf_preprocess(transformers.CLIPImageProcessor(), images))
    with pytest.raises(ValueError, match="uint8"):
        cv.preprocess(images.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\]"):
        cv.preprocess(images[0])


# the feature_extractor/preprocessor_config.json of runwayml/stable-diffusion-v1-5 (old int form)
SD15_FEATURE_EXTRACTOR = {
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": list(cv.CLIP_MEAN), "image_std": list(cv.CLIP_STD), "resample": 3, "size": 224}


def test_preprocessor_config_forms(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SD15_FEATURE_EXTRACTOR))
    assert cv.PreprocessConfig.read(tmp_path) == cv.PreprocessConfig()
    # transformers 5's own form, at a non-default size and mean, read back and applied
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 26, "width": 26},
                                           image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25])
    proc.save_pretrained(tmp_path / "new")
    cfg = cv.PreprocessConfig.read(tmp_path / "new")
    assert cfg == cv.PreprocessConfig(30, 26, (0.5, 0.4, 0.3), (0.2, 0.3, 0.25))
    images = np.random.RandomState(4).randint(0, 256, (2, 30, 35, 3)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(cv.preprocess(images, **cfg.kwargs())),
                                  hf_preprocess(proc, images))
    with pytest.raises(CheckpointError, match="resample"):
        cv.PreprocessConfig.from_dict({**SD15_FEATURE_EXTRACTOR, "resample": 2})
    with pytest.raises(CheckpointError, match="crop_size"):
        cv.PreprocessConfig.from_dict({**SD15_FEATURE_EXTRACTOR, "crop_size": {"height": 224, "width": 200}})
    with pytest.raises(CheckpointError, match="not found"):
        cv.PreprocessConfig.read(tmp_path / "nowhere")


def test_vit_l14_real_config_parity():
    """OpenAI CLIP ViT-L/14 at its real size (24 layers, width 1024, 224 px, 257 tokens):
    random transformers weights converted in memory (loading is tested at the tiny config),
    one image.  Max abs diff <= 1e-4 (measured ~7e-6 on values up to ~6).  ~10 s, ~2.5 GB:
    the torch model is dropped before the Flax parameters go to the device."""
    import gc

    from sd_jax.weights.convert import state_dict_to_params
    c = cv.CLIPVisionConfig.vit_l14()
    assert (c.hidden_size, c.num_hidden_layers, c.patch_size, c.image_size, c.projection_dim) == \
        (1024, 24, 14, 224, 768)
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        **{k: v for k, v in c.to_dict().items() if k not in ("architectures", "model_type")})).eval()
    x = np.random.RandomState(0).randn(1, 224, 224, 3).astype(np.float32)
    with torch.no_grad():
        ref = hf(torch.tensor(x.transpose(0, 3, 1, 2)))
    model = cv.CLIPVisionModel(c)
    params = state_dict_to_params({k: v.numpy() for k, v in hf.state_dict().items()}, model.param_shapes(),
                                  what="ViT-L/14", rename=cv._canonical_key)
    del hf
    gc.collect()
    out = jax.jit(model.apply)({"params": params}, x)
    assert out["last_hidden_state"].shape == (1, 257, 1024)
    assert maxdiff(out["last_hidden_state"], ref.last_hidden_state) <= ATOL
    assert maxdiff(out["image_embeds"], ref.image_embeds) <= ATOL
