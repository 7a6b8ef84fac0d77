"""SDXL base and refiner single files (SGM layout) <-> diffusers layout.

A tiny random SDXL (and refiner) is built by diffusers PyTorch and saved in the hub layout;
sd-jax exports it to one SGM ``.safetensors``; sd-jax loads that back bit for bit, and
diffusers' own ``from_single_file`` (given the tiny folder as its ``config``, offline) reads
sd-jax's export into the same weights, so the layout written is the one SDXL files have.
The two text encoders have different widths (32 and 64, as CLIP ViT-L 768 and bigG 1280),
which is how diffusers tells them apart in a file.
"""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.weights import single_file as sf  # noqa: E402
from sd_jax.weights.safetensors_io import CheckpointError, load_file, save_file  # noqa: E402

TIME_DIM = 8


def _state_dict(module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items() if not k.endswith("position_ids")}


def _canon(name: str, sd: dict) -> dict:
    """Text-encoder keys with the ``text_model.`` prefix (transformers >= 5.6 drops it on CLIPTextModel)."""
    if not name.startswith("text_encoder"):
        return sd
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


def build_sdxl(folder: str, refiner: bool = False, seed: int = 0, vae_levels: int = 2):
    """A tiny SDXL base (``refiner=False``) or refiner pipeline saved in ``folder``; its state
    dicts and configs.  ``vae_levels``: 4 downscales by 8, as SDXL's VAE (smaller latents)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sd_jax.families import sdxl_scheduler_config
    from test_sdxl_pipeline import _tokenizer

    torch.manual_seed(seed)
    tok, vocab = _tokenizer(os.path.join(folder, "_tok"))
    tok2, _ = _tokenizer(os.path.join(folder, "_tok2"), pad="!")
    common = dict(vocab_size=vocab, intermediate_size=64, max_position_embeddings=77,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=1,
                                                     projection_dim=32, hidden_act="gelu", pad_token_id=0,
                                                     **common)).eval()
    ids = 5 if refiner else 6   # the refiner: original size, crop, aesthetic score
    # SDXL's shape: no attention at the top level, per-level depths, linear projections,
    # 64-channel heads (the single-file rule), text_time conditioning.
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(64, 128), layers_per_block=2, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(1, 2), use_linear_projection=True,
        cross_attention_dim=64 if refiner else 96, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=32 + ids * TIME_DIM).eval()
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64)[:vae_levels], layers_per_block=1, norm_num_groups=32,
                        sample_size=32, down_block_types=("DownEncoderBlock2D",) * vae_levels,
                        up_block_types=("UpDecoderBlock2D",) * vae_levels,
                        scaling_factor=0.13025).eval()
    sched = EulerDiscreteScheduler.from_config({k: v for k, v in sdxl_scheduler_config().items()
                                                if not k.startswith("_")})
    models = {"text_encoder_2": te2, "unet": unet, "vae": vae}
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=te2, tokenizer=None,
                                                tokenizer_2=tok2, unet=unet, scheduler=sched,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                add_watermarker=False)
    else:
        te = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          pad_token_id=tok.eos_token_id, **common)).eval()
        models["text_encoder"] = te
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                         unet=unet, scheduler=sched, add_watermarker=False)
    pipe.save_pretrained(folder)
    return {name: _canon(name, _state_dict(m)) for name, m in models.items()}, \
        {name: (m.config.to_dict() if hasattr(m.config, "to_dict") and name.startswith("text") else dict(m.config))
         for name, m in models.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(folder, original state dicts, sd-jax's single-file export of the folder)."""
    from sd_jax.weights import loader
    root = tmp_path_factory.mktemp("sdxl_single")
    folder = str(root / "model")
    sds, _ = build_sdxl(folder, refiner=False, seed=0)
    path = str(root / "sdxl.safetensors")
    loader.save(loader.load(folder), path, format="single-file")
    return folder, sds, path


def _assert_same(got: dict, want: dict, what: str):
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:6])
    for k, v in want.items():
        g = np.asarray(got[k])
        assert g.shape == v.shape and g.dtype == v.dtype, (what, k, g.shape, v.shape, g.dtype, v.dtype)
        assert np.array_equal(g, v), (what, k)


def test_export_has_the_sgm_layout(base):
    _, sds, path = base
    keys = set(load_file(path))
    u, o = "model.diffusion_model.", "conditioner.embedders.1.model."
    assert {u + "label_emb.0.0.weight", u + "label_emb.0.2.bias", o + "text_projection", o + "logit_scale",
            o + "transformer.resblocks.2.attn.in_proj_weight", o + "positional_embedding",
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
            "first_stage_model.encoder.mid.attn_1.q.weight"} <= keys
    assert not any(k.startswith("cond_stage_model.") for k in keys)
    single = load_file(path)
    te2 = sds["text_encoder_2"]
    np.testing.assert_array_equal(single[o + "text_projection"], te2["text_projection.weight"].T)
    qkv = [te2[f"text_model.encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"]
    np.testing.assert_array_equal(single[o + "transformer.resblocks.1.attn.in_proj_weight"], np.concatenate(qkv))


@pytest.fixture(scope="module")
def loaded(base):
    from sd_jax.weights import loader
    return loader.load(base[2])


def test_export_loads_back_bit_for_bit(base, loaded):
    from sd_jax import families
    from sd_jax.weights import loader
    from sd_jax.weights.convert import params_to_state_dict
    folder, sds, path = base
    m = loaded
    assert m.family is families.SDXL
    for name, want in sds.items():
        _assert_same(params_to_state_dict(m.params[name]), want, name)
    # What is not in the weights follows SDXL's configs; what is, the file.
    ref = loader.read_configs(folder)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = m.configs[name], families.SDXL.component(name).config.from_dict(ref[name])
        keys = {"unet": ["addition_time_embed_dim", "projection_class_embeddings_input_dim", "cross_attention_dim",
                         "block_out_channels", "num_attention_heads", "attention_head_dim", "addition_embed_type",
                         "down_block_types", "up_block_types", "use_linear_projection"],
                "vae": ["scaling_factor", "block_out_channels", "latent_channels"],
                "text_encoder": ["hidden_size", "num_hidden_layers", "hidden_act", "projection_dim"],
                "text_encoder_2": ["hidden_size", "num_hidden_layers", "hidden_act", "projection_dim"]}[name]
        for k in keys:
            assert getattr(got, k) == getattr(want, k), (name, k, getattr(got, k), getattr(want, k))
    assert set(m.tokenizers) == {"tokenizer", "tokenizer_2"} and m.tokenizers["tokenizer_2"].pad_token == "!"
    assert m.scheduler_name == "euler" and m.options == {"force_zeros_for_empty_prompt": True}


def test_diffusers_from_single_file_reads_the_export(base):
    from diffusers import StableDiffusionXLPipeline
    folder, sds, path = base
    pipe = StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                      add_watermarker=False)
    for name, want in sds.items():
        _assert_same(_canon(name, _state_dict(getattr(pipe, name))), want, name)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("refiner") / "model")
    sds, configs = build_sdxl(folder, refiner=True, seed=1)
    return folder, sds, configs


def test_refiner_round_trip_and_diffusers(refiner, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    folder, sds, configs = refiner
    single = sf.to_single_file(configs, sds)
    assert any(k.startswith("conditioner.embedders.0.model.transformer.resblocks.") for k in single)
    assert not any(k.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for k in single)
    out = sf.convert(single)
    assert out.family == sf.REFINER and set(out.state_dicts) == set(sds)
    for name, want in sds.items():
        _assert_same(out.state_dicts[name], want, name)
    unet = out.configs["unet"]
    assert unet["addition_time_embed_dim"] == TIME_DIM and unet["projection_class_embeddings_input_dim"] == 32 + 5 * 8
    path = str(tmp_path / "refiner.safetensors")
    save_file(single, path)
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                             add_watermarker=False)
    assert pipe.text_encoder is None
    for name, want in sds.items():
        _assert_same(_canon(name, _state_dict(getattr(pipe, name))), want, name)


# ----------------------------------------------------------------------------- bad input
def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_sdxl_files(base, loaded, refiner, tmp_path):
    from sd_jax.weights import loader
    _, _, path = base
    single = dict(load_file(path))
    no_g = {k: v for k, v in single.items() if not k.startswith("conditioner.embedders.1.")}
    with pytest.raises(CheckpointError, match="needs both text encoders") as e:
        sf.convert(no_g)
    _one_line(e)
    wide = {**single, "model.diffusion_model.label_emb.0.0.weight": np.zeros((512, 33), np.float32)}
    with pytest.raises(CheckpointError, match="label_emb takes 33 features") as e:
        sf.convert(wide)
    _one_line(e)
    no_proj = {k: v for k, v in single.items() if k != "conditioner.embedders.1.model.text_projection"}
    with pytest.raises(CheckpointError, match="incomplete OpenCLIP") as e:
        sf.convert(no_proj)
    _one_line(e)
    with pytest.raises(CheckpointError, match="ending in .safetensors") as e:
        loader.save(loaded, str(tmp_path / "model.ckpt"), format="single-file")
    _one_line(e)
    assert not os.listdir(tmp_path)
    # A refiner file loads as the sdxl-refiner family, its weights bit for bit.
    from sd_jax import families
    from sd_jax.weights.convert import params_to_state_dict
    _, sds, configs = refiner
    rpath = str(tmp_path / "refiner.safetensors")
    save_file(sf.to_single_file(configs, sds), rpath)
    m = loader.load(rpath)
    assert m.family is families.SDXL_REFINER and set(m.tokenizers) == {"tokenizer_2"}
    for name, want in sds.items():
        _assert_same(params_to_state_dict(m.params[name]), want, name)


def _cli(capsys, *args):
    """``sd-jax ARGS`` in this process: (exit code, stderr)."""
    from sd_jax import cli
    code = cli.main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_convert_to_single_file(base, tmp_path, capsys):
    folder, sds, _ = base
    dest = tmp_path / "out.safetensors"
    assert _cli(capsys, "convert", folder, dest, "--to", "single-file") == (0, "")
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]
    got = sf.convert(str(dest))
    assert got.family == "sdxl"
    _assert_same(got.state_dicts["unet"], sds["unet"], "unet")
    for dest, say in ((dest, "already exists; pass --overwrite"), (tmp_path / "out", "ending in .safetensors")):
        code, err = _cli(capsys, "convert", folder, dest, "--to", "single-file")
        assert code == 2 and err.count("\n") == 1 and err.startswith("sd-jax: error: ") and say in err, err
