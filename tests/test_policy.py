"""The compute policy: one frozen, hashable field that every model module carries, which
never changes the parameter tree (the checkpoints and key tables depend on it)."""
from __future__ import annotations

import dataclasses
import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax import families
from sd_jax.models import attention, clip, embeddings, layers, unet, vae
from sd_jax.models.policy import Policy

# What used to be separate fields threaded through every level.
_OLD_FIELDS = {"dtype", "param_dtype", "attention", "conv_impl", "impl"}


def test_policy_is_frozen_hashable_and_canonical():
    a = Policy(jnp.bfloat16, attention="chunked")
    b = Policy("bfloat16", np.dtype(jnp.bfloat16), "chunked")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.param_dtype == jnp.bfloat16                # None: the compute dtype
    assert Policy(jnp.bfloat16, jnp.float32).param_dtype == jnp.float32
    assert Policy() == Policy(jnp.float32, jnp.float32, "xla", "auto", True)
    assert a.replace(cpu_lowerings=False) != a
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dtype = jnp.float32
    with pytest.raises(ValueError, match="unknown attention implementation 'sdpa'"):
        Policy(attention="sdpa")
    assert Policy(attention="flash").attention == "flash"   # JAX's TPU flash attention (sd_jax.models.attention)
    with pytest.raises(ValueError, match="unknown conv_impl 'fft'"):
        Policy(conv_impl="fft")


def _module_classes():
    for mod in (attention, clip, embeddings, layers, unet, vae):
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, nn.Module) and cls.__module__ == mod.__name__:
                yield cls


def test_policy_is_the_one_field_modules_carry():
    classes = list(_module_classes())
    assert {"UNet2DConditionModel", "AutoencoderKL", "CLIPTextModel", "Conv2D", "Attention"} <= \
        {c.__name__ for c in classes}
    for cls in classes:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert not _OLD_FIELDS & set(fields), (cls.__name__, _OLD_FIELDS & set(fields))
        assert "policy" in fields, cls.__name__
        assert fields["policy"].default == Policy(), cls.__name__
    # The top-level models read their dtype etc. through to the policy (pipeline, memory, training).
    m = unet.UNet2DConditionModel(unet.UNetConfig.tiny(), policy=Policy(jnp.bfloat16, attention="chunked"))
    assert (m.dtype, m.param_dtype, m.attention) == (jnp.bfloat16, jnp.bfloat16, "chunked")
    hash(m)                                                   # usable as a jit static


def test_loader_builds_models_with_the_policy():
    """A float16 policy computes the VAE in float32 (it overflows), parameters as asked."""
    cfgs = families.TINY.configs("test")
    p = Policy(jnp.float16, attention="chunked", cpu_lowerings=False)
    models = families.build_models(families.TINY, cfgs, policy=p)
    assert models.unet.policy == p and models.text_encoder.policy == p
    assert models.vae.policy == p.replace(dtype=jnp.float32)
    assert models.vae.param_dtype == jnp.float16
    old = families.build_models(families.TINY, cfgs, dtype=jnp.float16, attention="chunked")
    assert old.unet.policy == p.replace(cpu_lowerings=True)


def test_cpu_lowerings_change_the_program_not_the_parameters_or_the_result():
    """At 32x32 latents the tiny UNet's CPU lowerings all apply (blocked attention, im2col at
    16x16 and 8x8, polyphase upsampling from 16x16); without them it is the plain program."""
    cfg = unet.UNetConfig.tiny()
    fast = unet.UNet2DConditionModel(cfg, policy=Policy())
    plain = unet.UNet2DConditionModel(cfg, policy=Policy(cpu_lowerings=False))
    shapes = lambda m: jax.tree.map(lambda s: (s.shape, s.dtype), m.param_shapes())  # noqa: E731
    assert jax.tree_util.tree_structure(fast.param_shapes()) == jax.tree_util.tree_structure(plain.param_shapes())
    assert shapes(fast) == shapes(plain)

    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                          fast.param_shapes())
    x = jnp.asarray(rng.standard_normal((1, 32, 32, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((1, 7, cfg.cross_attention_dim)), jnp.float32)
    t = jnp.array([500.0])
    out, text = {}, {}
    for name, m in (("fast", fast), ("plain", plain)):
        lowered = jax.jit(m.apply).lower({"params": params}, x, t, ctx)
        text[name] = lowered.as_text()
        out[name] = np.asarray(lowered.compile()({"params": params}, x, t, ctx))
    if jax.default_backend() == "cpu":
        assert text["fast"] != text["plain"]
    else:                                                      # the lowerings are CPU-only
        assert text["fast"] == text["plain"]
    np.testing.assert_allclose(out["fast"], out["plain"], atol=1e-4, rtol=1e-4)
