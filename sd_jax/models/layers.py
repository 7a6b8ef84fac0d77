"""Building blocks shared by the UNet and the VAE (NHWC layout).

Parameter names mirror diffusers' ``ResnetBlock2D``, ``Downsample2D`` and
``Upsample2D`` so weights convert by the generic table in ``sd_jax.weights.convert``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.policy import Policy


def group_norm(name, groups, eps, param_dtype):
    # flax.linen.GroupNorm owns `scale`/`bias` directly; wrapping it would add a level to
    # the parameter path, so the float32 upcast is done around a plain nn.GroupNorm instead
    # (by :func:`norm`, which also casts back to the compute dtype).
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32,
                        param_dtype=param_dtype, name=name)


def norm(layer: nn.GroupNorm, x, dtype):
    return layer(x.astype(jnp.float32)).astype(dtype)


def conv(features, name, policy: Policy, kernel=3, stride=1, padding=1):
    """``nn.Conv`` (XLA's convolution whatever the policy's ``conv_impl``)."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((padding, padding), (padding, padding)),
                   dtype=policy.dtype, param_dtype=policy.param_dtype, name=name)


# --------------------------------------------------------------------------------------
# Convolutions with a choice of lowering (added for the UNet's speed on CPU).
#
# XLA:CPU's convolution kernel is slow when the image is small and the channels many
# (SD's 16x16 and 8x8 levels with 1280 channels: ~45 GFLOP/s on an AVX-512 Xeon, against
# ~100 for the same FLOPs as one matmul).  There an explicit im2col -- the k*k shifted
# views concatenated along channels, then a single [B*H*W, k*k*C] x [k*k*C, O] matmul --
# is 1.4-2.3x faster; on large images the patches cost more memory traffic than they save.
# The parameters are nn.Conv's (`kernel` [kh, kw, in, out], `bias`), so checkpoints and
# the weight converter are unaffected.

IM2COL_MAX_PIXELS = 256        # "auto": im2col on CPU when the output has <= this many pixels


def conv_im2col(x, kernel, stride: int = 1, padding: int = 1):
    """NHWC convolution as one matmul over explicit patches; ``kernel`` is [kh, kw, in, out]."""
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - kh) // stride + 1
    wo = (w + 2 * padding - kw) // stride + 1
    # The patches [B, Ho, Wo, kh, kw, C] (tap-major, as the kernel's rows) from kh row-shifted,
    # then kw column-shifted views, stacked: XLA:CPU fuses this into one loop kernel, where kh*kw
    # shifted slices concatenated along channels compiled to kh*kw kernels and a copy.  The same
    # matrix, so the same result bit for bit, in a third of the compile time and no slower
    # (benchmarks/README.md, "Compile time").
    rows = jnp.stack([x[:, i:i + stride * (ho - 1) + 1:stride] for i in range(kh)], axis=2)         # [B, Ho, kh, W, C]
    cols = jnp.stack([rows[:, :, :, j:j + stride * (wo - 1) + 1:stride] for j in range(kw)], axis=4)  # [B, Ho, kh, Wo, kw, C]
    cols = cols.transpose(0, 1, 3, 2, 4, 5)
    y = jnp.dot(cols.reshape(b * ho * wo, kh * kw * cin), kernel.reshape(kh * kw * cin, cout))
    return y.reshape(b, ho, wo, cout)


class Conv2D(nn.Module):
    """``nn.Conv`` (square kernel, symmetric padding, NHWC) with the same parameters, whose
    lowering is the policy's ``conv_impl``: ``"lax"`` (``lax.conv_general_dilated``),
    ``"im2col"``, or ``"auto"`` (im2col on CPU for small outputs, see ``IM2COL_MAX_PIXELS``)."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, upsample: bool = False):
        """``upsample=True``: the convolution of the 2x nearest-upsampled ``x``, computed by
        :func:`upsample2x_conv3x3` (3x3, stride 1, padding 1 only)."""
        k = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (k, k, x.shape[-1], self.features), self.policy.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.policy.param_dtype)
        d = self.policy.dtype
        x, kernel, bias = x.astype(d), kernel.astype(d), bias.astype(d)
        if upsample:
            if (k, self.stride, self.padding) != (3, 1, 1):
                raise ValueError("Conv2D(upsample=True) needs a 3x3 kernel, stride 1, padding 1")
            return upsample2x_conv3x3(x, kernel) + bias
        impl = self.policy.conv_impl
        if impl == "auto":
            ho = (x.shape[1] + 2 * self.padding - k) // self.stride + 1
            wo = (x.shape[2] + 2 * self.padding - k) // self.stride + 1
            small = ho * wo <= IM2COL_MAX_PIXELS and k > 1
            impl = "im2col" if small and self.policy.cpu_specific() else "lax"
        if impl == "im2col" or k == 1:
            y = conv_im2col(x, kernel, self.stride, self.padding)
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((p, p), (p, p)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def conv2d(features, name, policy: Policy, kernel=3, stride=1, padding=1):
    """Like :func:`conv`, through :class:`Conv2D` (lowered as the policy says)."""
    return Conv2D(features, kernel, stride, padding, policy, name=name)


# --------------------------------------------------------------------------------------
# The UNet's and VAE's blocks.  Their convolutions are :class:`Conv2D` (``nn.Conv``'s
# parameters), so the policy's ``conv_impl`` picks a lowering without touching checkpoints.

class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (default "default" time-embedding norm, SiLU)."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, temb=None):
        """x: [B, H, W, C]; temb: [B, T] or None. Returns [B, H, W, out_channels]."""
        p = self.policy
        d, pd = p.dtype, p.param_dtype
        h = norm(group_norm("norm1", self.groups, self.eps, pd), x, d)
        h = conv2d(self.out_channels, "conv1", p)(nn.silu(h))
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=d, param_dtype=pd, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = norm(group_norm("norm2", self.groups, self.eps, pd), h, d)
        h = conv2d(self.out_channels, "conv2", p)(nn.silu(h))
        if x.shape[-1] != self.out_channels:
            x = conv2d(self.out_channels, "conv_shortcut", p, kernel=1, padding=0)(x)
        return ((x + h) / self.output_scale_factor).astype(d)


class Downsample2D(nn.Module):
    """Strided 3x3 conv. ``padding=0`` is the VAE encoder's form: pad right/bottom by one."""
    out_channels: int
    padding: int = 1
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv2d(self.out_channels, "conv", self.policy, stride=2, padding=self.padding)(x)


POLYPHASE_MIN_PIXELS = 256     # "auto": polyphase upsampling on CPU from this input size


def upsample2x_conv3x3(x, kernel):
    """``conv3x3(nearest_upsample_2x(x))`` (padding 1, no bias) without the 4x larger
    input: each of the four output phases is a 2x2 convolution of ``x`` with summed
    taps (rows of the phase-0 kernel: ``k[0]``, ``k[1] + k[2]``; phase 1: ``k[0] + k[1]``,
    ``k[2]``; columns likewise), 16 instead of 36 multiply-adds per input pixel."""
    b, h, w, _ = x.shape
    rows = (jnp.stack([kernel[0], kernel[1] + kernel[2]]), jnp.stack([kernel[0] + kernel[1], kernel[2]]))
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    outs = []
    for p in (0, 1):
        r = rows[p]
        for k2 in (jnp.stack([r[:, 0], r[:, 1] + r[:, 2]], 1), jnp.stack([r[:, 0] + r[:, 1], r[:, 2]], 1)):
            q = len(outs) % 2
            outs.append(conv_im2col(xp[:, p:p + h + 1, q:q + w + 1], k2, 1, 0))
    y = jnp.stack(outs).reshape(2, 2, b, h, w, -1).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(b, 2 * h, 2 * w, -1)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv; with the policy's
    ``conv_impl="auto"`` on CPU and inputs of at least ``POLYPHASE_MIN_PIXELS`` pixels,
    computed as :func:`upsample2x_conv3x3` (2.25x fewer FLOPs)."""
    out_channels: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, size=None):
        """``size``: the (H, W) to upsample to when it is not exactly twice the input's (an
        odd-sized skip connection, as diffusers' ``upsample_size``): nearest-neighbour then."""
        b, h, w, c = x.shape
        conv_layer = conv2d(self.out_channels, "conv", self.policy)
        if size is not None and tuple(size) != (2 * h, 2 * w):
            # torch's "nearest": source index floor(dst * in / out)
            rows = (np.arange(size[0]) * h) // size[0]
            cols = (np.arange(size[1]) * w) // size[1]
            return conv_layer(x[:, rows][:, :, cols])
        if (self.policy.conv_impl == "auto" and h * w >= POLYPHASE_MIN_PIXELS
                and self.policy.cpu_specific()):
            return conv_layer(x, upsample=True)
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return conv_layer(x)
