"""Timestep embeddings (diffusers ``get_timestep_embedding`` / ``TimestepEmbedding``).

The sinusoidal embedding is always computed in float32: timesteps go up to 1000 and
their products with the frequencies lose whole periods in bfloat16.
"""
from __future__ import annotations

import math
import flax.linen as nn
import jax.numpy as jnp

from sd_jax.models.policy import Policy


def get_timestep_embedding(timesteps, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1.0, scale: float = 1.0,
                           max_period: int = 10000):
    """Sinusoidal embedding of ``timesteps`` ([B], int or float) -> [B, embedding_dim] float32.

    Matches diffusers' ``get_timestep_embedding`` op for op (same float32 rounding).
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D array, got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = jnp.exp(exponent)
    emb = timesteps.astype(jnp.float32)[:, None] * emb[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def get_guidance_scale_embedding(w, embedding_dim: int = 512):
    """LCM's guidance embedding (diffusers' ``get_guidance_scale_embedding``, Luo et al. 2023 after
    Meng et al. 2023): ``w`` [B] (the pipeline passes ``guidance_scale - 1``) -> [B, embedding_dim]
    float32, ``[sin(1000 w f), cos(1000 w f)]`` with ``f_k = 10000^(-k / (half - 1))``."""
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 1:
        raise ValueError(f"w must be a 1-D array, got shape {w.shape}")
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = jnp.log(jnp.float32(10000.0)) / (half_dim - 1)
    emb = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -emb)
    emb = w[:, None] * emb[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: ``linear_1`` -> SiLU -> ``linear_2``.

    ``cond_proj_dim`` (LCM-distilled UNets' ``time_cond_proj_dim``): ``condition`` [B, cond_proj_dim]
    goes through ``cond_proj`` (no bias) and is added to ``x`` before ``linear_1``; None projects
    zeros, i.e. adds nothing, as diffusers without a condition."""
    time_embed_dim: int
    policy: Policy = Policy()
    cond_proj_dim: int | None = None

    @nn.compact
    def __call__(self, x, condition=None):
        d, pd = self.policy.dtype, self.policy.param_dtype
        if self.cond_proj_dim:
            if condition is None:
                condition = jnp.zeros((x.shape[0], self.cond_proj_dim), d)
            x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=d, param_dtype=pd, name="cond_proj")(
                condition.astype(d))
        x = nn.Dense(self.time_embed_dim, dtype=d, param_dtype=pd, name="linear_1")(x.astype(d))
        x = nn.silu(x)
        return nn.Dense(self.time_embed_dim, dtype=d, param_dtype=pd, name="linear_2")(x)
