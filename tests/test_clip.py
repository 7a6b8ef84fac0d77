"""CLIP text encoder + tokenizer: parity with transformers 5 (PyTorch, float32).

Tolerances (float32, outputs of magnitude ~1-4): max abs diff <= 1e-4 against
transformers (measured ~1e-6 tiny, ~5e-6 at the SD 1.5 size).  bfloat16 compute vs
float32 at the SD 1.5 size: max abs diff <= 5e-2 (measured ~0.04; PyTorch's own
bf16-vs-fp32 gap on the same model is ~0.06).
"""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file as torch_load_file
from safetensors.torch import save_file as torch_save_file

from sd_jax import tokenizer as sdtok
from sd_jax.models import clip
from sd_jax.weights.safetensors_io import CheckpointError

ATOL = 1e-4
BF16_ATOL = 5e-2

# tiny encoder inputs: token 95 sits before the first EOS (40), so argmax pooling
# (legacy eos_token_id=2) and first-EOS pooling pick different positions.
IDS = np.array([[30, 5, 95, 7, 40, 40, 40, 40],
                [30, 12, 40, 99, 7, 40, 40, 40]], np.int32)
ARGMAX_POS, FIRST_EOS_POS = [2, 3], [4, 2]

# text_encoder/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1.
SD15_JSON = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408}
SD21_JSON = {**SD15_JSON, "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
             "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512}


def maxdiff(a, b):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = b.detach().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def to_legacy_form(folder):
    """Rewrite a save_pretrained folder as real SD checkpoints are: ``text_model.`` prefix and
    a ``text_model.embeddings.position_ids`` int64 buffer."""
    path = os.path.join(folder, "model.safetensors")
    sd = torch_load_file(path)
    sd = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
          for k, v in sd.items()}
    n = sd["text_model.embeddings.position_embedding.weight"].shape[0]
    sd["text_model.embeddings.position_ids"] = torch.arange(n)[None]
    torch_save_file(sd, path, metadata={"format": "pt"})
    return sorted(sd)


def make_hf(folder, *, projection=False, hidden_act="quick_gelu", eos=2, form="t5", seed=0):
    cfg = transformers.CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
        hidden_act=hidden_act, bos_token_id=30, eos_token_id=eos, pad_token_id=1)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    model = cls(cfg).eval()
    model.save_pretrained(folder)
    if form == "legacy":
        to_legacy_form(folder)
    return model


def torch_reference(model, ids, clip_skip=1):
    """transformers' outputs; for the projection model, pooler_output from its text_model."""
    base = model.text_model if isinstance(model, transformers.CLIPTextModelWithProjection) else model
    with torch.no_grad():
        t = torch.tensor(ids, dtype=torch.long)
        r = base(t, output_hidden_states=True)
        ref = dict(last_hidden_state=r.last_hidden_state, pooler_output=r.pooler_output,
                   hidden_states=r.hidden_states,
                   # diffusers' encode_prompt(clip_skip=k)
                   prompt_embeds=base.final_layer_norm(r.hidden_states[-(clip_skip + 1)]))
        if base is not model:
            ref["text_embeds"] = model(t).text_embeds
    return ref


CASES = {
    "quick_gelu-argmax_pool-legacy_keys": dict(projection=False, hidden_act="quick_gelu", eos=2, form="legacy"),
    "gelu-first_eos_pool-t5_keys": dict(projection=False, hidden_act="gelu", eos=40, form="t5"),
    "proj-gelu-argmax_pool-legacy_keys": dict(projection=True, hidden_act="gelu", eos=2, form="legacy"),
    "proj-quick_gelu-first_eos_pool-t5_keys": dict(projection=True, hidden_act="quick_gelu", eos=40, form="t5"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(tmp_path, case):
    kw = CASES[case]
    hf = make_hf(tmp_path, **kw)
    keys = sorted(torch_load_file(os.path.join(tmp_path, "model.safetensors")))
    if kw["form"] == "legacy":
        assert "text_model.embeddings.position_ids" in keys
    elif not kw["projection"]:   # transformers 5's CLIPTextModel: no prefix, no buffer
        assert keys[0] == "embeddings.position_embedding.weight"
        assert not any(k.startswith("text_model.") or k.endswith("position_ids") for k in keys)

    model, params = clip.load(tmp_path)
    c = model.config
    assert c.hidden_act == kw["hidden_act"] and c.eos_token_id == kw["eos"]
    assert c.projection_dim == (24 if kw["projection"] else None)
    out = jax.jit(lambda p, i: model.apply({"params": p}, i, clip_skip=1))(params, IDS)
    ref = torch_reference(hf, IDS, clip_skip=1)

    diffs = {k: maxdiff(out[k], ref[k]) for k in ("last_hidden_state", "pooler_output", "prompt_embeds")}
    assert len(out["hidden_states"]) == c.num_hidden_layers + 1 == len(ref["hidden_states"])
    diffs["hidden_states"] = max(maxdiff(a, b) for a, b in zip(out["hidden_states"], ref["hidden_states"]))
    if kw["projection"]:
        diffs["text_embeds"] = maxdiff(out["text_embeds"], ref["text_embeds"])
    else:
        assert "text_embeds" not in out
    print(case, {k: f"{v:.1e}" for k, v in diffs.items()})
    assert max(diffs.values()) <= ATOL, diffs

    # The pooled position follows transformers' rule for this eos_token_id.
    pos = ARGMAX_POS if kw["eos"] == 2 else FIRST_EOS_POS
    lhs = np.asarray(out["last_hidden_state"])
    np.testing.assert_array_equal(np.asarray(out["pooler_output"]), lhs[[0, 1], pos])
    assert np.abs(lhs[[0, 1], ARGMAX_POS] - lhs[[0, 1], FIRST_EOS_POS]).max() > 1e-2


def test_clip_skip_encode_and_checks(tmp_path):
    hf = make_hf(tmp_path, hidden_act="gelu", eos=40)
    model, params = clip.load(tmp_path)
    enc = jax.jit(model.encode, static_argnames="clip_skip")
    base = np.asarray(enc(params, IDS))
    full = model.apply({"params": params}, IDS)
    np.testing.assert_allclose(base, np.asarray(full["last_hidden_state"]), atol=1e-5, rtol=0)
    ref = torch_reference(hf, IDS, clip_skip=2)
    assert maxdiff(enc(params, IDS, clip_skip=2), ref["prompt_embeds"]) <= ATOL
    with pytest.raises(ValueError, match="clip_skip"):
        model.apply({"params": params}, IDS, clip_skip=4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.apply({"params": params}, np.zeros((1, 17), np.int32))


@pytest.mark.parametrize("projection", [False, True])
def test_save_loads_in_transformers(tmp_path, projection):
    hf = make_hf(tmp_path / "src", projection=projection, eos=40, form="t5")
    model, params = clip.load(tmp_path / "src")
    clip.save(tmp_path / "out", model.config, params)

    keys = sorted(torch_load_file(os.path.join(tmp_path, "out", "model.safetensors")))
    assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)
    assert ("text_projection.weight" in keys) == projection
    cfg = json.load(open(tmp_path / "out" / "config.json"))
    assert cfg["model_type"] == "clip_text_model"
    assert cfg["architectures"] == ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"]

    cls = type(hf)
    back, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    a, b = torch_reference(hf, IDS), torch_reference(back.eval(), IDS)
    for k in a:
        if k != "hidden_states":
            assert maxdiff(a[k], b[k]) == 0.0, k

    # ... and sd-jax reads its own output back unchanged.
    model2, params2 = clip.load(tmp_path / "out")
    assert model2.config == model.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_mismatched_config_and_bad_folders(tmp_path):
    make_hf(tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    good = json.load(open(cfg_path))

    def with_cfg(**kw):
        json.dump({**good, **kw}, open(cfg_path, "w"))

    with_cfg(hidden_size=48)
    with pytest.raises(CheckpointError, match=r"text encoder .*do not match its config.*wrong shape"):
        clip.load(tmp_path / "m")
    with_cfg(num_hidden_layers=4)
    with pytest.raises(CheckpointError, match=r"missing: text_model\.encoder\.layers\.3\."):
        clip.load(tmp_path / "m")
    with_cfg(num_hidden_layers=2)
    with pytest.raises(CheckpointError, match=r"unexpected: text_model\.encoder\.layers\.2\."):
        clip.load(tmp_path / "m")
    with_cfg(architectures=["CLIPTextModelWithProjection"])
    with pytest.raises(CheckpointError, match=r"missing: text_projection\."):
        clip.load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="not found"):
        clip.load(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="config.json not found"):
        clip.load(tmp_path / "empty")
    with open(tmp_path / "empty" / "config.json", "w") as f:
        json.dump(good, f)
    with pytest.raises(CheckpointError, match="no \\*.safetensors weights"):
        clip.load(tmp_path / "empty")


def test_config_dicts():
    assert clip.CLIPTextConfig.from_dict(SD15_JSON) == clip.CLIPTextConfig.sd15()
    assert clip.CLIPTextConfig.from_dict(SD21_JSON) == clip.CLIPTextConfig.sd21()
    sd21 = clip.CLIPTextConfig.sd21()
    assert (sd21.hidden_size, sd21.num_hidden_layers, sd21.hidden_act, sd21.projection_dim) == (1024, 23, "gelu", None)
    # transformers writes projection_dim into every config; only the architecture means a projection.
    hf = transformers.CLIPTextConfig(projection_dim=64).to_dict()
    assert clip.CLIPTextConfig.from_dict({**hf, "architectures": ["CLIPTextModel"]}).projection_dim is None
    assert clip.CLIPTextConfig.from_dict({**hf, "architectures": ["CLIPTextModelWithProjection"]}).projection_dim == 64
    # transformers' defaults for missing keys (eos 49407 -> first-EOS pooling)
    assert clip.CLIPTextConfig.from_dict({}).eos_token_id == 49407
    for c in (clip.CLIPTextConfig.tiny(projection_dim=16), sd21):
        d = c.to_dict()
        t = transformers.CLIPTextConfig(**d)
        assert clip.CLIPTextConfig.from_dict(t.to_dict()) == c
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPTextConfig.tiny(hidden_act="relu")
    with pytest.raises(CheckpointError, match="hidden_act"):
        clip.CLIPTextConfig.from_dict({"hidden_act": "swish"})
    with pytest.raises(ValueError, match="divisible"):
        clip.CLIPTextConfig.tiny(num_attention_heads=5)


def test_sd15_size_parity_and_bfloat16(tmp_path):
    """The real SD 1.5 text-encoder config, real-checkpoint key layout, short sequences."""
    cfg = transformers.CLIPTextConfig.from_dict(SD15_JSON)
    torch.manual_seed(0)
    hf = transformers.CLIPTextModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(SD15_JSON, f)
    to_legacy_form(tmp_path)

    ids = np.full((2, 8), 49407, np.int32)            # BOS, words, EOS, EOS padding (SD 1.x)
    ids[0, :6] = [49406, 320, 1125, 539, 320, 2368]
    ids[1, :3] = [49406, 1929, 8]
    model, params = clip.load(tmp_path)
    assert model.config == clip.CLIPTextConfig.sd15()
    run = lambda m: jax.jit(lambda p, i: m.apply({"params": p}, i, clip_skip=1))  # noqa: E731
    out = run(model)(params, ids)
    ref = torch_reference(hf, ids, clip_skip=1)
    diffs = {k: maxdiff(out[k], ref[k]) for k in ("last_hidden_state", "pooler_output", "prompt_embeds")}
    print("sd15 float32", {k: f"{v:.1e}" for k, v in diffs.items()},
          "max |ref|", float(ref["last_hidden_state"].abs().max()))
    assert max(diffs.values()) <= ATOL, diffs

    bmodel, bparams = clip.load(tmp_path, dtype=jnp.bfloat16)
    assert bmodel.param_dtype == jnp.bfloat16
    assert jax.tree.leaves(bparams)[0].dtype == jnp.bfloat16
    bout = run(bmodel)(bparams, ids)
    assert bout["last_hidden_state"].dtype == jnp.bfloat16
    bdiffs = {k: maxdiff(bout[k], out[k]) for k in ("last_hidden_state", "pooler_output", "prompt_embeds")}
    print("sd15 bfloat16 vs float32", {k: f"{v:.1e}" for k, v in bdiffs.items()})
    assert max(bdiffs.values()) <= BF16_ATOL, bdiffs


# ---- tokenizer ---------------------------------------------------------------------

def _bytes_to_unicode():
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


WORDS = ["a", "photo", "of", "cat", "dog"]


def write_vocab_tokenizer(folder, pad_token="<|endoftext|>"):
    """A real-SD-style tokenizer folder (vocab.json + merges.txt), CLIP's vocab layout."""
    base = list(_bytes_to_unicode().values())
    merges = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        acc = parts[0]
        for p in parts[1:]:
            merges.append((acc, p))
            acc += p
    toks = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(toks))}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>", "pad_token": pad_token}, f)
    return vocab


def test_tokenizer_both_folder_forms(tmp_path):
    vocab = write_vocab_tokenizer(tmp_path / "vocab_form")
    tok = sdtok.load_tokenizer(tmp_path / "vocab_form")
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    ids = sdtok.tokenize(tok, ["a photo of a Cat", "dog"], max_length=10)
    assert ids.dtype == np.int32 and ids.shape == (2, 10)
    w = lambda s: vocab[s + "</w>"]  # noqa: E731
    np.testing.assert_array_equal(ids[0], [bos, w("a"), w("photo"), w("of"), w("a"), w("cat"), eos, eos, eos, eos])
    np.testing.assert_array_equal(ids[1], [bos, w("dog")] + [eos] * 8)

    tok.save_pretrained(tmp_path / "json_form")          # transformers 5: tokenizer.json
    for name in ("vocab.json", "merges.txt"):
        if os.path.exists(tmp_path / "json_form" / name):
            os.remove(tmp_path / "json_form" / name)
    assert os.path.isfile(tmp_path / "json_form" / "tokenizer.json")
    tok2 = sdtok.load_tokenizer(tmp_path / "json_form")
    prompts = ["a photo of a dog, 4k!", "Catdog photography", ""]
    np.testing.assert_array_equal(sdtok.tokenize(tok2, prompts), sdtok.tokenize(tok, prompts))
    assert sdtok.tokenize(tok, "a cat").shape == (1, 77)

    with pytest.raises(CheckpointError, match="not found"):
        sdtok.load_tokenizer(tmp_path / "nope")
    os.makedirs(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="vocab.json"):
        sdtok.load_tokenizer(tmp_path / "bad")


def test_tokenizer_sd2_pad_and_truncation_warning(tmp_path):
    vocab = write_vocab_tokenizer(tmp_path, pad_token="!")        # SD 2.x pads with "!" = id 0
    tok = sdtok.load_tokenizer(tmp_path)
    assert tok.pad_token_id == vocab["!"] == 0
    eos = vocab["<|endoftext|>"]
    ids = sdtok.tokenize(tok, ["a cat"], max_length=8)
    np.testing.assert_array_equal(ids[0, 3:], [eos, 0, 0, 0, 0])

    long_prompt = " ".join(["cat"] * 10)                           # 12 tokens with BOS/EOS
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ids = sdtok.tokenize(tok, ["a dog", long_prompt], max_length=8)
    msgs = [str(r.message) for r in rec if issubclass(r.category, sdtok.PromptTruncatedWarning)]
    assert len(msgs) == 1 and "last 4 were dropped" in msgs[0] and "cat cat" in msgs[0], msgs
    assert ids[1, -1] == eos and (ids[1, 1:-1] == vocab["cat</w>"]).all()
