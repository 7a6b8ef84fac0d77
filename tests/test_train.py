"""Training: optimizer, losses, the train loop (resumption, sharding, freezing, EMA, export),
VAE training and the ``sd-jax train`` command line.

The loop tests share one tiny configuration so that the compiled train step is reused:
runs A (24 steps, 8 devices), B (killed at step 14, resumed), C (1 device) and the
fine-tuning run all hit the same cached program per device count.
"""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sd_jax import sharding
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.train import cli as train_cli
from sd_jax.train import losses, optim
from sd_jax.train.loop import TrainConfig, read_log, train
from sd_jax.train.vae import VAETrainConfig, train_vae

SIZE = 16
# Small enough to compile quickly (compilation dominates these tests on CPU).
VAE_CFG = vae_lib.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                            sample_size=SIZE, scaling_factor=1.0, mid_block_add_attention=False)
TE_CFG = clip_lib.CLIPTextConfig.tiny(vocab_size=873, num_hidden_layers=1, bos_token_id=871, eos_token_id=872,
                                      pad_token_id=872)
UNET_CFG = unet_lib.UNetConfig.tiny(sample_size=SIZE // 2, block_out_channels=(32,), mid_block_type=None,
                                    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
# Train the UNet and the text encoder's transformer layers; its embeddings and final norm stay frozen.
TRAIN = ("unet", r"text_encoder/text_model/encoder/")
FROZEN_TE = ("embeddings", "final_layer_norm")


def leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def diffusion_config(out, vae, **kw):
    base = dict(out=str(out), vae=vae and str(vae), text_encoder_config=TE_CFG, unet_config=UNET_CFG, size=SIZE,
                steps=24, batch_size=8, lr=3e-3, warmup=2, save_every=12, ema=0.9, train=TRAIN, caption_dropout=0.2,
                snr_gamma=5.0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


# --------------------------------------------------------------------------- fixtures (shared runs)

pytestmark = pytest.mark.usefixtures("fast_train_compile")  # conftest: LLVM -O0 train steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def vae_run(runs):
    cfg = VAETrainConfig(out=str(runs / "vae"), vae_config=VAE_CFG, size=SIZE, steps=30, batch_size=8, lr=3e-3,
                         warmup=3, save_every=100, progress=False)
    return train_vae(cfg)


@pytest.fixture(scope="module")
def run_a(runs, vae_run):
    """The uninterrupted run: 24 steps on all 8 devices, checkpoints at 12 and 24."""
    return train(diffusion_config(runs / "a", runs / "vae"))


@pytest.fixture(scope="module")
def run_b_killed(runs, vae_run):
    """The same run, stopped after step 14 (checkpoints at 12 and 14)."""
    return train(diffusion_config(runs / "b", runs / "vae", stop_after=14))


# --------------------------------------------------------------------------- optimizer

def test_trainable_patterns():
    params = {"text_encoder": {"text_model": {"embeddings": {"w": np.zeros(2)}, "encoder": {"w": np.zeros(2)}}},
              "unet": {"conv_in": {"kernel": np.zeros((3, 3))}}}
    labels = leaves(optim.labels_for(params, ("unet",)))
    assert labels == {"text_encoder/text_model/embeddings/w": "freeze", "text_encoder/text_model/encoder/w": "freeze",
                      "unet/conv_in/kernel": "train"}
    labels = leaves(optim.labels_for(params, ("unet", "text_encoder/text_model/enc")))
    assert labels["text_encoder/text_model/encoder/w"] == "train"
    assert labels["text_encoder/text_model/embeddings/w"] == "freeze"
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.labels_for(params, ("vae",))
    with pytest.raises(ValueError, match="regular expression"):
        optim.OptimConfig(trainable=("unet[",))


def test_schedule_warmup_cosine_and_accumulation():
    cfg = optim.OptimConfig(lr=1.0, steps=100, warmup=10, schedule="cosine")
    lrs = [optim.lr_at(cfg, s) for s in range(100)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5, abs=1e-6) and lrs[-1] < 1e-3
    const = optim.OptimConfig(lr=1.0, steps=100, warmup=10, schedule="constant")
    assert optim.lr_at(const, 5) == pytest.approx(0.5) and optim.lr_at(const, 99) == 1.0
    # grad-accum 4: the schedule runs over 25 updates, one every 4 batches.
    acc = optim.OptimConfig(lr=1.0, steps=100, warmup=40, grad_accum=4)
    assert optim.lr_at(acc, 20) == optim.lr_at(acc, 23) == pytest.approx(0.5)

    params = {"w": jnp.ones((2, 2))}
    cfg = optim.OptimConfig(lr=0.1, steps=8, grad_accum=4, schedule="constant", weight_decay=0.0, clip_norm=None)
    labels = optim.labels_for(params, (".*",))
    tx = optim.make_optimizer(cfg, labels)
    state = tx.init(params)
    seen = []
    for i in range(8):
        grads = {"w": jnp.full((2, 2), float(i))}
        updates, state = tx.update(grads, state, params)
        seen.append(float(jnp.abs(updates["w"]).max()))
        params = optax.apply_updates(params, updates)
    assert [s > 0 for s in seen] == [False, False, False, True] * 2


def test_ema_decay_warmup():
    assert float(optim.ema_decay(0.999, 0)) == pytest.approx(0.1)
    assert float(optim.ema_decay(0.999, 10)) == pytest.approx(11 / 20)
    assert float(optim.ema_decay(0.999, 10**6)) == pytest.approx(0.999)
    labels = {"a": "train", "b": "freeze"}
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    ema = optim.ema_init(params, labels)
    assert ema["b"].shape == ()
    ema = optim.ema_update(ema, {"a": jnp.full(3, 2.0), "b": jnp.ones(3)}, labels, 0.9, 0)
    np.testing.assert_allclose(ema["a"], 1.0 + 0.9 * 1.0)  # decay 0.1 at the first update
    assert optim.ema_params(ema, params, labels)["b"] is params["b"]


# --------------------------------------------------------------------------- losses

def test_loss_pieces():
    ac = losses.NoiseSchedule().alphas_cumprod()
    assert ac.shape == (1000,) and ac[0] == pytest.approx(1 - 0.00085, rel=1e-6)
    x0 = jnp.ones((2, 2, 2, 1))
    eps = jnp.full((2, 2, 2, 1), 2.0)
    t = jnp.array([0, 999])
    a = np.broadcast_to(ac[[0, 999]][:, None, None, None], x0.shape)
    np.testing.assert_allclose(losses.add_noise(x0, eps, t, ac), np.sqrt(a) + 2 * np.sqrt(1 - a), rtol=1e-6)
    np.testing.assert_allclose(losses.prediction_target(x0, eps, t, ac, "v_prediction"),
                               np.sqrt(a) * 2 - np.sqrt(1 - a), rtol=1e-6)
    assert losses.prediction_target(x0, eps, t, ac, "epsilon") is eps
    snr = ac[[0, 999]] / (1 - ac[[0, 999]])
    np.testing.assert_allclose(losses.min_snr_weight(t, ac, 5.0, "epsilon"), np.minimum(snr, 5) / snr, rtol=1e-5)
    np.testing.assert_allclose(losses.min_snr_weight(t, ac, 5.0, "v_prediction"), np.minimum(snr, 5) / (snr + 1),
                               rtol=1e-5)
    ids = jnp.arange(12).reshape(3, 4)
    empty = (7, 8, 8, 8)
    key = jax.random.key(0)
    np.testing.assert_array_equal(losses.drop_captions(ids, empty, 0.0, key), ids)
    np.testing.assert_array_equal(losses.drop_captions(ids, empty, 1.0, key), np.tile(empty, (3, 1)))


def _tiny_loss_setup(seed):
    """A tiny text encoder + UNet, their initial params, the empty prompt's ids, a batch of 8
    random latents with 3-word captions, and a DiffusionLoss over them (min-SNR 5, dropout 0.2)."""
    from sd_jax.train.diffusion import init_params
    te = clip_lib.CLIPTextModel(TE_CFG)
    un = unet_lib.UNet2DConditionModel(UNET_CFG)
    length = TE_CFG.max_position_embeddings
    empty = (871,) + (872,) * (length - 1)
    rng = np.random.default_rng(seed)
    ids = np.full((8, length), 872, np.int32)
    ids[:, 0] = 871
    ids[:, 1:4] = rng.integers(0, 871, (8, 3))
    batch = {"latents": jnp.asarray(rng.normal(size=(8, SIZE // 2, SIZE // 2, 4)), jnp.float32),
             "input_ids": jnp.asarray(ids)}
    base = losses.DiffusionLoss(te, un, None, snr_gamma=5.0, caption_dropout=0.2, empty_ids=empty)
    return te, un, init_params(TE_CFG, UNET_CFG, 0), empty, batch, base


def _deaf(params):
    """``params`` with every cross-attention's output silenced: the caption no longer matters."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if "attn2" in optim.path_str(path) and "to_out" in optim.path_str(path)
        else x, params)


def _assert_same_grads(f, g, params, **tol):
    expected = leaves(jax.grad(g)(params))
    for k, v in leaves(jax.grad(f)(params)).items():
        np.testing.assert_allclose(v, expected[k], err_msg=k, **tol)


def test_low_noise_consistency_term():
    """``--low-noise-consistency W``: the loss gains W x the mean squared difference between
    the empty-prompt prediction and the captioned one (a constant target) at timesteps below
    ``consistency_below``, on the batch's first quarter; a UNet that ignores its caption
    gets 0, and with W = 0 the loss and its random draws are what they were."""
    te, un, params, empty, batch, base = _tiny_loss_setup(0)
    key = jax.random.key(3)
    with_term = dataclasses.replace(base, consistency_weight=2.0, consistency_below=150)
    loss0, m0 = jax.jit(base)(params, batch, key)
    loss2, m2 = jax.jit(with_term)(params, batch, key)
    assert "consistency" not in m0 and float(m2["consistency"]) > 0
    np.testing.assert_allclose(m2["mse"], m0["mse"], rtol=1e-6)            # same denoising draws
    np.testing.assert_allclose(loss2, loss0 + 2.0 * m2["consistency"], rtol=1e-5)

    # The term by hand: two of the eight examples, t < 150, the teacher a constant.
    k_t, k_noise = jax.random.split(jax.random.fold_in(key, 1))
    t = jax.random.randint(k_t, (2,), 0, 150)
    x0 = batch["latents"][:2]
    ac = losses.NoiseSchedule().alphas_cumprod()
    xt = losses.add_noise(x0, jax.random.normal(k_noise, x0.shape), t, ac)

    def eps(p, rows):
        ctx = te.apply({"params": p["text_encoder"]}, rows)["prompt_embeds"]
        return un.apply({"params": p["unet"]}, xt, t, ctx)

    teacher = eps(params, batch["input_ids"][:2])
    empties = jnp.tile(jnp.asarray(empty, jnp.int32)[None], (2, 1))

    def by_hand(p):
        return jnp.mean((eps(p, empties) - teacher) ** 2)

    np.testing.assert_allclose(m2["consistency"], by_hand(params), rtol=1e-5)
    _assert_same_grads(lambda p: with_term.low_noise_consistency(p, batch, batch["latents"], jax.random.fold_in(key, 1)),
                       by_hand, params, rtol=1e-4, atol=1e-8)

    # Silence every cross-attention's output: the caption no longer matters, the term is 0.
    deaf = _deaf(params)
    assert float(jax.jit(with_term)(deaf, batch, key)[1]["consistency"]) < 1e-12


def test_guided_loss_term():
    """``--guided-loss W``: the loss gains W x the mean squared clean-latent error of the
    guided prediction ``u + g (c - u)`` (captioned c, empty-prompt u, gradients through both)
    at timesteps below ``guided_below``, on the batch's first quarter; with W = 0 the loss and
    its draws are what they were, and for a UNet deaf to its caption the term is the plain
    clean-latent error of its one prediction."""
    te, un, params, empty, batch, base = _tiny_loss_setup(1)
    key = jax.random.key(5)
    with_term = dataclasses.replace(base, guided_weight=0.5, guided_scale=7.5, guided_below=150)
    loss0, m0 = jax.jit(base)(params, batch, key)
    loss1, m1 = jax.jit(with_term)(params, batch, key)
    assert "guided" not in m0 and float(m1["guided"]) > 0
    np.testing.assert_allclose(m1["mse"], m0["mse"], rtol=1e-6)
    np.testing.assert_allclose(loss1, loss0 + 0.5 * m1["guided"], rtol=1e-5)

    # The term by hand: two of the eight examples, t < 150.
    k_t, k_noise = jax.random.split(jax.random.fold_in(key, 2))
    t = jax.random.randint(k_t, (2,), 0, 150)
    x0 = batch["latents"][:2]
    noise = jax.random.normal(k_noise, x0.shape)
    ac = losses.NoiseSchedule().alphas_cumprod()
    a = ac[np.asarray(t)][:, None, None, None]
    xt = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    empties = jnp.tile(jnp.asarray(empty, jnp.int32)[None], (2, 1))

    def eps(p, rows):
        ctx = te.apply({"params": p["text_encoder"]}, rows)["prompt_embeds"]
        return un.apply({"params": p["unet"]}, xt, t, ctx)

    def by_hand(p):
        u, c = eps(p, empties), eps(p, batch["input_ids"][:2])
        x0_guided = (xt - np.sqrt(1 - a) * (u + 7.5 * (c - u))) / np.sqrt(a)
        return jnp.mean((x0_guided - x0) ** 2)

    np.testing.assert_allclose(m1["guided"], by_hand(params), rtol=1e-4)
    _assert_same_grads(lambda p: with_term.guided_loss(p, batch, batch["latents"], jax.random.fold_in(key, 2)),
                       by_hand, params, rtol=2e-3, atol=1e-7)

    deaf = _deaf(params)
    plain = jnp.mean(((xt - np.sqrt(1 - a) * eps(deaf, empties)) / np.sqrt(a) - x0) ** 2)
    np.testing.assert_allclose(jax.jit(with_term)(deaf, batch, key)[1]["guided"], plain, rtol=1e-4)

    for bad, match in [(dict(guided_weight=-1.0), "weight"), (dict(guided_weight=1.0, guided_scale=1.0), "scale"),
                       (dict(guided_weight=1.0, guided_below=0), "timestep"),
                       (dict(guided_weight=1.0, prediction_type="v_prediction"), "epsilon")]:
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(base, **bad)
    with pytest.raises(ValueError, match="threshold"):
        dataclasses.replace(base, consistency_weight=1.0, consistency_below=0)


def test_text_blind_below_trains_low_noise_examples_on_another_caption():
    """``--text-blind-below T``: examples drawn at t < T are denoised with the next example's
    caption (the batch rolled by one), the others with their own; T = 0 is the loss as it was,
    and a UNet deaf to its caption has the same loss either way."""
    te, un, params, empty, batch, base = _tiny_loss_setup(2)
    base = dataclasses.replace(base, caption_dropout=0.0)
    blind = dataclasses.replace(base, text_blind_below=100)
    x0 = batch["latents"]
    t = jnp.asarray([5, 600, 99, 100, 0, 950, 30, 400])             # rows 0, 2, 4, 6 under 100
    noise = jax.random.normal(jax.random.key(7), x0.shape)
    drop = jax.random.key(0)
    ids = np.asarray(batch["input_ids"])
    swapped = ids.copy()
    for row in (0, 2, 4, 6):
        swapped[row] = ids[row - 1]                                   # row 0 takes the last row's caption
    by_hand, _ = base.loss_at(params, {**batch, "input_ids": jnp.asarray(swapped)}, x0, t, noise, drop)
    got, _ = blind.loss_at(params, batch, x0, t, noise, drop)
    own, _ = base.loss_at(params, batch, x0, t, noise, drop)
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    assert abs(float(got) - float(own)) > 1e-6 * float(own)            # the captions did change
    np.testing.assert_array_equal(losses.mismatch_captions(batch["input_ids"], t < 0), ids)   # nothing under 0
    both = losses.mismatch_captions(jnp.stack([ids, ids + 1], axis=1), t < 100)   # SDXL: [B, 2 tokenizers, L]
    np.testing.assert_array_equal(both, np.stack([swapped, swapped + 1], axis=1))
    key = jax.random.key(4)
    np.testing.assert_array_equal(jax.jit(dataclasses.replace(base, text_blind_below=0))(params, batch, key)[0],
                                  jax.jit(base)(params, batch, key)[0])
    deaf = _deaf(params)
    np.testing.assert_allclose(blind.loss_at(deaf, batch, x0, t, noise, drop)[0],
                               base.loss_at(deaf, batch, x0, t, noise, drop)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="0..1000"):
        dataclasses.replace(base, text_blind_below=1001)
    with pytest.raises(ValueError, match="at least 2"):
        blind.loss_at(params, jax.tree.map(lambda a: a[:1], batch), x0[:1], t[:1], noise[:1], drop)


def test_remat_rematerialises_blocks_without_changing_results():
    cfg = unet_lib.UNetConfig.tiny(sample_size=4, block_out_channels=(16,), down_block_types=("CrossAttnDownBlock2D",),
                                   up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None, attention_head_dim=2)
    model = unet_lib.UNet2DConditionModel(cfg)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    ctx = rng.normal(size=(2, 3, 32)).astype(np.float32)
    t = np.array([3, 500])
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]
    params = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32), shapes)

    def f(p):
        return model.apply({"params": p}, x, t, ctx)

    def loss(p, remat):
        return jnp.mean((losses.remat_blocks(f) if remat else f)(p) ** 2)

    def remat_regions(remat):
        jaxpr = str(jax.make_jaxpr(lambda p: loss(p, remat))(params))
        return jaxpr.count("custom_vjp_call")

    # Every ResNet and transformer block (down: 1 + 1, up: 2 + 2) is one remat region.
    assert remat_regions(True) == 6 and remat_regions(False) == 0
    np.testing.assert_allclose(jax.jit(losses.remat_blocks(f))(params), jax.jit(f)(params), rtol=1e-6, atol=1e-6)
    g_remat = jax.jit(jax.grad(lambda p: loss(p, True)))(params)
    g_plain = jax.jit(jax.grad(lambda p: loss(p, False)))(params)
    for k, v in leaves(g_plain).items():
        np.testing.assert_allclose(leaves(g_remat)[k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_remat_lowers_compiled_memory_on_the_cpu():
    """XLA's CPU pipeline drops jax.checkpoint's optimization barriers and may then run every
    recomputation right after the forward pass (SD 1.5's gradient at 512x512: 12.85 GiB of
    temporaries with nn.remat on every block, 12.84 GiB without).  remat_blocks' recomputation
    waits for the cotangent, so the compiled program's temporaries fall (measured 754 -> 279 MiB
    for this UNet; SD 1.5 at 512x512: 12.84 -> 3.42 GiB)."""
    from sd_jax.models.policy import Policy
    cfg = unet_lib.UNetConfig.tiny(sample_size=32, block_out_channels=(32, 64), mid_block_type=None,
                                   down_block_types=("CrossAttnDownBlock2D",) * 2, attention_head_dim=8,
                                   up_block_types=("CrossAttnUpBlock2D",) * 2)
    model = unet_lib.UNet2DConditionModel(cfg, policy=Policy(cpu_lowerings=False))
    x = jax.ShapeDtypeStruct((2, 32, 32, 4), jnp.float32)
    ctx = jax.ShapeDtypeStruct((2, 5, 32), jnp.float32)
    t = jnp.array([3, 500])
    params = jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"]

    def temporaries(remat):
        f = lambda p, x, c: model.apply({"params": p}, x, t, c)  # noqa: E731
        loss = lambda p, x, c: jnp.mean((losses.remat_blocks(f) if remat else f)(p, x, c) ** 2)  # noqa: E731
        jitted = jax.jit(jax.grad(loss), compiler_options={"xla_backend_optimization_level": 0})
        return jitted.lower(params, x, ctx).compile().memory_analysis().temp_size_in_bytes

    assert temporaries(True) < 0.5 * temporaries(False)


# --------------------------------------------------------------------------- VAE training

def test_vae_training_loss_falls_and_exports(vae_run, runs):
    loss = [r["loss"] for r in vae_run.log]
    assert len(loss) == 30 and vae_run.finished
    assert np.mean(loss[-5:]) < 0.75 * np.mean(loss[:5]), loss
    assert set(vae_run.log[-1]) >= {"step", "loss", "lr", "steps_per_s", "time", "rec", "kl", "edge", "psnr"}
    model, p = vae_lib.load(vae_run.export_dir)
    assert model.config.block_out_channels == VAE_CFG.block_out_channels
    assert np.isfinite(model.config.scaling_factor) and model.config.scaling_factor > 0
    assert model.config.scaling_factor != 1.0  # calibrated at export
    p = p.get("params", p) if set(p) == {"params"} else p
    for k, v in leaves(vae_run.params["vae"]).items():
        np.testing.assert_array_equal(leaves(p)[k], v)


def test_vae_decoder_only_with_latent_noise(vae_run, runs):
    """``train vae --model V --decoder-only --latent-noise S``: the encoder (so the latent space
    and its scaling factor) stays bit-identical, the decoder learns, and the decoder's input is
    the posterior draw plus noise of standard deviation U(0, S) x the latents' std per image.
    (A scaling factor re-calibrated at 64x64 moved the shipped VAE's 0.337 to 0.3234.)"""
    from sd_jax.train.vae import build_vae_task, train_vae
    # At another image size than the VAE was trained at: a re-calibrated scaling factor would differ.
    result = train_vae(VAETrainConfig(out=str(runs / "vae_dec"), model=vae_run.export_dir, size=2 * SIZE, steps=6,
                                      batch_size=8, lr=3e-3, warmup=1, save_every=100, progress=False,
                                      decoder_only=True, latent_noise=0.5))
    before = leaves(vae_run.params["vae"])
    after = leaves(result.params["vae"])
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved and all(k.startswith(("decoder/", "post_quant_conv/")) for k in moved), sorted(moved)[:5]
    assert any(k.startswith("decoder/") for k in moved)
    assert vae_lib.load(result.export_dir)[0].config.scaling_factor == vae_lib.load(
        vae_run.export_dir)[0].config.scaling_factor

    task = build_vae_task(VAETrainConfig(out=str(runs / "vae_dec2"), model=vae_run.export_dir, size=SIZE,
                                         decoder_only=True, latent_noise=0.5))
    model, params = task.loss.model, task.params
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)), jnp.float32)
    key = jax.random.key(7)
    noisy, _ = task.loss(params, {"pixels": x}, key)
    clean, _ = dataclasses.replace(task.loss, latent_noise=0.0)(params, {"pixels": x}, key)
    mean, logvar = model.apply({"params": params["vae"]}, x, method="encode")
    z = vae_lib.sample_latent(mean, logvar, key)
    k_scale, k_noise = jax.random.split(jax.random.fold_in(key, 1))
    z = z + (jax.random.uniform(k_scale, (4, 1, 1, 1)) * 0.5 * jnp.std(mean)) * jax.random.normal(k_noise, z.shape)
    y = model.apply({"params": params["vae"]}, z, method="decode")
    err = (lambda d: jnp.abs(d)) if task.loss.recon == "l1" else (lambda d: d * d)
    rec = jnp.mean(err(y - x))
    edge = 0.5 * (jnp.mean(err(jnp.diff(y, axis=1) - jnp.diff(x, axis=1)))
                  + jnp.mean(err(jnp.diff(y, axis=2) - jnp.diff(x, axis=2))))
    kl = jnp.mean(vae_lib.kl_divergence(mean, logvar)) / x[0].size
    np.testing.assert_allclose(noisy, rec + task.loss.edge_weight * edge + task.loss.kl_weight * kl, rtol=1e-5)
    assert float(noisy) != float(clean)
    with pytest.raises(ValueError, match="give the VAE with --model"):
        VAETrainConfig(out=str(runs / "x"), decoder_only=True)


# --------------------------------------------------------------------------- diffusion training

def test_diffusion_loss_falls(run_a):
    loss = [r["loss"] for r in run_a.log]
    assert [r["step"] for r in run_a.log] == list(range(1, 25)) and run_a.finished
    assert np.mean(loss[-6:]) < 0.8 * np.mean(loss[:6]), loss
    assert run_a.log == read_log(os.path.dirname(run_a.export_dir))
    assert sorted(os.listdir(os.path.join(os.path.dirname(run_a.export_dir), "checkpoints"))) == ["12", "24"]


def test_kill_and_resume_is_exact(run_a, run_b_killed, runs):
    out = str(runs / "b")
    assert not run_b_killed.finished and run_b_killed.step == 14 and run_b_killed.export_dir is None
    assert [r["step"] for r in read_log(out)] == list(range(1, 15))
    # Killed after logging step 14 but before its checkpoint: resume from 12, redo 13-14.
    shutil.rmtree(os.path.join(out, "checkpoints", "14"))
    resumed = train(diffusion_config(out, runs / "vae"))
    assert resumed.finished and resumed.step == 24
    log_a = [(r["step"], r["loss"], r["lr"]) for r in run_a.log]
    assert [(r["step"], r["loss"], r["lr"]) for r in read_log(out)] == log_a
    for k, v in leaves(run_a.params).items():
        np.testing.assert_array_equal(leaves(resumed.params)[k], v, err_msg=k)
    for k, v in leaves(run_a.ema).items():
        np.testing.assert_array_equal(leaves(resumed.ema)[k], v, err_msg=k)
    # Restarting a finished run trains nothing more; other settings are refused.
    again = train(diffusion_config(out, runs / "vae"))
    assert again.step == 24 and len(read_log(out)) == 24
    with pytest.raises(ValueError, match="other settings"):
        train(diffusion_config(out, runs / "vae", lr=1e-3))


def test_one_device_equals_eight(run_b_killed, runs):
    assert len(jax.devices()) == 8
    one = sharding.make_mesh(jax.devices()[:1])
    single = train(diffusion_config(runs / "c", runs / "vae", stop_after=14), mesh=one)
    np.testing.assert_allclose([r["loss"] for r in single.log], [r["loss"] for r in run_b_killed.log],
                               rtol=2e-5, atol=1e-6)
    for k, v in leaves(run_b_killed.params).items():
        if k.endswith("k_proj/bias"):
            # The keys' bias has an exactly-zero gradient (softmax ignores a constant shift),
            # so its float noise, which depends on the reduction order, is all Adam sees.
            continue
        np.testing.assert_allclose(leaves(single.params)[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_freezing_and_ema(run_a, runs):
    """Fine-tune run A's export: frozen leaves stay bit-identical, EMA lies between start and params."""
    start = leaves({"text_encoder": clip_lib.load(os.path.join(run_a.export_dir, "text_encoder"))[1],
                    "unet": unet_lib.load(os.path.join(run_a.export_dir, "unet"))[1]})
    cfg = diffusion_config(runs / "ft", None, model=run_a.export_dir, text_encoder_config=None, unet_config=None,
                           stop_after=4)
    ft = train(cfg)
    params, ema = leaves(ft.params), leaves(ft.ema)
    frozen = [k for k in start if k.startswith("text_encoder") and any(f in k for f in FROZEN_TE)]
    trained = [k for k in start if k not in frozen]
    assert frozen and all(k.startswith(("unet/", "text_encoder/text_model/encoder/")) for k in trained)
    for k in frozen:
        np.testing.assert_array_equal(params[k], start[k], err_msg=k)
        np.testing.assert_array_equal(ema[k], start[k], err_msg=k)
    moved = [k for k in trained if not np.array_equal(params[k], start[k])]
    assert len(moved) > 0.9 * len(trained)
    flat = lambda d, ks: np.concatenate([d[k].ravel() for k in ks])  # noqa: E731
    p, e, s = flat(params, trained), flat(ema, trained), flat(start, trained)
    assert not np.array_equal(e, p) and not np.array_equal(e, s)
    assert np.linalg.norm(e - p) < np.linalg.norm(s - p)  # the EMA moved from the start towards the params


def test_export_is_a_diffusers_model(run_a):
    folder = run_a.export_dir
    assert sorted(os.listdir(folder)) == ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    assert sched["_class_name"] == "DPMSolverMultistepScheduler" and sched["prediction_type"] == "epsilon"
    te_model, te_p = clip_lib.load(os.path.join(folder, "text_encoder"))
    unet_model, unet_p = unet_lib.load(os.path.join(folder, "unet"))
    vae_model, _ = vae_lib.load(os.path.join(folder, "vae"))
    assert te_model.config.vocab_size == 873 and unet_model.config == UNET_CFG
    # The EMA weights were exported.
    for k, v in leaves({"text_encoder": te_p, "unet": unet_p}).items():
        np.testing.assert_array_equal(leaves(run_a.ema)[k], v, err_msg=k)
    from sd_jax.tokenizer import load_tokenizer
    assert len(load_tokenizer(os.path.join(folder, "tokenizer"))) == 873
    from sd_jax.pipeline import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.models.unet.config == UNET_CFG


def test_export_loads_in_diffusers(run_a):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(run_a.export_dir, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert tuple(pipe.unet.config.block_out_channels) == UNET_CFG.block_out_channels
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert pipe.text_encoder(ids)[0].shape == (1, 77, TE_CFG.hidden_size)


# --------------------------------------------------------------------------- command line

@pytest.mark.parametrize("recipe,argv,match", [
    (None, [], "give a recipe"),
    ("bake", [], "unknown recipe"),
    ("vae", ["--steps", "x"], "--steps"),
    ("vae", ["--steps", "0"], "at least 1"),
    ("vae", ["--dtype", "fp16"], "--dtype"),
    ("vae", ["--size", "30"], "multiple of 8"),
    ("vae", ["--bogus"], "unrecognized"),
    ("vae", ["--snr-gamma", "5"], "unrecognized"),
    ("diffusion", [], "--vae"),
    ("diffusion", ["--vae", "/nonexistent"], "not found"),
    ("finetune", [], "--model"),
    ("finetune", ["--model", "/nonexistent", "--data", "."], "not found"),
    ("vae", ["--ema", "1.5"], "ema"),
    ("diffusion", ["--vae", ".", "--zero-terminal-snr"], "needs v-prediction"),
    ("diffusion", ["--vae", ".", "--zero-terminal-snr", "--prediction-type", "epsilon"], "needs v-prediction"),
    ("vae", ["--zero-terminal-snr"], "unrecognized"),
    ("vae", ["--lr", "-1"], "learning rate"),
    ("diffusion", ["--vae", ".", "--pretrain-text-encoder", "-1"], ">= 0"),
    ("diffusion", ["--model", ".", "--pretrain-text-encoder", "5"], "brings its own"),
    ("finetune", ["--model", ".", "--pretrain-text-encoder", "5"], "unrecognized"),
    ("diffusion", ["--vae", ".", "--low-noise-consistency", "-1"], ">= 0"),
    ("vae", ["--latent-noise", "-0.1"], ">= 0"),
    ("vae", ["--decoder-only"], "give the VAE with --model"),
    ("diffusion", ["--vae", ".", "--low-noise-consistency", "1", "--consistency-below", "0"], "1..1000"),
    ("diffusion", ["--vae", ".", "--guided-loss", "-1"], ">= 0"),
    ("diffusion", ["--vae", ".", "--guided-loss", "0.1", "--guided-scale", "1"], "> 1"),
    ("finetune", ["--model", ".", "--data", ".", "--guided-loss", "0.1", "--guided-below", "1001"], "1..1000"),
    ("diffusion", ["--vae", ".", "--guided-loss", "0.1", "--prediction-type", "v_prediction"], "epsilon"),
    ("diffusion", ["--vae", ".", "--text-blind-below", "-1"], "0..1000"),
    ("finetune", ["--model", ".", "--data", ".", "--text-blind-below", "100", "--batch-size", "1"], "batch-size 2"),
    ("diffusion", ["--vae", ".", "--unet-widths", "64,64"], "3 widths, each a positive multiple of 16"),
    ("diffusion", ["--vae", ".", "--unet-widths", "64,72,128"], "multiple of 16"),
    ("diffusion", ["--vae", ".", "--unet-widths", "64,x,128"], "comma-separated integers"),
    ("diffusion", ["--vae", ".", "--unet-layers", "0"], "1..4"),
    ("diffusion", ["--model", ".", "--unet-layers", "2"], "brings its own"),
])
def test_cli_errors(recipe, argv, match):
    with pytest.raises(ValueError, match=match) as e:
        train_cli.run(recipe, argv)
    assert "\n" not in str(e.value)


def test_unet_widths_and_layers_are_the_runs_architecture(tmp_path, vae_run, runs):
    """``--unet-widths`` / ``--unet-layers`` shape the from-scratch UNet; the run records the whole
    architecture (run.json holds the resolved UNet config, the flags folded into it), so a resumed
    run rebuilds the same model."""
    from sd_jax.train.diffusion import param_shapes, resolve_configs
    cfg = train_cli.config_from_args("diffusion", ["--out", str(tmp_path / "d"), "--vae", str(runs / "vae"),
                                                   "--unet-widths", "48,96,128", "--unet-layers", "2"])
    assert (cfg.unet_widths, cfg.unet_layers) == ((48, 96, 128), 2)
    resolved = resolve_configs(cfg)
    u = resolved.unet_config
    assert (u.block_out_channels, u.layers_per_block) == ((48, 96, 128), 2)
    assert (resolved.unet_widths, resolved.unet_layers) == (None, None)
    assert resolve_configs(resolved) == resolved
    default = resolve_configs(train_cli.config_from_args("diffusion", ["--out", str(tmp_path / "d"),
                                                                        "--vae", str(runs / "vae")]))
    assert default.unet_config.block_out_channels == (32, 64, 128) and default.unet_config.layers_per_block == 1
    count = lambda c: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(param_shapes(c.text_encoder_config,  # noqa: E731
                                                                                      c.unet_config)["unet"]))
    assert count(resolved) > 1.5 * count(default)


def test_zero_terminal_snr_schedule_equals_diffusers_and_is_exported(tmp_path, vae_run, runs):
    """``--zero-terminal-snr``: the training schedule is diffusers' rescaled one (float32 rounding:
    the rescale is computed in numpy, not torch), the last timestep pure noise (so the v target
    there is -x0), and the exported scheduler config
    says so, for sd-jax and diffusers to sample with."""
    from sd_jax.train.diffusion import build_diffusion_task
    ac = losses.NoiseSchedule(rescale_betas_zero_snr=True).alphas_cumprod()
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=True)
    np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
    assert ac[-1] == 0.0 and ac[0] > 0.999
    x0, eps = jnp.full((1, 2, 2, 1), 0.5), jnp.full((1, 2, 2, 1), 2.0)
    t = jnp.array([999])
    np.testing.assert_allclose(losses.prediction_target(x0, eps, t, ac, "v_prediction"), -x0, atol=1e-7)
    np.testing.assert_allclose(
        losses.prediction_target(x0, eps, jnp.array([500]), ac, "v_prediction"),
        ref.get_velocity(torch.full((1, 1, 2, 2), 0.5), torch.full((1, 1, 2, 2), 2.0),
                         torch.tensor([500])).permute(0, 2, 3, 1).numpy(), rtol=1e-6)

    cfg = diffusion_config(tmp_path / "z", runs / "vae", prediction_type="v_prediction", zero_terminal_snr=True,
                           snr_gamma=None)
    task = build_diffusion_task(cfg)
    assert task.loss.schedule.rescale_betas_zero_snr and task.loss.prediction_type == "v_prediction"
    task.export(str(tmp_path / "model"), task.init())
    with open(tmp_path / "model" / "scheduler" / "scheduler_config.json") as f:
        sched = json.load(f)
    assert sched["rescale_betas_zero_snr"] is True and sched["prediction_type"] == "v_prediction"
    loaded = diffusers.DPMSolverMultistepScheduler.from_pretrained(str(tmp_path / "model" / "scheduler"))
    assert loaded.config.rescale_betas_zero_snr and loaded.config.timestep_spacing == "trailing"
    # Fine-tuning that model keeps its schedule and its recommended generation settings;
    # --zero-terminal-snr off on an epsilon model is refused.
    assert not (tmp_path / "model" / "generation_defaults.json").exists()  # from scratch: none
    (tmp_path / "model" / "generation_defaults.json").write_text('{"guidance_end": 0.7}')
    task2 = build_diffusion_task(dataclasses.replace(cfg, out=str(tmp_path / "f"), model=str(tmp_path / "model"),
                                                     text_encoder_config=None, unet_config=None, vae=None,
                                                     prediction_type=None, zero_terminal_snr=None))
    assert task2.loss.schedule.rescale_betas_zero_snr and task2.loss.prediction_type == "v_prediction"
    task2.export(str(tmp_path / "model2"), task2.params)
    assert json.loads((tmp_path / "model2" / "generation_defaults.json").read_text()) == {"guidance_end": 0.7}
    with pytest.raises(ValueError, match="needs v-prediction"):
        build_diffusion_task(dataclasses.replace(cfg, out=str(tmp_path / "g"), model=str(tmp_path / "model"),
                                                 text_encoder_config=None, unet_config=None, vae=None,
                                                 prediction_type="epsilon", zero_terminal_snr=None))


def test_cli_top_level_error(capsys):
    from sd_jax.cli import main
    assert main(["train", "vae", "--grad-accum", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sd-jax: error:") and "grad-accum" in err


def test_cli_builds_configs(tmp_path):
    cfg = train_cli.config_from_args("vae", ["--out", str(tmp_path / "v"), "--steps", "10", "--dtype", "bf16"])
    assert isinstance(cfg, VAETrainConfig) and cfg.steps == 10 and cfg.dtype == "bf16" and cfg.size == 64
    (tmp_path / "vae").mkdir()
    cfg = train_cli.config_from_args("diffusion", [
        "--out", str(tmp_path / "d"), "--vae", str(tmp_path / "vae"), "--train", "unet", "--prediction-type",
        "v_prediction", "--snr-gamma", "0", "--grad-accum", "2", "--remat", "--ema", "0.99"])
    assert isinstance(cfg, TrainConfig) and cfg.train == ("unet",) and cfg.snr_gamma is None
    assert cfg.prediction_type == "v_prediction" and cfg.grad_accum == 2 and cfg.remat and cfg.ema == 0.99
    assert cfg.zero_terminal_snr is None
    cfg = train_cli.config_from_args("diffusion", ["--out", str(tmp_path / "d"), "--vae", str(tmp_path / "vae"),
                                                   "--prediction-type", "v_prediction", "--zero-terminal-snr"])
    assert cfg.zero_terminal_snr is True and cfg.low_noise_consistency == 0
    cfg = train_cli.config_from_args("diffusion", ["--out", str(tmp_path / "d"), "--vae", str(tmp_path / "vae"),
                                                   "--low-noise-consistency", "1.5", "--consistency-below", "300"])
    assert cfg.low_noise_consistency == 1.5 and cfg.consistency_below == 300
    assert cfg.guided_loss == 0 and cfg.guided_scale == 7.5 and cfg.guided_below == 200
    cfg = train_cli.config_from_args("finetune", ["--out", str(tmp_path / "f"), "--model", str(tmp_path),
                                                  "--data", str(tmp_path), "--guided-loss", "0.1",
                                                  "--guided-scale", "5", "--guided-below", "300"])
    assert (cfg.guided_loss, cfg.guided_scale, cfg.guided_below) == (0.1, 5.0, 300) and cfg.text_blind_below == 0
    cfg = train_cli.config_from_args("finetune", ["--out", str(tmp_path / "f"), "--model", str(tmp_path),
                                                  "--data", str(tmp_path), "--text-blind-below", "200"])
    assert cfg.text_blind_below == 200
    assert dataclasses.replace(cfg, steps=5).steps == 5
