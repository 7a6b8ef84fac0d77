"""AutoencoderKL parity with diffusers (PyTorch, float32) on seeded random weights."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.models.vae import (AutoencoderKL, VAEConfig, canonical_key, kl_divergence, load,  # noqa: E402
                               param_shapes, sample_latent, save)
from sd_jax.weights.convert import flatten, state_dict_to_params  # noqa: E402
from sd_jax.weights.safetensors_io import CheckpointError, load_file, save_file  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"
TOL = 1e-4  # float32, outputs of magnitude ~1


def torch_vae(cfg: VAEConfig, seed=0):
    """diffusers AutoencoderKL with seeded weights; norms get non-trivial scale/bias."""
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL.from_config(cfg.to_dict()).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return m


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def torch_encode(m, x):
    with torch.no_grad():
        dist = m.encode(nchw(x)).latent_dist
    return nhwc(dist.mean), nhwc(dist.logvar)


def torch_decode(m, z):
    with torch.no_grad():
        return nhwc(m.decode(nchw(z)).sample)


def jax_fns(model):
    enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.encode))
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=AutoencoderKL.decode))
    return enc, dec


def maxdiff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = VAEConfig.tiny()
    tm = torch_vae(cfg)
    folder = str(tmp_path_factory.mktemp("vae_tiny"))
    tm.save_pretrained(folder)
    model, params = load(folder)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 32, 24, 3)).astype(np.float32)   # non-square on purpose
    z = rng.randn(2, 16, 12, cfg.latent_channels).astype(np.float32)
    return dict(cfg=cfg, torch=tm, folder=folder, model=model, params=params, x=x, z=z,
                fns=jax_fns(model))


def test_config_from_dict_to_dict(tiny):
    cfg = VAEConfig.from_dict(dict(tiny["torch"].config))  # has _class_name, act_fn, ... extras
    assert cfg == tiny["cfg"]
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    assert VAEConfig.from_dict({}) == VAEConfig()          # defaults = diffusers' defaults
    assert VAEConfig.sd15().downscale_factor == 8 and VAEConfig.sdxl().scaling_factor == 0.13025
    z = jnp.arange(4.0)
    sxl = VAEConfig(shift_factor=0.1159, scaling_factor=0.3611)
    np.testing.assert_allclose(sxl.unscale_latents(sxl.scale_latents(z)), z, rtol=1e-6)
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict({"block_out_channels": [32, 64],
                             "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(ValueError, match="act_fn"):
        VAEConfig.from_dict({"act_fn": "gelu"})


def test_tiny_parity(tiny):
    enc, dec = tiny["fns"]
    mean, logvar = enc(tiny["params"], tiny["x"])
    tmean, tlogvar = torch_encode(tiny["torch"], tiny["x"])
    y = dec(tiny["params"], tiny["z"])
    assert mean.shape == (2, 16, 12, 4) and mean.dtype == jnp.float32
    assert y.shape == (2, 32, 24, 3) and y.dtype == jnp.float32
    d = (maxdiff(mean, tmean), maxdiff(logvar, tlogvar), maxdiff(y, torch_decode(tiny["torch"], tiny["z"])))
    print(f"tiny max abs diff: mean {d[0]:.2e} logvar {d[1]:.2e} decode {d[2]:.2e}")
    assert max(d) < TOL


def test_sample_latent_and_call(tiny):
    mean, logvar = jnp.ones((2, 3, 3, 4)), jnp.full((2, 3, 3, 4), np.log(4.0))
    s = sample_latent(mean, logvar, jax.random.PRNGKey(0))
    assert s.shape == mean.shape and abs(float(jnp.std(s - mean)) - 2.0) < 0.6
    np.testing.assert_allclose(sample_latent(mean, jnp.full_like(mean, -30.0), jax.random.PRNGKey(0)), mean, atol=1e-5)
    np.testing.assert_allclose(kl_divergence(jnp.zeros((1, 2, 2, 4)), jnp.zeros((1, 2, 2, 4))), [0.0])
    # __call__ without a key = decode(mode); checked against diffusers' forward (mode, not sampled).
    model, params = tiny["model"], tiny["params"]
    x = tiny["x"][:1, :16, :16]
    with torch.no_grad():
        ref = nhwc(tiny["torch"](nchw(x), sample_posterior=False).sample)
    assert maxdiff(model.apply({"params": params}, x), ref) < TOL


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_old_attention_key_names(tiny, tmp_path, conv_shaped):
    sd = load_file(os.path.join(tiny["folder"], WEIGHTS))
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed, n = {}, 0
    for k, v in sd.items():
        for new, o in old.items():
            if f".attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{o}.")
                if conv_shaped and v.ndim == 2:
                    v = v[:, :, None, None]
                n += 1
        renamed[k] = np.array(v)
    assert n == 16  # encoder + decoder: 4 projections x (weight, bias)
    assert canonical_key("decoder.mid_block.attentions.0.proj_attn.weight") == \
        "decoder.mid_block.attentions.0.to_out.0.weight"
    save_file(renamed, str(tmp_path / WEIGHTS))
    (tmp_path / "config.json").write_text(json.dumps(dict(tiny["torch"].config)))
    _, params = load(str(tmp_path))
    want, got = flatten(tiny["params"]), flatten(params)
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))


def test_save_loads_in_diffusers(tiny, tmp_path):
    save(str(tmp_path), tiny["cfg"], tiny["params"])
    back = diffusers.AutoencoderKL.from_pretrained(str(tmp_path)).eval()
    ref = tiny["torch"].state_dict()
    got = back.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)
    _, dec = tiny["fns"]
    assert maxdiff(torch_decode(back, tiny["z"]), dec(tiny["params"], tiny["z"])) < TOL


def test_mismatched_config_is_a_checkpoint_error(tiny, tmp_path):
    sd = load_file(os.path.join(tiny["folder"], WEIGHTS))
    save_file({k: np.array(v) for k, v in sd.items()}, str(tmp_path / WEIGHTS))
    cfg = tiny["cfg"].to_dict()
    cfg["layers_per_block"] = 2            # weights have 1 resnet per down block
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"vae weights do not match its config.*missing.*up_blocks\.0\.resnets\.2"):
        load(str(tmp_path))
    cfg = tiny["cfg"].to_dict()
    cfg["latent_channels"] = 8             # conv shapes differ
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load(str(tmp_path))


# bfloat16 compute (float32 statistics in GroupNorm and softmax) vs float32 on the same weights.
# Measured (tiny config, outputs ~1): encode mean 1.2e-2 / 1.5e-2, decode 2.8e-2 / 2.6e-2 with
# float32 / bfloat16 params; the bound leaves ~3x margin.
BF16_TOL = 0.08


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_close_to_float32(tiny, param_dtype):
    model, params = load(tiny["folder"], dtype=jnp.bfloat16, param_dtype=param_dtype)
    assert jax.tree.leaves(params)[0].dtype == param_dtype
    enc, dec = jax_fns(model)
    enc32, dec32 = tiny["fns"]
    mean, _ = enc(params, tiny["x"])
    mean32, _ = enc32(tiny["params"], tiny["x"])
    y, y32 = dec(params, tiny["z"]), dec32(tiny["params"], tiny["z"])
    assert mean.dtype == y.dtype == jnp.float32
    d_enc, d_dec = maxdiff(mean, mean32), maxdiff(y, y32)
    print(f"bf16 ({jnp.dtype(param_dtype).name} params) vs f32: encode mean {d_enc:.2e}, decode {d_dec:.2e}")
    assert d_enc < BF16_TOL and d_dec < BF16_TOL


def test_sd15_config_parity():
    """The real SD 1.5 VAE architecture (128/256/512/512, 2 layers, 32 groups) at 64x64 <-> 8x8."""
    cfg = VAEConfig.sd15()
    tm = torch_vae(cfg, seed=1)
    model = AutoencoderKL(cfg)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    params = state_dict_to_params(sd, param_shapes(model), what="vae")
    rng = np.random.RandomState(1)
    x = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    z = rng.randn(1, 8, 8, 4).astype(np.float32)
    enc, dec = jax_fns(model)
    mean, logvar = enc(params, x)
    tmean, tlogvar = torch_encode(tm, x)
    y, ty = dec(params, z), torch_decode(tm, z)
    d = (maxdiff(mean, tmean), maxdiff(logvar, tlogvar), maxdiff(y, ty))
    print(f"sd15 max abs diff: mean {d[0]:.2e} logvar {d[1]:.2e} decode {d[2]:.2e} "
          f"(|mean| {np.abs(tmean).max():.2f}, |decode| {np.abs(ty).max():.2f})")
    assert max(d) < TOL
