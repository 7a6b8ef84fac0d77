"""The Pallas flash-attention kernel (sd_jax.models.pallas_attention), in Pallas interpret mode
on the CPU, against the plain formulation (einsum, float32 softmax, einsum).

Small shapes that still pad the head size (40 -> 128, 64 -> 128, 160 -> 256), pad the keys to
a block with masking (77 -> 128, 200 -> 256), pad the queries, and run several query and key
blocks.  Every real SD 1.x / 2.x / SDXL shape is checked by benchmarks/check_pallas_attention.py
(slow in interpret mode); here the kernel is lowered for TPU (Mosaic) at real shapes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.models import attention, pallas_attention
from sd_jax.models.pallas_attention import flash_attention

# (Lq, Lk, D, block_q, block_k)
SHAPES = [
    (200, 200, 40, 64, 128),    # SD1.5 head; 4 query blocks (last padded), 2 key blocks (last masked)
    (200, 77, 64, 64, 128),     # cross-attention on 77 text tokens: one masked key block
    (96, 256, 160, 512, 512),   # SD1.5's deepest head (160 -> 256); default blocks, shrunk, no mask
]


def _qkv(lq, lk, d, b=2, h=3, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, h, d), np.float32)
    k = 2.0 * rng.standard_normal((b, lk, h, d), np.float32)   # peaked softmax: the max matters
    v = rng.standard_normal((b, lk, h, d), np.float32)
    return q, k, v


def _run(fn, *args):
    """``jax.jit(fn)(*args)`` compiled at LLVM -O0: interpret-mode kernels compile in half the
    time (same arithmetic: no fast-math either way)."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _plain(q, k, v):
    """softmax(q k^T / sqrt(D)) v per head, in float64 (numpy)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("lq,lk,d,bq,bk", SHAPES)
def test_flash_equals_plain_fp32(lq, lk, d, bq, bk):
    """float32: max |pallas - plain| <= 1e-5."""
    q, k, v = _qkv(lq, lk, d)
    out = _run(lambda q, k, v: flash_attention(q, k, v, block_q=bq, block_k=bk, interpret=True), q, k, v)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _plain(q, k, v), atol=1e-5, rtol=0)


def test_flash_bf16_within_stated_tolerance():
    """bfloat16 inputs (scores and softmax in float32, p rounded to bf16 for the second
    matmul, as the plain path does): max abs error against the float32 result <= 3e-2 for
    unit-normal values, no more than 1.5x the plain bf16 path's own error."""
    q, k, v = _qkv(200, 77, 40)
    ref = _plain(q, k, v)
    qb, kb, vb = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    out = _run(lambda q, k, v: flash_attention(q, k, v, block_q=64, block_k=128, interpret=True), qb, kb, vb)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref).max()
    plain = jax.jit(lambda *a: attention.dot_product_attention(*a, impl="xla", cpu_lowerings=False))(qb, kb, vb)
    plain_err = np.abs(np.asarray(plain, np.float32) - ref).max()
    assert err <= 3e-2 and err <= 1.5 * plain_err, (err, plain_err)


def test_block_sizes_are_tpu_shaped():
    assert pallas_attention.block_sizes(77, 77) == (80, 128)
    assert pallas_attention.block_sizes(4096, 77) == (512, 128)
    assert pallas_attention.block_sizes(4096, 4096) == (512, 512)
    with pytest.raises(ValueError, match="block_k of 128"):
        pallas_attention.block_sizes(64, 64, block_k=100)


def test_selected_by_name_and_by_default_on_tpu(monkeypatch):
    """impl="pallas" runs the kernel (interpret mode off TPU); masked/causal attention goes to
    XLA; "auto" picks the kernel on TPU for unmasked attention only."""
    q, k, v = _qkv(40, 77, 40, b=1, h=2)
    np.testing.assert_allclose(np.asarray(attention.dot_product_attention(q, k, v, impl="pallas")),
                               _plain(q, k, v), atol=1e-5)

    def prims(impl, **kw):
        return str(jax.make_jaxpr(lambda *a: attention.dot_product_attention(*a, impl=impl, **kw))(q, k, v))

    assert "pallas_call" in prims("pallas") and "pallas_call" not in prims("xla")
    assert "pallas_call" not in prims("pallas", causal=True)
    assert "pallas_call" not in prims("pallas", mask=np.ones((1, 1, 40, 77), bool))
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention._resolve("auto", jnp.bfloat16, 40, masked=False) == "pallas"
    assert attention._resolve("auto", jnp.bfloat16, 40, masked=True) == "xla"
    assert attention._resolve("auto", jnp.bfloat16, 40, masked=False, causal=True) == "xla"
    from sd_jax.models.vae import _attention_impl
    assert _attention_impl("auto", 512) == "auto"       # the VAE's 512-wide head: the kernel on TPU


@pytest.mark.parametrize("lq,lk,d", [(4096, 4096, 40), (4096, 77, 40), (256, 77, 160),
                                     (1024, 1024, 64), (4096, 4096, 512)])
def test_lowers_for_tpu_at_real_shapes(lq, lk, d):
    """The Pallas -> Mosaic lowering (block shapes TPUs accept, VMEM scratch) at SD 1.5's
    512 px self- and cross-attention, SD 2/SDXL's head 64 and the VAE's one 512-wide head."""
    q = jax.ShapeDtypeStruct((2, lq, 2, d), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, lk, 2, d), jnp.bfloat16)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, interpret=False))
    text = fn.trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_unet_with_pallas_attention_equals_plain():
    """A tiny UNet (self-attention at 8x8 and 2x2 latents, 7 context tokens, head 8 -> 128)
    with Policy(attention="pallas") in interpret mode equals Policy(attention="xla")."""
    from sd_jax.models import unet
    from sd_jax.models.policy import Policy
    # Attention in the first down block, the mid block and the last up block only (compile time).
    cfg = unet.UNetConfig.tiny(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
    plain = unet.UNet2DConditionModel(cfg, policy=Policy(attention="xla", cpu_lowerings=False))
    flash = unet.UNet2DConditionModel(cfg, policy=Policy(attention="pallas"))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                          plain.param_shapes())
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 7, cfg.cross_attention_dim)), jnp.float32)
    t = jnp.array([500.0])
    jaxpr = str(jax.make_jaxpr(flash.apply)({"params": params}, x, t, ctx))
    assert jaxpr.count("name=_flash_attention") == 8       # 4 transformer blocks x (self, cross)
    out = _run(flash.apply, {"params": params}, x, t, ctx)
    ref = _run(plain.apply, {"params": params}, x, t, ctx)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lq,lk,d", [(64, 77, 40), (256, 256, 160)])
def test_training_kernels_gradients_equal_plain(lq, lk, d):
    """Training on TPU: ``"flash"`` (JAX's Pallas TPU flash attention, forward + dq/dkv kernels,
    here padded 40 -> 40, 160 -> 256 and 77 keys -> 128 with segment-id masking) and ``"pallas"``
    (sd-jax's kernel, whose backward is flash's) give the plain formulation's output and
    gradients (fp32, TPU interpret mode) within 1e-5."""
    from jax.experimental.pallas import tpu as pltpu
    q, k, v = (jnp.asarray(x) for x in _qkv(lq, lk, d, h=2))
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, impl=impl, cpu_lowerings=False) * w)
    ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    ref_out = _plain(q, k, v)
    for impl in ("flash", "pallas"):
        with pltpu.force_tpu_interpret_mode():
            out = _run(lambda q, k, v: attention.dot_product_attention(q, k, v, impl=impl), q, k, v)
            grads = _run(jax.grad(loss(impl), argnums=(0, 1, 2)), q, k, v)
        np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5, err_msg=impl)
        for name, g, r in zip("qkv", grads, ref):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5, err_msg=f"{impl} d{name}")


def test_kernels_are_mapped_over_the_mesh():
    """A Mosaic kernel inside a multi-device jit must be mapped over the devices (XLA refuses to
    partition it: "Mosaic kernels cannot be automatically partitioned", found compiling for an
    8-chip TPU v5e with benchmarks/tpu_aot.py).  Traced for an 8-device mesh (what the pipelines
    and the trainer do), the kernel runs under shard_map on each device's rows, with the same
    result; traced without one, it is called directly."""
    from sd_jax import sharding
    mesh = sharding.make_mesh()
    assert mesh.size == 8
    q, k, v = (jnp.asarray(x) for x in _qkv(64, 77, 40, b=8, h=2))
    spec = sharding.batch_sharded(mesh)

    def fn():   # a new jit per context, as the pipelines make (a jit's trace cache does not see the context)
        return jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, impl="pallas"),
                       in_shardings=(spec,) * 3)
    assert "shard_map" not in str(jax.make_jaxpr(fn())(q, k, v))
    with sharding.tracing_for(mesh):
        assert sharding.trace_mesh() is mesh and sharding.target_platform() == "cpu"
        assert "shard_map" in str(jax.make_jaxpr(fn())(q, k, v))
        out = fn()(q, k, v)
    assert out.sharding.is_equivalent_to(spec, out.ndim)
    np.testing.assert_allclose(np.asarray(out), _plain(q, k, v), atol=1e-5, rtol=1e-5)
    # A batch that does not divide over the mesh: every device computes all of it (same result).
    q3, k3, v3 = q[:3], k[:3], v[:3]
    with sharding.tracing_for(mesh):
        out3 = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, impl="pallas"))(q3, k3, v3)
    np.testing.assert_allclose(np.asarray(out3), _plain(q3, k3, v3), atol=1e-5, rtol=1e-5)
