"""Fine-tuning SDXL (``sd-jax train finetune --model SDXL_FOLDER``) on a tiny random SDXL
saved by diffusers (``build_tiny_sdxl``: two tokenizers, the second padding with ``!``,
CLIP + CLIP-with-projection encoders, the ``text_time`` UNet).

The loss is checked against the computation of diffusers' ``train_text_to_image_sdxl.py``
done with diffusers' torch UNet, transformers' encoders and ``DDPMScheduler`` (fp32; measured
4e-7 (epsilon) and 2e-7 (v) relative on the dev VM, tolerance 1e-5).  The run tests use one
device, LLVM -O0 on the CPU, and share one compiled train step.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from test_sdxl_pipeline import build_tiny_sdxl
from test_sdxl_refiner import build_tiny_refiner
from test_train import leaves
from tiny_models import nchw

from sd_jax import sharding
from sd_jax.train import cli as train_cli
from sd_jax.train import data as data_lib
from sd_jax.train.diffusion import build_diffusion_task
from sd_jax.train.loop import TrainConfig, read_log, train
from sd_jax.train import losses as losses_lib
from sd_jax.train.losses import drop_captions

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SIZE = 32          # the tiny VAE downsamples by 2: 16x16 latents, the UNet's sample_size
CAPTIONS = ["a small red circle at the top left", "a green square"]
TIME_IDS = np.array([[40, 24, 3, 0, 32, 32], [32, 48, 0, 8, 32, 32]], np.float32)
TRAIN = ("unet", "text_encoder_2")   # the first text encoder stays frozen
# The tiny SDXL UNet cut to one level (a ResNet and a transformer layer, cross-attention on the
# 64-wide concatenated context, text_time conditioning): its train step compiles in a third
# of the time of the two-level one.
ONE_LEVEL = dict(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                 up_block_types=("CrossAttnUpBlock2D",), transformer_layers_per_block=(1,), attention_head_dim=(2,),
                 layers_per_block=1, mid_block_type=None)


pytestmark = pytest.mark.usefixtures("fast_train_compile")  # conftest: LLVM -O0 train steps


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("sdxl_tiny"))
    return folder, build_tiny_sdxl(folder, **ONE_LEVEL)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Three captioned images of other sizes than SIZE (landscape, portrait, square)."""
    d = tmp_path_factory.mktemp("sdxl_data")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(48, 32), (32, 40), (36, 36)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(CAPTIONS[i % 2])
    return str(d)


def config(out, model, **kw):
    base = dict(out=str(out), model=model, size=SIZE, steps=4, batch_size=2, lr=1e-3, warmup=1, save_every=2,
                train=TRAIN, caption_dropout=0.3, snr_gamma=5.0, random_flip=True, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def one_device():
    return sharding.make_mesh(jax.devices()[:1])


# --------------------------------------------------------------------------- the loss

def _reference_loss(pipe, folder, x0, t, noise, prediction_type, gamma):
    """train_text_to_image_sdxl.py's loss (encode_prompt, compute_time_ids, add_noise, target, min-SNR)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr
    sched = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    sched.register_to_config(prediction_type=prediction_type)
    with torch.no_grad():
        embeds = []
        for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
            ids = tok(CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids, output_hidden_states=True, return_dict=False)
            pooled = out[0]                       # the last encoder's: text_encoder_2's projection
            embeds.append(out[-1][-2])
        prompt_embeds = torch.concat(embeds, dim=-1)
        x0, noise, t = nchw(x0), nchw(noise), torch.from_numpy(t).long()
        noisy = sched.add_noise(x0, noise, t)
        pred = pipe.unet(noisy, t, prompt_embeds, added_cond_kwargs={"text_embeds": pooled,
                                                                      "time_ids": torch.from_numpy(TIME_IDS)}).sample
        target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        snr = compute_snr(sched, t)
        w = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        per = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        return float((per * w).mean())


@pytest.fixture(scope="module")
def task(tiny, tmp_path_factory):
    folder, _ = tiny
    return build_diffusion_task(config(tmp_path_factory.mktemp("sdxl_task"), folder))


def test_loss_matches_diffusers_training_script(tiny, task):
    """Epsilon and v-prediction, min-SNR-gamma 5, two captions, non-default time ids."""
    import dataclasses
    from sd_jax.train.step import compile_cheap
    folder, pipe = tiny
    assert task.batch_keys == ("pixels", "input_ids", "time_ids")
    assert sorted(task.params) == ["text_encoder", "text_encoder_2", "unet"]
    rng = np.random.RandomState(0)
    x0 = rng.randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    noise = rng.randn(*x0.shape).astype(np.float32)
    t = np.array([17, 803], np.int32)
    batch = {"input_ids": task.tokenize(CAPTIONS), "time_ids": TIME_IDS}
    params = {**task.params, **task.frozen}
    # a drop key with which no caption is dropped (p = 0.3): the reference encodes the captions
    key = jax.random.key(1)
    assert not (jax.random.uniform(key, (2,)) < task.loss.caption_dropout).any()
    kinds = ("epsilon", "v_prediction")
    losses = [dataclasses.replace(task.loss, prediction_type=k) for k in kinds]
    both = compile_cheap(lambda p, b: [lo.loss_at(p, b, x0, t, noise, key)[0] for lo in losses], params, batch)
    for kind, got in zip(kinds, both(params, batch)):
        want = _reference_loss(pipe, folder, x0, t, noise, kind, 5.0)
        print(f"{kind}: loss {float(got):.8f} vs {want:.8f}")
        assert abs(float(got) - want) <= 1e-5 * abs(want)


def test_caption_dropout_is_the_encoded_empty_prompt_of_both_tokenizers(tiny, task):
    _, pipe = tiny
    empty = np.stack([tok([""], padding="max_length", max_length=77, return_tensors="np").input_ids[0]
                      for tok in (pipe.tokenizer, pipe.tokenizer_2)])
    np.testing.assert_array_equal(np.asarray(task.loss.empty_ids), empty)
    assert empty[1, -1] == pipe.tokenizer_2.pad_token_id != empty[0, -1]   # "!" pads the second
    ids = task.tokenize(CAPTIONS)
    assert ids.shape == (2, 2, 77)
    np.testing.assert_array_equal(drop_captions(ids, task.loss.empty_ids, 1.0, jax.random.key(0)),
                                  np.stack([empty, empty]))
    key = jax.random.key(3)
    dropped = np.asarray(jax.random.uniform(key, (2,)) < 0.5)
    mixed = np.asarray(drop_captions(ids, task.loss.empty_ids, 0.5, key))
    assert dropped.any() and not dropped.all()   # one of each: both tokenizers' ids go together
    for i in range(2):
        np.testing.assert_array_equal(mixed[i], empty if dropped[i] else ids[i])


def test_guided_loss_uses_the_empty_prompts_pooled_embedding(tiny, task):
    """``--guided-loss`` on SDXL: the empty-prompt half of the guided prediction is conditioned
    on the empty prompt's pooled embedding too (as diffusers' pipeline guides), not the caption's."""
    import dataclasses
    from sd_jax.train.step import compile_cheap
    loss = dataclasses.replace(task.loss, guided_weight=1.0, guided_below=300)
    params = {**task.params, **task.frozen}
    rng = np.random.RandomState(2)
    x0 = jnp.asarray(rng.randn(4, SIZE // 2, SIZE // 2, 4).astype(np.float32))
    batch = {"input_ids": task.tokenize(CAPTIONS + CAPTIONS), "time_ids": np.tile(TIME_IDS, (2, 1))}
    key = jax.random.key(7)

    def by_hand(p, b):
        k_t, k_noise = jax.random.split(key)
        sub = jax.tree.map(lambda a: a[:1], b)
        t = jax.random.randint(k_t, (1,), 0, 300)
        noise = jax.random.normal(k_noise, x0[:1].shape)
        ac = loss.schedule.alphas_cumprod()
        xt = losses_lib.add_noise(x0[:1], noise, t, ac)
        c_ctx, c_add = loss.condition(p, sub, key, p=0.0)
        u_ctx, u_add = loss.condition(p, sub, key, p=1.0)
        c = loss.unet.apply({"params": p["unet"]}, xt, t, c_ctx, added_cond_kwargs=c_add)
        u = loss.unet.apply({"params": p["unet"]}, xt, t, u_ctx, added_cond_kwargs=u_add)
        a = jnp.asarray(ac)[t][:, None, None, None]
        return jnp.mean(((u + 7.5 * (c - u) - noise) * jnp.sqrt((1 - a) / a)) ** 2), \
            jnp.abs(c_add["text_embeds"] - u_add["text_embeds"]).max()

    both = compile_cheap(lambda p, b: (loss.guided_loss(p, b, x0, key), by_hand(p, b)), params, batch)
    got, (want, pooled_gap) = both(params, batch)
    assert float(pooled_gap) > 1e-3          # the two pooled embeddings differ, so the test can tell
    np.testing.assert_allclose(float(got), float(want), rtol=1e-4)


def test_time_ids_from_the_data_loader(data_dir):
    """original (h, w) + the crop's top-left (y, x) + target (SIZE, SIZE); a flipped image's
    crop left is its left in the mirrored resized image."""
    source = data_lib.ImageCaptionFolder(data_dir, SIZE)
    # (48, 32) -> resized 48x32, crop left 8; (32, 40) -> 32x40, crop top 4; (36, 36) -> 32x32
    want = {0: (32, 48, 0, 8, 48), 1: (40, 32, 4, 0, 32), 2: (36, 36, 0, 0, 32)}
    assert {i: source.geometry(i) for i in range(3)} == want
    for step, batch in zip(range(6), data_lib.batches(source, 3, seed=0, random_flip=True, time_ids=True)):
        for row, pixels in zip(batch["time_ids"], batch["pixels"]):
            i = next(i for i in range(3) if (row[0], row[1]) == want[i][:2])
            flipped = not np.array_equal(pixels, source.get(i)[0])
            left = want[i][4] - want[i][3] - SIZE if flipped else want[i][3]
            assert tuple(row) == (want[i][0], want[i][1], want[i][2], left, SIZE, SIZE)
    assert "time_ids" not in next(data_lib.batches(source, 1, seed=0))


# --------------------------------------------------------------------------- runs

@pytest.fixture(scope="module")
def runs(tiny, data_dir, tmp_path_factory):
    folder, _ = tiny
    root = tmp_path_factory.mktemp("sdxl_runs")
    # run A's settings as the command line makes them (the size from the model: 16 latents x 2)
    argv = ["--model", folder, "--data", data_dir, "--out", str(root / "a"), "--steps", "4", "--batch-size", "2",
            "--lr", "1e-3", "--warmup", "1", "--save-every", "2", "--keep", "3", "--train", ",".join(TRAIN),
            "--caption-dropout", "0.3", "--snr-gamma", "5", "--flip", "--no-progress"]
    assert train_cli.config_from_args("finetune", argv) == config(root / "a", folder, data=data_dir)
    full = train(config(root / "a", folder, data=data_dir), mesh=one_device())
    killed = train(config(root / "b", folder, data=data_dir, stop_after=3), mesh=one_device())
    # killed after logging step 3 but before its checkpoint: resumes from 2
    shutil.rmtree(os.path.join(root, "b", "checkpoints", "3"))
    resumed = train(config(root / "b", folder, data=data_dir), mesh=one_device())
    return full, killed, resumed, str(root / "b")


def test_finetune_trains_unet_and_text_encoder_2_and_resumes_exactly(tiny, runs):
    from sd_jax.weights import loader
    folder, _ = tiny
    full, killed, resumed, out = runs
    assert full.finished and not killed.finished and resumed.finished and resumed.step == 4
    start = leaves({k: v for k, v in jax.device_get(loader.load(folder).params).items() if k != "vae"})
    got = leaves(full.params)
    for name in ("unet/", "text_encoder_2/"):
        keys = [k for k in start if k.startswith(name)]
        moved = [k for k in keys if not np.array_equal(got[k], start[k])]
        assert len(moved) > 0.5 * len(keys), name
    for k in (k for k in start if k.startswith("text_encoder/")):
        np.testing.assert_array_equal(got[k], start[k], err_msg=k)
    assert [(r["step"], r["loss"]) for r in read_log(out)] == [(r["step"], r["loss"]) for r in full.log]
    for k, v in got.items():
        np.testing.assert_array_equal(leaves(resumed.params)[k], v, err_msg=k)


def test_export_loads_in_diffusers_with_the_same_image(runs):
    from diffusers import StableDiffusionXLPipeline
    from sd_jax.pipeline import StableDiffusionPipeline
    full, *_ = runs
    folder = full.export_dir
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    ref = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    assert type(ref.scheduler).__name__ == "EulerDiscreteScheduler"
    ours = StableDiffusionPipeline.from_pretrained(folder)
    np.testing.assert_array_equal(np.asarray(ours.params["unet"]["conv_out"]["kernel"]),
                                  leaves(full.params)["unet/conv_out/kernel"])
    lat = np.random.RandomState(4).randn(2, SIZE // 2, SIZE // 2, 4).astype(np.float32)
    got = ours(CAPTIONS, latents=lat, num_inference_steps=2, guidance_scale=1.0, height=SIZE, width=SIZE,
               output_type="np")
    with torch.no_grad():
        want = ref(prompt=CAPTIONS, latents=nchw(lat), num_inference_steps=2, guidance_scale=1.0, height=SIZE,
                   width=SIZE, output_type="np").images
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"max |diff| {diff:.2e}")
    assert diff <= 2 / 255


# --------------------------------------------------------------------------- what is not supported

def test_refiner_is_a_one_line_error(tmp_path, data_dir, capsys):
    from sd_jax.cli import main
    refiner = str(tmp_path / "refiner")
    build_tiny_refiner(refiner)
    capsys.readouterr()   # diffusers' progress bars
    assert main(["train", "finetune", "--model", refiner, "--data", data_dir, "--out", str(tmp_path / "r"),
                 "--size", str(SIZE), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sd-jax: error:") and "refiner" in err[0], err
