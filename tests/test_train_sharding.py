"""Fully-sharded training (``--shard-params``, issue 16 item 3) on 8 fake CPU devices
(conftest.py): the state really is split over the devices, sharded training equals
replicated training, and a run resumed from a sharded orbax checkpoint equals the
uninterrupted one.

One tiny text encoder + UNet (from scratch, with a random VAE frozen) shared by every
run, so the compiled steps are reused: R (replicated, 4 steps), S (sharded, 4 steps) and
K (sharded, stopped at step 3, resumed from its step-2 checkpoint).
"""
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sd_jax import sharding
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.train import cli as train_cli
from sd_jax.train import loop, optim
from sd_jax.train.loop import TrainConfig, read_log, train

SIZE = 16
VAE_CFG = vae_lib.VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                            sample_size=SIZE, scaling_factor=1.0, mid_block_add_attention=False)
TE_CFG = clip_lib.CLIPTextConfig.tiny(vocab_size=873, num_hidden_layers=1, bos_token_id=871, eos_token_id=872,
                                      pad_token_id=872)
UNET_CFG = unet_lib.UNetConfig.tiny(sample_size=SIZE // 2, block_out_channels=(32,), mid_block_type=None,
                                    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
KERNEL = "unet/down_blocks_0/resnets_0/conv1/kernel"      # [3, 3, 32, 32]: 9216 elements
BIAS = "unet/down_blocks_0/resnets_0/conv1/bias"          # [32]: too small to split


def leaves(tree):
    return {optim.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def config(out, vae, **kw):
    base = dict(out=str(out), vae=str(vae), text_encoder_config=TE_CFG, unet_config=UNET_CFG, size=SIZE, steps=4,
                batch_size=8, lr=3e-3, warmup=1, save_every=4, ema=0.9,
                train=("unet", "text_encoder/text_model/encoder/"),
                caption_dropout=0.2, snr_gamma=5.0, progress=False, export=False)
    base.update(kw)
    return TrainConfig(**base)


pytestmark = pytest.mark.usefixtures("fast_train_compile")  # conftest: LLVM -O0 train steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A random VAE (saved as a diffusers vae/ folder) and the run folders."""
    root = tmp_path_factory.mktemp("runs")
    model = vae_lib.AutoencoderKL(VAE_CFG)
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))["params"]
    vae_lib.save(str(root / "vae"), VAE_CFG, params)
    return root


def layout(state, frozen):
    """What each device holds of ``state`` (recorded at once: the loop donates it to the next step)."""
    flat = {sharding.leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    return {"specs": {p: x.sharding.spec for p, x in flat.items()},
            "shard_shapes": {p: x.addressable_shards[0].data.shape for p, x in flat.items()},
            "fraction": sharding.sharded_fraction(state), "frozen_fraction": sharding.sharded_fraction(frozen)}


@pytest.fixture(scope="module")
def seen(runs):
    """Run S (sharded), recording the layout of the state the loop hands to the first compiled
    step and of the state it gets back."""
    calls = []
    real = loop.train_step

    def spy(loss, opt, seed, shard, state, frozen, batch):
        first = not calls
        if first:
            calls.append((shard, layout(state, frozen)))
        out = real(loss, opt, seed, shard, state, frozen, batch)
        if first:
            calls.append((shard, layout(out[0], frozen)))
        return out

    loop.train_step = spy
    try:
        result = train(config(runs / "s", runs / "vae", shard_params=True))
    finally:
        loop.train_step = real
    return result, calls


@pytest.fixture(scope="module")
def replicated(runs):
    return train(config(runs / "r", runs / "vae"))


def test_state_is_sharded(seen):
    _, calls = seen
    assert len(jax.devices()) == 8 and len(calls) == 2   # the state going in and coming out
    split = P(None, None, None, "data")
    for shard, seen_layout in calls:
        assert isinstance(shard, sharding.ParamRules)
        specs, shapes = seen_layout["specs"], seen_layout["shard_shapes"]
        assert specs["params/" + KERNEL] == split and shapes["params/" + KERNEL] == (3, 3, 32, 4)
        assert specs["params/" + BIAS] == P() and shapes["params/" + BIAS] == (32,)
        # Adam's two moments and the EMA of that kernel are split the same way.
        moments = [p for p in specs if p.endswith(KERNEL) and p.startswith("opt_state/")]
        assert len(moments) == 2 and all(specs[p] == split for p in moments)
        assert specs["ema/" + KERNEL] == split
        # Each device holds well under half of the state's bytes and of the frozen VAE's (this
        # tiny model has many leaves too small to split; the SD UNets' figures are in benchmarks/).
        assert seen_layout["fraction"] < 0.4 and seen_layout["frozen_fraction"] < 0.5
    # Replicated, each device holds all of it.
    assert sharding.sharded_fraction(sharding.replicate({"w": np.zeros((8, 512))}, sharding.make_mesh())) == 1.0


def test_fsdp_spec_rules():
    assert sharding.fsdp_spec((3, 3, 320, 640), 8) == P(None, None, None, "data")   # largest divisible
    assert sharding.fsdp_spec((1280, 77), 8) == P("data")
    assert sharding.fsdp_spec((77, 1283), 8) == P()                                # none divides by 8
    assert sharding.fsdp_spec((4096, 12), 8) == P("data")                          # 12 % 8 != 0
    assert sharding.fsdp_spec((320,), 8) == P() and sharding.fsdp_spec((), 8) == P()   # small: replicated
    rules = sharding.ParamRules(sharding.make_mesh(), rules=((r"ema/.*", "replicate"), (r".*", "fsdp")))
    assert rules.spec("ema/unet/w", (1024, 1024)) == P()
    assert rules.spec("params/unet/w", (1024, 1024)) == P(None, "data")       # equal sizes: the last
    with pytest.raises(ValueError, match="unknown sharding rule"):
        sharding.ParamRules(sharding.make_mesh(), rules=((".*", "tp"),))


def test_sharded_equals_replicated(seen, replicated):
    sharded, _ = seen
    assert sharded.finished and replicated.finished
    assert [r["step"] for r in sharded.log] == list(range(1, 5))
    # Same program up to the order of float32 reductions (all-reduce vs reduce-scatter).
    np.testing.assert_allclose([r["loss"] for r in sharded.log], [r["loss"] for r in replicated.log],
                               rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in sharded.log], [r["grad_norm"] for r in replicated.log],
                               rtol=1e-4)
    for tree_s, tree_r in ((sharded.params, replicated.params), (sharded.ema, replicated.ema)):
        s, r = leaves(tree_s), leaves(tree_r)
        assert s.keys() == r.keys()
        for k, v in r.items():
            if k.endswith("k_proj/bias") or k.endswith("to_k/bias"):
                # An exactly-zero gradient (softmax ignores a constant shift): Adam sees only
                # its reduction-order noise (as in test_train's one-device test).
                continue
            np.testing.assert_allclose(s[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_from_sharded_checkpoint_is_exact(seen, runs):
    sharded, _ = seen
    out = runs / "k"
    killed = train(config(out, runs / "vae", shard_params=True, stop_after=3, save_every=2))
    assert not killed.finished and killed.step == 3
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "3"]
    # Killed after logging step 3 but before its checkpoint: resume from 2, redo 3-4.
    shutil.rmtree(out / "checkpoints" / "3")
    resumed = train(config(out, runs / "vae", shard_params=True, save_every=2))
    assert resumed.finished and resumed.step == 4
    assert [(r["step"], r["loss"]) for r in read_log(str(out))] == [(r["step"], r["loss"]) for r in sharded.log]
    for tree_a, tree_b in ((sharded.params, resumed.params), (sharded.ema, resumed.ema)):
        b = leaves(tree_b)
        for k, v in leaves(tree_a).items():
            np.testing.assert_array_equal(b[k], v, err_msg=k)


def test_shard_params_needs_several_devices(runs, tmp_path):
    one = sharding.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="--shard-params .* only one") as e:
        train(config(tmp_path / "one", runs / "vae", shard_params=True, batch_size=1), mesh=one)
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "one" / "run.json")


def test_cli_flag(tmp_path, capsys, monkeypatch):
    argv = ["--out", str(tmp_path / "v"), "--steps", "1", "--batch-size", "1", "--shard-params", "--no-progress"]
    assert train_cli.config_from_args("vae", argv).shard_params
    assert not train_cli.config_from_args("vae", argv[:-2]).shard_params
    (tmp_path / "vae").mkdir()
    cfg = train_cli.config_from_args("diffusion", ["--vae", str(tmp_path / "vae"), "--shard-params"])
    assert cfg.shard_params
    # One device: `sd-jax train` says so in one line.
    from sd_jax.cli import main
    monkeypatch.setattr(sharding, "make_mesh", lambda devices=None: sharding.Mesh(np.asarray(jax.devices()[:1]),
                                                                                  (sharding.AXIS,)))
    assert main(["train", "vae"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sd-jax: error: --shard-params") and "only one" in err and "\n" not in err, err
