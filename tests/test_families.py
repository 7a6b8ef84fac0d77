"""The model-family registry and the one loader: detection, model_index.json, and
save -> load round trips through every format (tiny random models, no torch)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import families
from sd_jax.models import clip, unet, vae
from sd_jax.weights import loader
from sd_jax.weights.convert import flatten, params_to_state_dict
from sd_jax.weights.safetensors_io import CheckpointError, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "checkpoints", "sd-jax-shapes")


def _tiny(family=families.TINY, in_channels=4) -> loader.LoadedModel:
    """A tiny random model (numpy parameters, nothing compiled)."""
    from sd_jax.data.tokenizer import write_tokenizer
    from sd_jax.tokenizer import load_tokenizer
    cfgs = families.TINY.configs("test")
    cfgs["unet"] = unet.UNetConfig.tiny(in_channels=in_channels)
    models = families.build_models(family, cfgs)
    rng = np.random.default_rng(0)
    params = {c.name: jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32) * 0.02,
                                   c.param_shapes(getattr(models, c.name)))
              for c in family.components}
    tok_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sd_jax_test_tok_{os.getpid()}")
    write_tokenizer(tok_dir)
    sched = families.sd_scheduler_config("epsilon")
    return loader.LoadedModel(family, models, params, {"tokenizer": load_tokenizer(tok_dir)}, sched, "pndm")


def _same_params(a, b):
    fa, fb = flatten(jax.device_get(a)), flatten(jax.device_get(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k], np.float32), np.asarray(fb[k], np.float32), err_msg=k)


# --------------------------------------------------------------------------- the registry
def test_registry_entries():
    assert set(families.FAMILIES) >= {"sd1", "sd2", "tiny"}
    for f in (families.SD1, families.SD2, families.TINY):
        assert f.component_names == ("text_encoder", "unet", "vae")
        assert f.folders() == ("text_encoder", "unet", "vae", "tokenizer", "scheduler")
        assert f.component("unet").module is unet.UNet2DConditionModel
        assert f.component("text_encoder").config is clip.CLIPTextConfig
    assert families.SD2.tokenizers[0].pad_token == "!" and families.SD1.tokenizers[0].pad_token == "<|endoftext|>"
    assert families.get("sd2") is families.SD2
    xl = families.get("sdxl")
    assert xl.component_names == ("text_encoder", "text_encoder_2", "unet", "vae")
    assert xl.folders() == ("text_encoder", "text_encoder_2", "unet", "vae", "tokenizer", "tokenizer_2", "scheduler")
    assert xl.component("text_encoder_2").class_name == "CLIPTextModelWithProjection"
    assert xl.tokenizers[1].pad_token == "!" and xl.default_size == 1024
    assert xl.model_index("EulerDiscreteScheduler")["force_zeros_for_empty_prompt"] is True
    assert xl.pipeline_options({"force_zeros_for_empty_prompt": False}) == {"force_zeros_for_empty_prompt": False}
    assert families.SD1.pipeline_options({"force_zeros_for_empty_prompt": True}) == {}
    with pytest.raises(ValueError, match="unknown model family"):
        families.get("sd3")
    # the presets are real configs of the family's classes
    cfg = families.SD2.configs("sd21")
    assert cfg["text_encoder"].hidden_act == "gelu" and cfg["unet"].cross_attention_dim == 1024
    assert families.SD1.configs("sd15-inpaint")["unet"].in_channels == 9
    assert families.TINY.configs("shapes")["unet"] == families.shapes_unet_config()
    with pytest.raises(ValueError, match="no variant"):
        families.SD1.configs("nope")


def test_model_index_is_what_the_shipped_model_has():
    with open(os.path.join(SHIPPED, "model_index.json")) as f:
        shipped = json.load(f)
    ours = families.TINY.model_index("DPMSolverMultistepScheduler")
    assert ours == shipped
    assert families.SD1.model_index("PNDMScheduler", inpainting=True)["_class_name"] == \
        "StableDiffusionInpaintPipeline"


def test_detect():
    assert families.detect({"text_encoder": clip.CLIPTextConfig.sd15().to_dict()}) is families.SD1
    assert families.detect({"text_encoder": clip.CLIPTextConfig.sd21()}) is families.SD2
    assert families.detect({}, {"_class_name": "StableDiffusionXLPipeline"}) is families.SDXL
    # an SDXL img2img / inpainting folder is SDXL; one without the first text encoder is the refiner
    for cls in ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"):
        te = ["transformers", "CLIPTextModel"]
        assert families.detect({}, {"_class_name": cls, "text_encoder": te}) is families.SDXL
        assert families.detect({}, {"_class_name": cls, "text_encoder": [None, None]}) is families.SDXL_REFINER
    for cls, what in (("StableDiffusionXLInstructPix2PixPipeline", "SDXL InstructPix2Pix"), ("FluxPipeline", "Flux"),
                      ("StableDiffusionXLAdapterPipeline", "SDXL pipeline")):
        with pytest.raises(CheckpointError, match=what):
            families.detect({}, {"_class_name": cls}, where="m")
    # a ControlNet pipeline's folder is its base's plus controlnet/ (sd_jax.models.controlnet.load_all)
    assert families.detect({}, {"_class_name": "StableDiffusionXLControlNetInpaintPipeline",
                                "text_encoder": ["transformers", "CLIPTextModel"]}) is families.SDXL
    assert families.detect({"text_encoder": clip.CLIPTextConfig.sd15()},
                           {"_class_name": "StableDiffusionControlNetPipeline"}) is families.SD1
    sd1_keys = ["model.diffusion_model.x", "cond_stage_model.transformer.text_model.y"]
    assert families.detect_single_file(sd1_keys) is families.SD1
    assert families.detect_single_file(["cond_stage_model.model.token_embedding.weight"]) is families.SD2
    assert families.detect_single_file(["model.diffusion_model.x"]) is None


def test_prompt_encoding_single_matches_the_text_encoder():
    m = _tiny()
    ids = jnp.asarray(np.arange(2 * 77).reshape(2, 77) % 800, jnp.int32)
    ctx, pooled = families.SD1.prompt.encode(m.models, m.params, ids, clip_skip=None)
    want = m.models.text_encoder.encode(m.params["text_encoder"], ids)
    assert pooled is None
    np.testing.assert_array_equal(np.asarray(ctx), np.asarray(want))
    with pytest.raises(NotImplementedError):
        families.PromptEncoding(combine="sum").encode(m.models, m.params, ids)
    with pytest.raises(ValueError, match="2 id arrays"):
        families.SDXL.prompt.encode(m.models, m.params, ids)


# --------------------------------------------------------------------------- the loader
def test_diffusers_round_trip(tmp_path):
    m = _tiny()
    loader.save(m, str(tmp_path / "d"), "diffusers")
    with open(tmp_path / "d" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusionPipeline"
    back = loader.load(str(tmp_path / "d"))
    assert back.family is families.SD1          # a diffusers folder says its architecture, not "tiny"
    assert back.scheduler_name == "pndm" and back.scheduler["_class_name"] == "PNDMScheduler"
    assert back.configs == m.configs
    _same_params(m.params, back.params)
    assert sorted(os.listdir(tmp_path / "d" / "tokenizer"))[:2] == ["merges.txt", "special_tokens_map.json"]


def test_sd_jax_round_trip_keeps_the_family(tmp_path):
    m = _tiny()
    loader.save(m, str(tmp_path / "c"), "sd-jax")
    with open(tmp_path / "c" / "sd_jax.json") as f:
        assert json.load(f)["family"] == "tiny"
    back = loader.load(str(tmp_path / "c"), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert back.family is families.TINY and back.source == str(tmp_path / "c")
    assert back.models.unet.dtype == jnp.bfloat16 and back.models.vae.dtype == jnp.bfloat16
    _same_params(m.params, back.params)


def test_inpainting_model_index(tmp_path):
    m = _tiny(families.SD1, in_channels=9)
    assert m.inpainting
    loader.save(m, str(tmp_path / "i"), "diffusers")
    with open(tmp_path / "i" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "StableDiffusionInpaintPipeline"


def test_fp16_keeps_the_vae_in_float32(tmp_path):
    m = _tiny()
    loader.save(m, str(tmp_path / "d"), "diffusers")
    back = loader.load(str(tmp_path / "d"), dtype=jnp.float16)
    assert back.models.unet.dtype == jnp.float16 and back.models.vae.dtype == jnp.float32


def test_single_file_loads_as_sd1(tmp_path, monkeypatch):
    from sd_jax.weights.single_file import to_single_file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = _tiny()
    sds = {k: params_to_state_dict(v) for k, v in m.params.items()}
    configs = {k: c.to_dict() for k, c in m.configs.items()}
    path = str(tmp_path / "m.safetensors")
    save_file(to_single_file(configs, sds), path)
    back = loader.load(path)
    assert back.family is families.SD1 and back.source == path
    assert back.scheduler["_class_name"] == "PNDMScheduler" and back.tokenizer.pad_token_id == 49407
    _same_params(m.params, back.params)


def test_unknown_format_is_one_line_error(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="is not a model"):
        loader.load(str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="unknown format"):
        loader.save(_tiny(), str(tmp_path / "o"), "onnx")


def test_finetuning_starts_from_a_single_file(tmp_path, monkeypatch):
    """Training loads models with the same loader: a single file works (it used to be refused)."""
    from sd_jax.train.config import TrainConfig
    from sd_jax.train.diffusion import build_diffusion_task
    from sd_jax.weights.single_file import to_single_file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = _tiny()
    sds = {k: params_to_state_dict(v) for k, v in m.params.items()}
    path = str(tmp_path / "m.safetensors")
    save_file(to_single_file({k: c.to_dict() for k, c in m.configs.items()}, sds), path)
    task = build_diffusion_task(TrainConfig(out=str(tmp_path / "run"), model=path, size=32))
    assert task.trainable == ("unet",) and set(task.params) == {"text_encoder", "unet"}
    _same_params({k: m.params[k] for k in ("text_encoder", "unet")}, task.params)
    _same_params(m.params["vae"], task.frozen["vae"])


def test_read_configs_every_format(tmp_path, monkeypatch):
    from sd_jax.train.cli import _model_size
    from sd_jax.weights.single_file import to_single_file
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    m = _tiny()
    loader.save(m, str(tmp_path / "d"), "diffusers")
    loader.save(m, str(tmp_path / "c"), "sd-jax")
    sds = {k: params_to_state_dict(v) for k, v in m.params.items()}
    save_file(to_single_file({k: c.to_dict() for k, c in m.configs.items()}, sds), str(tmp_path / "m.safetensors"))
    for path in ("d", "c", "m.safetensors"):
        cfgs = loader.read_configs(str(tmp_path / path))
        assert set(cfgs) == {"text_encoder", "unet", "vae"}
        assert unet.UNetConfig.from_dict(cfgs["unet"]).block_out_channels == m.configs["unet"].block_out_channels
    # the fine-tuning recipe's default size: UNet sample size x VAE downscale (16 x 2)
    assert _model_size(str(tmp_path / "d")) == _model_size(str(tmp_path / "c")) == 32
    assert _model_size(str(tmp_path / "m.safetensors")) == 64 * 2   # a single file: SD's 64-latent default
