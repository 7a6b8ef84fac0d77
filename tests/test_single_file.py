"""Single-file (CompVis / A1111) checkpoints <-> diffusers layout, and the bundled CLIP tokenizer.

Tiny seeded diffusers / transformers PyTorch models are exported with ``to_single_file``;
diffusers' own single-file converters must turn that export back into the original state
dicts (so the layout written is the real one), and so must ``convert``, configs included.
"""
import gzip
import html
import json
import os

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from sd_jax.weights import single_file as sf  # noqa: E402
from sd_jax.weights.safetensors_io import CheckpointError, save_file  # noqa: E402

NOT_SD = "not a Stable Diffusion 1.x/2.x/XL single-file checkpoint"


# ----------------------------------------------------------------------------- tiny models
def _np(module) -> dict:
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _build(kind: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed({"sd1": 0, "sd2": 1, "inpaint": 2}[kind])
    if kind == "sd2":   # OpenCLIP text (gelu, 23 kept layers), linear projections, 64-channel heads
        text = CLIPTextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=23, num_attention_heads=1,
                              vocab_size=1000, hidden_act="gelu", bos_token_id=0, eos_token_id=2)
        unet = UNet2DConditionModel(
            sample_size=96, block_out_channels=(64, 128), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=[1, 2], use_linear_projection=True, upcast_attention=True)
        vae_size = 768
    else:               # SD 1.x: CLIP text (quick_gelu), conv projections, 8 heads, 2 layers per block
        text = CLIPTextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              vocab_size=1000, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=9 if kind == "inpaint" else 4, block_out_channels=(32, 64, 64),
            layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=128, attention_head_dim=8)
        vae_size = 512
    vae = AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, sample_size=vae_size,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    te = CLIPTextModel(text)
    models = {"unet": unet, "vae": vae, "text_encoder": te}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": te.config.to_dict()}
    return models, configs, {k: _np(m) for k, m in models.items()}


_CASES = {}


def _case(kind):
    if kind not in _CASES:
        models, configs, sds = _build(kind)
        _CASES[kind] = (kind, models, configs, sds, sf.to_single_file(configs, sds))
    return _CASES[kind]


@pytest.fixture(params=["sd1", "sd2", "inpaint"])
def case(request):
    return _case(request.param)


@pytest.fixture
def sd1():
    return _case("sd1")


@pytest.fixture
def sd2():
    return _case("sd2")


def _prefixed(sd: dict) -> dict:
    """transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` prefix; we use it."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def _assert_same(got: dict, want: dict, what: str):
    got = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in got.items()}
    assert set(got) == set(want), f"{what}: missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
    for k in want:
        assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype, (what, k, got[k].shape, want[k].shape)
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{what}: {k}")


def _norm_cfg(cfg) -> dict:
    def lists(x):
        return [lists(v) for v in x] if isinstance(x, (list, tuple)) else x
    return {k: lists(v) for k, v in dict(cfg).items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- (a) the layout is the real one
def test_single_file_layout_matches_diffusers_converters(case):
    from diffusers.loaders import single_file_utils as ref
    kind, models, configs, sds, single = case
    ckpt = {k: torch.from_numpy(np.array(v)) for k, v in single.items()}
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in single)
    if kind != "sd2":   # diffusers tells v2 by a 1024-wide cross-attention, which a tiny model lacks
        assert ref.infer_diffusers_model_type(ckpt) == {"sd1": "v1", "inpaint": "inpainting"}[kind]
    _assert_same(ref.convert_ldm_unet_checkpoint(ckpt, configs["unet"]), sds["unet"], "unet")
    _assert_same(ref.convert_ldm_vae_checkpoint(ckpt, configs["vae"]), sds["vae"], "vae")
    if kind == "sd2":
        assert ref.is_open_clip_model(ckpt) and not ref.is_clip_model(ckpt)
        te = ref.convert_open_clip_checkpoint(models["text_encoder"], ckpt)
    else:
        assert ref.is_clip_model(ckpt)
        te = ref.convert_ldm_clip_checkpoint(ckpt)
    _assert_same(te, _prefixed(sds["text_encoder"]), "text_encoder")
    # original-layout details diffusers' converters do not look at
    assert single["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4           # 1x1 convs
    if kind == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in single   # 24 blocks
        assert single["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (192, 64)


# ----------------------------------------------------------------------------- (b) convert() inverts it
def test_convert_round_trip(case):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig
    kind, models, configs, sds, single = case
    out = sf.convert(single)
    assert out.family == ("sd2" if kind == "sd2" else "sd1")
    assert out.inpainting == (kind == "inpaint")
    assert out.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    _assert_same(out.state_dicts["unet"], sds["unet"], "unet")
    _assert_same(out.state_dicts["vae"], sds["vae"], "vae")
    _assert_same(out.state_dicts["text_encoder"], _prefixed(sds["text_encoder"]), "text_encoder")
    # configs: diffusers rebuilds exactly the original models' configs from ours
    assert _norm_cfg(UNet2DConditionModel.from_config(out.configs["unet"]).config) == _norm_cfg(models["unet"].config)
    assert _norm_cfg(AutoencoderKL.from_config(out.configs["vae"]).config) == _norm_cfg(models["vae"].config)
    te_cfg = CLIPTextConfig(**out.configs["text_encoder"]).to_dict()
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
              "max_position_embeddings", "hidden_act", "layer_norm_eps"):
        assert te_cfg[k] == configs["text_encoder"][k], k
    sched = out.configs["scheduler"]
    assert sched["_class_name"] in ("PNDMScheduler", "DDIMScheduler")
    assert sched["prediction_type"] == out.prediction_type
    # and the result is again exportable to the same file
    _assert_same(sf.to_single_file(out.configs, out.state_dicts), single, "re-export")


def test_converted_weights_load_into_sd_jax(case):
    """The configs are accepted by sd-jax's models and (SD 2: linear projections, per-block heads,
    OpenCLIP-converted text encoder) the weights match their parameter shapes."""
    from sd_jax.models import clip, unet, vae
    from sd_jax.weights.convert import state_dict_to_params
    kind, _, _, _, single = case
    out = sf.convert(single)
    if kind != "sd2":
        unet.UNetConfig.from_dict(out.configs["unet"])
        vae.VAEConfig.from_dict(out.configs["vae"])
        clip.CLIPTextConfig.from_dict(out.configs["text_encoder"])
        return
    models = {
        "unet": unet.UNet2DConditionModel(unet.UNetConfig.from_dict(out.configs["unet"])),
        "vae": vae.AutoencoderKL(vae.VAEConfig.from_dict(out.configs["vae"])),
        "text_encoder": clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(out.configs["text_encoder"])),
    }
    shapes = {"unet": models["unet"].param_shapes(), "vae": vae.param_shapes(models["vae"]),
              "text_encoder": models["text_encoder"].param_shapes()}
    for name in models:
        state_dict_to_params(out.state_dicts[name], shapes[name], what=name)


def test_full_size_sd21_shapes():
    """Full-size SD 2.1 (shapes only: meta-device models, zero-stride arrays): diffusers sees a "v2"
    checkpoint, and convert() gives back stabilityai/stable-diffusion-2-1's configs and every shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as ref
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                                    use_linear_projection=True, upcast_attention=True)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=768,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                          num_attention_heads=16, hidden_act="gelu"))
    models = {"unet": unet, "vae": vae, "text_encoder": te}
    sds = {k: {n: np.broadcast_to(np.float16(0), tuple(v.shape)) for n, v in m.state_dict().items()}
           for k, m in models.items()}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": te.config.to_dict()}
    single = sf.to_single_file(configs, sds)
    assert sum(k.startswith("cond_stage_model.model.transformer.resblocks.") for k in single) == 24 * 12
    assert ref.infer_diffusers_model_type({k: torch.empty(v.shape, device="meta") for k, v in single.items()}) == "v2"
    out = sf.convert(single)
    assert (out.family, out.prediction_type) == ("sd2", "v_prediction")
    with torch.device("meta"):
        again = UNet2DConditionModel.from_config(out.configs["unet"])
    assert _norm_cfg(again.config) == _norm_cfg(unet.config)
    assert out.configs["unet"]["attention_head_dim"] == [5, 10, 20, 20]
    assert out.configs["text_encoder"]["num_attention_heads"] == 16
    for name, want in sds.items():
        want = _prefixed(want) if name == "text_encoder" else want
        got = out.state_dicts[name]
        assert set(got) == set(want) and all(got[k].shape == want[k].shape for k in want), name


def test_load_pipeline_calls_pipeline_from_state_dicts(sd1, tmp_path, monkeypatch):
    from sd_jax.weights import checkpoint
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    seen = {}

    def fake(cls, configs, state_dicts, tokenizer, scheduler_config, **kw):
        seen.update(cls=cls, configs=configs, state_dicts=state_dicts, tokenizer=tokenizer,
                    scheduler_config=scheduler_config, **kw)
        return "pipe"

    monkeypatch.setattr(checkpoint, "pipeline_from_state_dicts", fake, raising=False)
    path = str(tmp_path / "m.safetensors")
    save_file(sd1[4], path)
    assert checkpoint.detect_format(path) == "single-file"
    got = sf.load_pipeline(object, path, dtype="f32", param_dtype="bf16", attention="xla", mesh="mesh")
    assert got == "pipe" and seen["cls"] is object and seen["source"] == path
    assert (seen["dtype"], seen["param_dtype"], seen["attention"], seen["mesh"]) == ("f32", "bf16", "xla", "mesh")
    assert set(seen["configs"]) == set(seen["state_dicts"]) == {"text_encoder", "unet", "vae"}
    assert seen["scheduler_config"]["_class_name"] == "PNDMScheduler"
    assert seen["tokenizer"].pad_token_id == 49407


# ----------------------------------------------------------------------------- file, dtypes, extras
def test_convert_from_file_drops_ema_and_training_keys(sd1, tmp_path):
    kind, _, _, sds, single = sd1
    extra = {
        "model_ema.decay": np.array(0.9999, np.float32),
        "model_ema.diffusion_modelinput_blocks00weight": single["model.diffusion_model.input_blocks.0.0.weight"],
        "alphas_cumprod": np.linspace(1, 0, 1000, dtype=np.float32),
        "first_stage_model.loss.logvar": np.zeros((), np.float32),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": np.arange(77, dtype=np.int64)[None],
    }
    path = str(tmp_path / "tiny-sd1.safetensors")
    save_file({**single, **extra}, path)
    out = sf.convert(path)
    assert set(out.ignored) == set(extra)
    _assert_same(out.state_dicts["unet"], sds["unet"], "unet")
    _assert_same(out.state_dicts["vae"], sds["vae"], "vae")
    _assert_same(out.state_dicts["text_encoder"], _prefixed(sds["text_encoder"]), "text_encoder")


def test_bf16_and_torch_input_keep_dtype(sd1):
    kind, _, _, sds, single = sd1
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in single.items()}
    out = sf.convert(bf)
    w = out.state_dicts["vae"]["encoder.mid_block.attentions.0.to_q.weight"]
    assert w.dtype == ml_dtypes.bfloat16 and w.ndim == 2
    out_t = sf.convert({k: torch.from_numpy(np.array(v)).to(torch.bfloat16) for k, v in single.items()})
    np.testing.assert_array_equal(out_t.state_dicts["unet"]["conv_in.weight"].astype(np.float32),
                                  out.state_dicts["unet"]["conv_in.weight"].astype(np.float32))


def test_prediction_type_rules(sd2):
    kind, _, _, _, single = sd2
    assert sf.convert(single).configs["unet"]["sample_size"] == 96
    eps = sf.convert({**single, "global_step": np.array(875000, np.int64)})   # diffusers' SD 2-base marker
    assert eps.prediction_type == "epsilon" and eps.configs["scheduler"]["prediction_type"] == "epsilon"
    assert eps.configs["unet"]["sample_size"] == 64 and eps.configs["vae"]["sample_size"] == 512
    assert sf.convert(single, prediction_type="epsilon").prediction_type == "epsilon"
    w = single["model.diffusion_model.input_blocks.0.0.weight"]
    inpaint = {**single, "model.diffusion_model.input_blocks.0.0.weight": np.concatenate([w, w, w[:, :1]], axis=1)}
    got = sf.convert(inpaint)
    assert got.inpainting and got.prediction_type == "epsilon" and not got.configs["unet"]["upcast_attention"]
    with pytest.raises(ValueError):
        sf.convert(single, prediction_type="sample")


# ----------------------------------------------------------------------------- errors
def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_unrecognisable_checkpoint():
    with pytest.raises(CheckpointError, match=NOT_SD) as e:
        sf.convert({"encoder.weight": np.zeros((2, 2), np.float32), "lm_head.bias": np.zeros(2, np.float32)})
    _one_line(e)
    with pytest.raises(CheckpointError, match="diffusers layout") as e:
        sf.convert({"conv_in.weight": np.zeros((4, 4, 3, 3), np.float32)})
    _one_line(e)


def test_sdxl_checkpoint_without_both_text_encoders_is_refused():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((8, 4, 3, 3), np.float32),
          "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": np.zeros((77, 8))}
    with pytest.raises(CheckpointError, match="SDXL base file needs both text encoders") as e:
        sf.convert(sd)
    assert NOT_SD in _one_line(e)


def test_incomplete_checkpoint(sd1):
    kind, _, _, _, single = sd1
    no_vae = {k: v for k, v in single.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match=NOT_SD):
        sf.convert(no_vae)
    odd = {**single, "model.diffusion_model.input_blocks.1.0.mystery.weight": np.zeros(3, np.float32)}
    with pytest.raises(CheckpointError, match="UNet keys not understood") as e:
        sf.convert(odd)
    _one_line(e)


def test_truncated_file(sd1, tmp_path):
    kind, _, _, _, single = sd1
    path = str(tmp_path / "cut.safetensors")
    save_file({k: single[k] for k in list(single)[:20]}, path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated") as e:
        sf.convert(path)
    _one_line(e)
    with pytest.raises(CheckpointError, match="not found"):
        sf.convert(str(tmp_path / "missing.safetensors"))


# ----------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class _ReferenceCLIPTokenizer:
    """OpenAI CLIP's simple_tokenizer (as in open_clip/tokenizer.py), straight from the BPE file;
    ftfy's mojibake repair is left out (the test sentences need none)."""

    def __init__(self, bpe_path):
        import regex
        merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = _bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.regex = regex

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode(self, text):
        text = " ".join(html.unescape(html.unescape(text)).strip().split()).lower()
        ids = [49406]
        for tok in self.regex.findall(self.pat, text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(tok)]
        return ids + [49407]


SENTENCES = [
    "a photograph of an astronaut riding a horse",
    "A  Cat's toy, 12 apples & <b>bold</b>!! (masterpiece:1.2)",
    "naïve café résumé, über-detailed, 8k uhd",
    "hello world's don't I'll we've they're",
    "supercalifragilisticexpialidocious",
]


def test_clip_tokenizer_folder_matches_openai_bpe(tmp_path):
    from transformers import CLIPTokenizer
    folder = sf.clip_tokenizer_folder(tmp_path / "tok")
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    assert len(vocab) == 49408 and list(vocab.values()) == list(range(49408))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == 49406
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894 and lines[1] == "i n"
    ref = _ReferenceCLIPTokenizer(sf.BPE_FILE)
    for s in SENTENCES:
        assert tok(s)["input_ids"] == ref.encode(s), s
    ids = tok(SENTENCES[0], padding="max_length", max_length=77)["input_ids"]
    assert len(ids) == 77 and ids[-1] == 49407


def test_tokenizer_for_sd2_pads_with_exclamation(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tok = sf.tokenizer_for("sd2")
    assert tok.pad_token == "!" and tok.pad_token_id == 0 and len(tok) == 49408
    ids = tok("a horse", padding="max_length", max_length=77)["input_ids"]
    assert ids[:4] == [49406, 320, 4558, 49407] and ids[4:] == [0] * 73
    folder = tmp_path / "sd_jax" / "tokenizers"
    assert len(os.listdir(folder)) == 1
    sd1 = sf.tokenizer_for("sd1")
    assert sd1.pad_token_id == 49407 and sorted(os.listdir(folder)) == ["clip-vit-large-patch14", "sd2-openclip"]
    sf.tokenizer_for("sd1")   # cached
    xl = sf.tokenizers_for("sdxl")
    assert list(xl) == ["tokenizer", "tokenizer_2"]
    assert xl["tokenizer"].pad_token_id == 49407 and xl["tokenizer_2"].pad_token_id == 0
    with pytest.raises(ValueError):
        sf.tokenizer_for("tiny")   # no single files
