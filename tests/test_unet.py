"""UNet2DConditionModel parity with diffusers 0.42 PyTorch (random weights, float32).

Reference models are built by diffusers from ``UNetConfig.to_dict()``, their weights
perturbed (so no zero/one-initialised parameter hides a mapping error) and saved with
``save_pretrained``; sd-jax reads the folder with :func:`sd_jax.models.unet.load`.
sd-jax is NHWC, diffusers NCHW: inputs and outputs are transposed.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models import attention as attn
from sd_jax.models import layers
from sd_jax.models.policy import Policy
from sd_jax.models.unet import UNet2DConditionModel, UNetConfig, load, save
from sd_jax.weights.convert import state_dict_to_params
from sd_jax.weights.safetensors_io import CheckpointError

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-4          # max abs difference on outputs of magnitude ~1 (measured: ~2e-6 .. 6e-6)
BF16_REL_TOL = 0.03  # ||bf16 - f32|| / ||f32|| (measured: ~0.006 on the tiny model)
# LLVM -O0: the same HLO (fusions, blocked attention, im2col) compiles ~2.5x faster; the
# tests are compile-bound.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run(model, params, *args):
    """jit-compile (fast) and run ``model.apply``; args may hold dicts (added_cond_kwargs)."""
    args = jax.tree.map(jnp.asarray, args)
    f = jax.jit(model.apply).lower({"params": params}, *args).compile(FAST_COMPILE)
    return f({"params": params}, *args)


def _torch_unet(cfg: UNetConfig, seed=0, jitter=0.05):
    torch.manual_seed(seed)
    m = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(jitter * torch.randn_like(p))
    return m.eval()


def _inputs(cfg, size, batch=2, seq=7, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((batch, seq, cfg.cross_dims[0])).astype(np.float32)
    return x, ctx


def _torch_out(m, x, t, ctx, added=None):
    with torch.inference_mode():
        kw = {} if added is None else {"added_cond_kwargs": {k: torch.from_numpy(v) for k, v in added.items()}}
        out = m(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.as_tensor(t),
                torch.from_numpy(ctx), **kw).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _check(cfg, tmp_path, t, size=32):
    tm = _torch_unet(cfg)
    tm.save_pretrained(tmp_path / "unet")
    model, params = load(str(tmp_path / "unet"), dtype=jnp.float32)
    assert model.config == cfg
    x, ctx = _inputs(cfg, size)
    ref = _torch_out(tm, x, np.broadcast_to(np.asarray(t), (2,)).copy(), ctx)
    out = np.asarray(_run(model, params, x, t, ctx))
    assert out.shape == ref.shape
    diff = float(np.abs(out - ref).max())
    print(f"max |diff| {diff:.2e} (output max {np.abs(ref).max():.2f})")
    assert diff < TOL, diff
    return model, params, tm


# ----------------------------------------------------------------------------- config
def test_config_heads_and_roundtrip():
    sd15 = UNetConfig.sd15()
    assert sd15.heads == (8, 8, 8, 8) and sd15.cross_attention_dim == 768
    sd21 = UNetConfig.from_dict({**UNetConfig.sd21().to_dict(), "some_future_key": 1})
    # diffusers: num_attention_heads falls back to attention_head_dim, head dim = channels / heads
    assert sd21.heads == (5, 10, 20, 20)
    assert [c // h for c, h in zip(sd21.block_out_channels, sd21.heads)] == [64, 64, 64, 64]
    assert UNetConfig.sd15_inpaint().in_channels == 9
    for cfg in (sd15, sd21, UNetConfig.tiny(transformer_layers_per_block=(1, 2, 1))):
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    # num_attention_heads (refused by diffusers' constructor) is written as attention_head_dim
    d = UNetConfig.tiny(num_attention_heads=2).to_dict()
    assert d["attention_head_dim"] == 2 and d["num_attention_heads"] is None
    m = diffusers.UNet2DConditionModel.from_config(UNetConfig.tiny().to_dict())
    assert m.config.attention_head_dim == 4


def test_config_unsupported():
    with pytest.raises(NotImplementedError, match="class_embed_type"):
        UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), "class_embed_type": "timestep"})
    with pytest.raises(NotImplementedError, match="SimpleCrossAttnDownBlock2D"):
        UNetConfig.tiny(down_block_types=("SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"))
    with pytest.raises(CheckpointError, match="AutoencoderKL"):
        UNetConfig.from_dict({"_class_name": "AutoencoderKL"})
    # addition types other than SDXL's text_time (tests/test_unet_sdxl.py) are refused
    with pytest.raises(NotImplementedError, match="addition_embed_type='text_image'"):
        UNetConfig.from_dict({**UNetConfig.tiny().to_dict(), "addition_embed_type": "text_image"})


# ----------------------------------------------------------------------------- parity
PARITY = {
    "sd1": UNetConfig.tiny(),
    # SD 2.x: linear projections, per-block head counts, upcast attention, 1024-like context
    "sd2": UNetConfig.tiny(use_linear_projection=True, attention_head_dim=(2, 4, 4),
                           upcast_attention=True, cross_attention_dim=48),
    "inpaint": UNetConfig.tiny(in_channels=9, flip_sin_to_cos=False, freq_shift=1),
    # per block, and per layer (SDXL style, with the reversed list for the up path)
    "layers": UNetConfig.tiny(layers_per_block=2, transformer_layers_per_block=((1, 2), (2, 1), (1, 1)),
                              reverse_transformer_layers_per_block=((1, 1, 1), (2, 1, 2), (3, 1, 1))),
}


# timesteps in every accepted form: scalar / [B], int / float
TIMESTEPS = {"sd1": 500, "sd2": np.array([10.0, 981.0], np.float32), "inpaint": np.array([3, 999]),
             "layers": 17.5}


@pytest.mark.parametrize("name", list(PARITY))
def test_parity_tiny(name, tmp_path):
    _check(PARITY[name], tmp_path, TIMESTEPS[name])


def test_parity_sd15_full_width(tmp_path):
    """The real SD 1.5 config (320/640/1280/1280, 8 heads, 768 context) at 16x16 latents."""
    cfg = UNetConfig.sd15()
    torch.manual_seed(0)
    tm = diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    model = UNet2DConditionModel(cfg)
    params = state_dict_to_params({k: v.numpy() for k, v in tm.state_dict().items()},
                                  model.param_shapes(), what="unet")
    x, ctx = _inputs(cfg, 16, batch=1, seq=5)
    ref = _torch_out(tm, x, np.array([500]), ctx)
    del tm
    out = np.asarray(_run(model, params, x, np.array([500]), ctx))
    diff = float(np.abs(out - ref).max())
    print(f"SD 1.5 full width: max |diff| {diff:.2e} (output max {np.abs(ref).max():.2f})")
    assert diff < TOL, diff


# ----------------------------------------------------------------------------- I/O
def test_save_loads_in_diffusers(tmp_path):
    """diffusers -> sd-jax params -> sd_jax save -> diffusers from_pretrained: same model.
    (The parity tests show the sd-jax model computes what these parameters define.)"""
    cfg = UNetConfig.tiny(use_linear_projection=True, attention_head_dim=(2, 4, 4))
    tm = _torch_unet(cfg, seed=3)
    model = UNet2DConditionModel(cfg)
    params = state_dict_to_params({k: v.numpy() for k, v in tm.state_dict().items()},
                                  model.param_shapes(), what="unet")
    save(str(tmp_path / "unet"), cfg, params)
    again = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert UNetConfig.from_dict(dict(again.config)) == cfg
    x, ctx = _inputs(cfg, 16)
    t = np.array([3.0, 600.0])
    np.testing.assert_array_equal(_torch_out(again, x, t, ctx), _torch_out(tm, x, t, ctx))
    _, loaded = load(str(tmp_path / "unet"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_config_weights_mismatch(tmp_path):
    cfg = UNetConfig.tiny()
    _torch_unet(cfg).save_pretrained(tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "block_out_channels": [32, 64, 128]}))
    with pytest.raises(CheckpointError, match="unet weights do not match its config"):
        load(str(tmp_path / "unet"))
    path.write_text(json.dumps({**d, "layers_per_block": 2}))
    with pytest.raises(CheckpointError, match="missing"):
        load(str(tmp_path / "unet"))


# ----------------------------------------------------------------------------- bf16
def test_bfloat16_close_to_float32():
    """bf16 compute (bf16 parameters) against the float32 reference."""
    cfg = UNetConfig.tiny()
    tm = _torch_unet(cfg)
    x, ctx = _inputs(cfg, 32)
    t = np.array([10.0, 981.0], np.float32)
    ref = _torch_out(tm, x, t, ctx)
    model = UNet2DConditionModel(cfg, policy=Policy(jnp.bfloat16, param_dtype=jnp.bfloat16))
    params = state_dict_to_params({k: v.numpy() for k, v in tm.state_dict().items()},
                                  model.param_shapes(), what="unet")
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(params))
    out = _run(model, params, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out, np.float32)
    rel = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    print(f"bf16 vs f32 relative error {rel:.4f}, max |diff| {np.abs(out - ref).max():.3f}")
    assert rel < BF16_REL_TOL, rel


# ----------------------------------------------------------------------------- speed paths
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lq,lk,chunk", [(300, 300, 64), (256, 77, 1024), (64, 96, 16)])
def test_blocked_attention_matches_plain(lq, lk, chunk, dtype):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(3 * rng.standard_normal((2, n, 3, 8)), dtype) for n in (lq, lk, lk))
    ref = attn._xla(q, k, v, None, 8 ** -0.5).astype(jnp.float32)
    out = jax.jit(lambda q, k, v: attn._blocked(q, k, v, 8 ** -0.5, chunk))(q, k, v).astype(jnp.float32)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2     # logits here are large (|s| ~ 30)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)
    out = attn.dot_product_attention(q, k, v, impl="xla").astype(jnp.float32)   # CPU: blocked if large
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=tol, rtol=tol)


def test_auto_attention_uses_cudnn_only_where_cudnn_runs(monkeypatch):
    """On a GPU "auto" picks cuDNN for unmasked half-precision heads of 8..128 (multiple of 8),
    and XLA for float32, masks, and the VAE's single 512-wide head."""
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")
    assert attn._resolve("auto", jnp.bfloat16, 40, False) == "cudnn"       # SD 1.5 UNet heads
    assert attn._resolve("auto", jnp.float16, 64, False) == "cudnn"
    assert attn._resolve("auto", jnp.bfloat16, 512, False) == "xla"        # the VAE's mid-block
    assert attn._resolve("auto", jnp.bfloat16, 36, False) == "xla"
    assert attn._resolve("auto", jnp.bfloat16, 64, True) == "xla"
    assert attn._resolve("auto", jnp.float32, 64, False) == "xla"
    assert attn._resolve("cudnn", jnp.float32, 512, True) == "cudnn"       # asked for by name: as asked
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "cpu")
    assert attn._resolve("auto", jnp.bfloat16, 40, False) == "xla"


def test_plain_formulation_gives_model_flops_and_same_result():
    """Without CPU lowerings (``cpu_lowerings=False``, a Policy's field) the CPU's blocked
    attention is off: XLA's cost analysis sees both matmuls whole (the blocked loop's body
    counts once), and the result is the same."""
    b, lq, lk, h, d = 1, 2048, 2048, 2, 16        # 8M scores: blocked on the CPU
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((b, n, h, d)), jnp.float32) for n in (lq, lk, lk))
    want = 2 * 2 * b * h * lq * lk * d             # QK^T and PV
    out, flops = {}, {}
    for plain in (False, True):
        fn = jax.jit(lambda q, k, v: attn.dot_product_attention(q, k, v, impl="xla", cpu_lowerings=not plain))
        lowered = fn.lower(q, k, v)
        out[plain] = np.asarray(lowered.compile()(q, k, v))
        flops[plain] = lowered.cost_analysis()["flops"]
    assert want <= flops[True] <= 1.1 * want, (flops[True], want)
    assert flops[False] < 0.5 * want               # what the blocked program reports
    np.testing.assert_allclose(out[False], out[True], atol=1e-5, rtol=1e-5)


def _lax_conv(x, kernel, stride, pad):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("k,stride,pad", [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0)])
def test_im2col_conv_matches(k, stride, pad):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 16, 8)), jnp.float32)
    np.testing.assert_allclose(np.asarray(layers.conv_im2col(x, kernel, stride, pad)),
                               np.asarray(_lax_conv(x, kernel, stride, pad)), atol=1e-4)


def test_polyphase_upsample_matches():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 12)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 12, 8)), jnp.float32)
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_allclose(np.asarray(layers.upsample2x_conv3x3(x, kernel)),
                               np.asarray(_lax_conv(up, kernel, 1, 1)), atol=1e-4)


@pytest.mark.parametrize("hw", [(20, 12), (18, 26)])
def test_any_latent_size_matches_diffusers(hw):
    """Sizes that are not multiples of 2**(levels-1): odd levels upsample back to the skip's size."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet
    from sd_jax.weights.convert import state_dict_to_params
    cfg = UNetConfig.tiny()
    torch.manual_seed(0)
    tm = TorchUNet(**{k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}).eval()
    model = UNet2DConditionModel(cfg)
    params = state_dict_to_params({k: v.numpy() for k, v in tm.state_dict().items()}, model.param_shapes(), what="unet")
    x = np.random.RandomState(0).randn(1, *hw, 4).astype(np.float32)
    c = np.random.RandomState(1).randn(1, 5, cfg.cross_attention_dim).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2)), 500, torch.from_numpy(c)).sample.numpy().transpose(0, 2, 3, 1)
    out = model.apply({"params": params}, x, jnp.array([500]), c)
    assert out.shape == (1, *hw, 4)
    assert np.abs(np.asarray(out) - ref).max() < 1e-4
