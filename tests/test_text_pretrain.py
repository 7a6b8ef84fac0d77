"""Pre-training a from-scratch text encoder on the shapes captions' labels (issue 18).

The shipped model's jointly trained text encoder gives "at the top left" and "at the bottom
right" nearly the same embedding (``benchmarks/probe_position.py``); pre-training it to read
every label of a caption keeps each word apart.  These tests check the labels against the
captions, that the pre-training teaches what it should, and that a diffusion run uses it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.data import shapes
from sd_jax.data.tokenizer import write_tokenizer
from sd_jax.models import clip as clip_lib
from sd_jax.tokenizer import load_tokenizer, tokenize
from sd_jax.train import text_pretrain
from sd_jax.train.loop import TrainConfig, train
from tests.test_train import TE_CFG, UNET_CFG, SIZE, VAE_CFG, leaves

pytestmark = pytest.mark.usefixtures("fast_train_compile")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return load_tokenizer(str(folder))


def test_caption_labels_are_what_the_captions_say():
    """Every head's class agrees with the dataset's own caption parser, for one and two shapes,
    and "not said" is used exactly when the caption leaves the word out."""
    captions, ids = text_pretrain.caption_labels(seed=3, start=0, n=400, max_shapes=2)
    heads = text_pretrain.LABEL_HEADS
    seen = {k: set() for k in heads}
    for i, caption in enumerate(captions):
        parsed = shapes.parse_prompt(caption)
        objs = parsed["objects"]
        for j, suffix in enumerate(("", "2")):
            o = objs[j] if j < len(objs) else {}
            for key in ("color", "shape", "size", "position"):
                got = heads[key + suffix][ids[key + suffix][i]]
                want = "none" if not o else (o.get(key) or "-")
                assert got == want, (caption, key + suffix, got, want)
                seen[key + suffix].add(got)
        got_bg = heads["background"][ids["background"][i]]
        assert got_bg == (parsed["background"] or "-"), caption
        seen["background"].add(got_bg)
    for k, classes in heads.items():   # the stream exercises every class of every head ...
        possible = set(classes) - ({"center"} if k == "position2" else set())   # (two shapes are never central)
        assert seen[k] == possible, (k, possible - seen[k])


def _embeds(params, tok, prompts):
    m = clip_lib.CLIPTextModel(TE_CFG)
    return np.asarray(m.apply({"params": params}, jnp.asarray(tokenize(tok, prompts, 77)))["prompt_embeds"])


def test_pretraining_teaches_position_words(tokenizer):
    """After 300 batches the tiny encoder (one layer of width 32) reads colour, shape and
    position from new captions far above chance (8-10 classes: 10-12%; measured 0.83, 0.98,
    0.87), its pooled state tells opposite positions apart, and the result is a function of
    the seed."""
    params = clip_lib.CLIPTextModel(TE_CFG).init_params(jax.random.key(0))
    trained, metrics = text_pretrain.pretrain_text_encoder(TE_CFG, tokenizer, params, steps=300, seed=0,
                                                           batch_size=32, lr=1e-2)
    assert metrics["acc_color"] > 0.7 and metrics["acc_shape"] > 0.9, metrics
    assert metrics["acc_position"] > 0.7, metrics
    a, _ = text_pretrain.pretrain_text_encoder(TE_CFG, tokenizer, params, steps=4, seed=5, batch_size=8)
    b, _ = text_pretrain.pretrain_text_encoder(TE_CFG, tokenizer, params, steps=4, seed=5, batch_size=8)
    for k, v in leaves(a).items():
        np.testing.assert_array_equal(v, leaves(b)[k], err_msg=k)
    tl, br = "a red circle at the top left on a blue background", "a red circle at the bottom right on a blue background"
    e = _embeds(trained, tokenizer, [tl, br])
    e0 = _embeds(params, tokenizer, [tl, br])
    eos = len(tokenizer(tl).input_ids) - 1
    # The pooled (EOS) states of the two prompts are further apart than at random init.
    assert np.abs(e[0, eos] - e[1, eos]).mean() > 1.5 * np.abs(e0[0, eos] - e0[1, eos]).mean()


def test_pretraining_steps_zero_is_the_identity(tokenizer):
    params = clip_lib.CLIPTextModel(TE_CFG).init_params(jax.random.key(1))
    out, metrics = text_pretrain.pretrain_text_encoder(TE_CFG, tokenizer, params, steps=0)
    assert out is params and metrics == {}


def test_diffusion_run_starts_from_the_pretrained_encoder(tmp_path, tokenizer):
    """``text_encoder_pretrain`` with ``train=("unet",)``: the run's text encoder is exactly the
    pre-trained one (not the random init) and stays frozen; the UNet trains."""
    from sd_jax.train.vae import VAETrainConfig, train_vae
    train_vae(VAETrainConfig(out=str(tmp_path / "vae"), vae_config=VAE_CFG, size=SIZE, steps=2, batch_size=8,
                             save_every=100, progress=False))
    base = dict(vae=str(tmp_path / "vae"), text_encoder_config=TE_CFG, unet_config=UNET_CFG, size=SIZE, steps=3,
                batch_size=8, lr=1e-3, warmup=1, save_every=100, ema=0.0, train=("unet",), progress=False,
                export=False)
    res = train(TrainConfig(out=str(tmp_path / "run"), text_encoder_pretrain=20, **base))
    # The same seed's random init, then 20 batches of the labels, as the run did.
    from sd_jax.train.diffusion import init_params
    init = jax.device_get(init_params(TE_CFG, UNET_CFG, 0))
    want, _ = text_pretrain.pretrain_text_encoder(TE_CFG, load_tokenizer(str(tmp_path / "run" / "tokenizer")),
                                                  init["text_encoder"], steps=20, seed=0, max_shapes=2)
    got, rand = leaves(res.params["text_encoder"]), leaves(init["text_encoder"])
    for k, v in leaves(want).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert all(not np.array_equal(got[k], rand[k]) for k in got if not k.endswith("position_embedding/embedding"))
    assert any(not np.array_equal(v, leaves(init["unet"])[k]) for k, v in leaves(res.params["unet"]).items())


@pytest.mark.parametrize("kw,match", [
    (dict(text_encoder_pretrain=-1), ">= 0"),
])
def test_bad_settings(tmp_path, kw, match):
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match=match) as e:
        TrainConfig(out=str(tmp_path / "o"), vae=str(tmp_path / "vae"), **kw)
    assert "\n" not in str(e.value)
