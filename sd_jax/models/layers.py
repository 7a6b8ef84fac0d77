"""Building blocks shared by the UNet and the VAE (NHWC layout).

Parameter names mirror diffusers' ``ResnetBlock2D``, ``Downsample2D`` and
``Upsample2D`` so weights convert by the generic table in ``sd_jax.weights.convert``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(name, groups, eps, dtype, param_dtype):
    # flax.linen.GroupNorm owns `scale`/`bias` directly; wrapping it would add a level to
    # the parameter path, so the float32 upcast is done around a plain nn.GroupNorm instead.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32,
                        param_dtype=param_dtype, name=name)


def norm(layer: nn.GroupNorm, x, dtype):
    return layer(x.astype(jnp.float32)).astype(dtype)


def conv(features, name, dtype, param_dtype, kernel=3, stride=1, padding=1):
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)),
                   dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (default "default" time-embedding norm, SiLU)."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        """x: [B, H, W, C]; temb: [B, T] or None. Returns [B, H, W, out_channels]."""
        d, pd = self.dtype, self.param_dtype
        h = norm(group_norm("norm1", self.groups, self.eps, d, pd), x, d)
        h = conv(self.out_channels, "conv1", d, pd)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=d, param_dtype=pd, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = norm(group_norm("norm2", self.groups, self.eps, d, pd), h, d)
        h = conv(self.out_channels, "conv2", d, pd)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "conv_shortcut", d, pd, kernel=1, padding=0)(x)
        return ((x + h) / self.output_scale_factor).astype(d)


class Downsample2D(nn.Module):
    """Strided 3x3 conv. ``padding=0`` is the VAE encoder's form: pad right/bottom by one."""
    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, "conv", self.dtype, self.param_dtype, stride=2,
                    padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return conv(self.out_channels, "conv", self.dtype, self.param_dtype)(x)
