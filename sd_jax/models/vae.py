"""AutoencoderKL: the Stable Diffusion VAE (diffusers ``AutoencoderKL``), NHWC.

Parameter paths mirror diffusers' state-dict keys (``encoder/down_blocks_0/resnets_1/conv1``,
``decoder/mid_block/attentions_0/to_q``, ``quant_conv`` ...), so weights convert with the
generic table of :mod:`sd_jax.weights.convert`.

Latent scaling is *not* applied inside the model: :meth:`AutoencoderKL.encode` returns the
raw posterior (mean, logvar) and :meth:`AutoencoderKL.decode` takes raw latents.  The
diffusion model works on ``(z - shift_factor) * scaling_factor``; convert with
:meth:`VAEConfig.scale_latents` / :meth:`VAEConfig.unscale_latents` (the pipeline's job)::

    mean, logvar = model.apply(params, images, method=AutoencoderKL.encode)
    z = cfg.scale_latents(sample_latent(mean, logvar, key))      # -> UNet space
    images = model.apply(params, cfg.unscale_latents(z), method=AutoencoderKL.decode)

Images are ``[B, H, W, 3]`` in ``[-1, 1]``; latents ``[B, H/f, W/f, latent_channels]`` with
``f = 2 ** (len(block_out_channels) - 1)`` (8 for SD).  Both outputs are float32 whatever the
compute dtype (they are small, and callers post-process them in float32).
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax import sharding
from sd_jax.models.attention import dot_product_attention
from sd_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm, norm
from sd_jax.models.policy import Policy, PolicyReads
from sd_jax.weights.convert import params_to_state_dict, state_dict_to_params
from sd_jax.weights.diffusers import read_config, read_state_dict, write_component
from sd_jax.weights.safetensors_io import CheckpointError

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"
EPS = 1e-6  # every GroupNorm in the diffusers VAE uses eps=1e-6
# The blocks' convolutions under conv_impl="auto": XLA's own.  The CPU lowerings of the
# shared blocks (patch matmuls, polyphase upsampling) were made for the UNet's small grids;
# in the VAE decoder at 512 px they were not faster (bench_vae.py: 10.9-13.5 s against 12.0-12.4 s per decode, within the noise).
CONV_IMPL = "lax"


def _tuple(x):
    return tuple(x) if isinstance(x, (list, tuple)) else x


@dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``vae/config.json`` that define an ``AutoencoderKL``.

    Defaults are diffusers' constructor defaults, so a sparse config.json means the same
    model here as in diffusers.
    """
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    mid_block_add_attention: bool = True
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: Any = 32  # int, or (h, w) as some configs store it

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """From a diffusers config dict; unknown keys (``_class_name``, ...) are ignored.

        Raises ValueError for an AutoencoderKL variant this module does not implement.
        """
        n = len(d.get("block_out_channels", cls.block_out_channels))
        for key, want in (("down_block_types", _DOWN), ("up_block_types", _UP)):
            types = d.get(key)
            if types is not None and (len(types) != n or any(t != want for t in types)):
                raise ValueError(
                    f"unsupported VAE config: {key}={list(types)}; only {n} x {want!r} "
                    f"(one per block_out_channels entry) is implemented")
        if d.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported VAE config: act_fn={d['act_fn']!r}; only 'silu' is implemented")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: _tuple(v) for k, v in d.items() if k in names}
        cfg = cls(**kw)
        for c in cfg.block_out_channels:
            if c % cfg.norm_num_groups:
                raise ValueError(f"unsupported VAE config: block_out_channels={list(cfg.block_out_channels)} "
                                 f"not divisible by norm_num_groups={cfg.norm_num_groups}")
        return cfg

    def to_dict(self) -> dict:
        """A diffusers-compatible ``config.json`` dict (``AutoencoderKL.from_config`` accepts it)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        n = len(self.block_out_channels)
        d.update(_class_name="AutoencoderKL", act_fn="silu",
                 down_block_types=[_DOWN] * n, up_block_types=[_UP] * n)
        return d

    def scale_latents(self, z):
        """Raw VAE latents -> the diffusion model's latent space."""
        return (z - (self.shift_factor or 0.0)) * self.scaling_factor

    def unscale_latents(self, z):
        """The diffusion model's latent space -> raw VAE latents (what :meth:`AutoencoderKL.decode` takes)."""
        return z / self.scaling_factor + (self.shift_factor or 0.0)

    @classmethod
    def sd15(cls) -> "VAEConfig":
        """The VAE of Stable Diffusion 1.x / 2.x."""
        return cls(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                   latent_channels=4, scaling_factor=0.18215, sample_size=512)

    @classmethod
    def sdxl(cls) -> "VAEConfig":
        """The VAE of SDXL (same architecture as SD 1.x, other weights and scaling factor)."""
        return dataclasses.replace(cls.sd15(), scaling_factor=0.13025, sample_size=1024)

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """A ~0.5M-parameter VAE for tests (downscale factor 2)."""
        return cls(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                   latent_channels=4, sample_size=32)


def sample_latent(mean, logvar, key):
    """A draw from the diagonal Gaussian posterior: ``mean + exp(logvar / 2) * eps`` (float32)."""
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * eps


def kl_divergence(mean, logvar):
    """KL(posterior || N(0, I)) per example, summed over latent dims (diffusers' ``kl()``)."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def _attention_impl(impl: str, head_dim: int) -> str:
    # The VAE attends with one head of dim = channels (512 for SD); cuDNN's fused kernel takes
    # head dims <= 128 (256 on Hopper), so "auto"/"cudnn" fall back to XLA here (on TPU "auto"
    # stays: the Pallas kernel takes any head size).
    tpu_auto = impl == "auto" and sharding.target_platform() == "tpu"
    if impl in ("auto", "cudnn") and head_dim > 128 and not tpu_auto:
        return "xla"
    return impl


class VAEAttention(nn.Module):
    """diffusers ``Attention`` as the VAE mid block uses it: GroupNorm, one head, residual."""
    groups: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        p = self.policy
        d, pd = p.dtype, p.param_dtype
        b, h, w, c = x.shape
        y = norm(group_norm("group_norm", self.groups, EPS, pd), x, d).reshape(b, h * w, 1, c)

        def dense(name):
            return nn.Dense(c, dtype=d, param_dtype=pd, name=name)

        q, k, v = dense("to_q")(y), dense("to_k")(y), dense("to_v")(y)
        o = dot_product_attention(q, k, v, impl=_attention_impl(p.attention, c),
                                  cpu_lowerings=p.cpu_lowerings)
        o = dense("to_out_0")(o.reshape(b, h * w, c))
        return (o.reshape(b, h, w, c) + x).astype(d)


class VAEMidBlock(nn.Module):
    """diffusers ``UNetMidBlock2D`` without time embedding: resnet, [attention], resnet."""
    channels: int
    groups: int
    add_attention: bool = True
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        kw = dict(groups=self.groups, eps=EPS, policy=self.policy)
        x = ResnetBlock2D(self.channels, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = VAEAttention(self.groups, policy=self.policy, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
    """``layers`` resnets, then (unless last) the encoder's asymmetric-pad strided conv."""
    channels: int
    layers: int
    groups: int
    add_downsample: bool
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        p = self.policy
        for j in range(self.layers):
            x = ResnetBlock2D(self.channels, groups=self.groups, eps=EPS, policy=p, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.channels, padding=0, policy=p, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``layers`` resnets (the decoder has layers_per_block + 1), then (unless last) 2x upsampling."""
    channels: int
    layers: int
    groups: int
    add_upsample: bool
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        p = self.policy
        for j in range(self.layers):
            x = ResnetBlock2D(self.channels, groups=self.groups, eps=EPS, policy=p, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.channels, policy=p, name="upsamplers_0")(x)
        return x


def _blocks_policy(policy: Policy) -> Policy:
    """The policy of the VAE's blocks: ``conv_impl="auto"`` means XLA's own convolutions here
    (see :data:`CONV_IMPL`); a lowering asked for by name is used as asked."""
    return policy.replace(conv_impl=CONV_IMPL) if policy.conv_impl == "auto" else policy


class Encoder(nn.Module):
    """images [B, H, W, in] -> posterior moments [B, H/f, W/f, 2 * latent] (before quant_conv)."""
    config: VAEConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        cfg, p = self.config, _blocks_policy(self.policy)
        chans, g = cfg.block_out_channels, cfg.norm_num_groups
        x = conv(chans[0], "conv_in", p)(x.astype(p.dtype))
        for i, ch in enumerate(chans):
            x = DownEncoderBlock2D(ch, cfg.layers_per_block, g, i < len(chans) - 1, policy=p,
                                   name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(chans[-1], g, cfg.mid_block_add_attention, policy=p, name="mid_block")(x)
        x = nn.silu(norm(group_norm("conv_norm_out", g, EPS, p.param_dtype), x, p.dtype))
        return conv(2 * cfg.latent_channels, "conv_out", p)(x)


class Decoder(nn.Module):
    """latents [B, h, w, latent] (after post_quant_conv) -> images [B, h*f, w*f, out]."""
    config: VAEConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, z):
        cfg, p = self.config, _blocks_policy(self.policy)
        chans, g = cfg.block_out_channels[::-1], cfg.norm_num_groups
        x = conv(chans[0], "conv_in", p)(z.astype(p.dtype))
        x = VAEMidBlock(chans[0], g, cfg.mid_block_add_attention, policy=p, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = UpDecoderBlock2D(ch, cfg.layers_per_block + 1, g, i < len(chans) - 1, policy=p,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(norm(group_norm("conv_norm_out", g, EPS, p.param_dtype), x, p.dtype))
        return conv(cfg.out_channels, "conv_out", p)(x)


class AutoencoderKL(PolicyReads, nn.Module):
    """diffusers ``AutoencoderKL``.  Use the methods through ``apply``::

        mean, logvar = model.apply(params, images, method=AutoencoderKL.encode)
        images = model.apply(params, latents, method=AutoencoderKL.decode)

    ``encode``/``decode`` neither scale nor shift latents (see :meth:`VAEConfig.scale_latents`).
    ``policy`` (:class:`sd_jax.models.policy.Policy`): how it computes; its attention
    "auto"/"cudnn" fall back to "xla" for this model's single wide head (512 channels for
    SD).  ``dtype``, ``param_dtype`` and ``attention`` read through to the policy.
    """
    config: VAEConfig
    policy: Policy = Policy()

    def setup(self):
        cfg, p = self.config, self.policy
        self.encoder = Encoder(cfg, p)
        self.decoder = Decoder(cfg, p)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv(2 * cfg.latent_channels, (1, 1), dtype=p.dtype, param_dtype=p.param_dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(cfg.latent_channels, (1, 1), dtype=p.dtype, param_dtype=p.param_dtype)

    def encode(self, images):
        """images [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent_channels],
        float32, raw (unscaled); logvar clipped to [-30, 20] as in diffusers."""
        h = self.encoder(images)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents):
        """Raw (unscaled) latents [B, h, w, latent_channels] -> images [B, h*f, w*f, out_channels],
        float32, nominally in [-1, 1] (not clipped)."""
        z = latents.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images, key=None):
        """Reconstruction: encode, take the posterior mode (or a sample when ``key`` is given), decode."""
        mean, logvar = self.encode(images)
        z = mean if key is None else sample_latent(mean, logvar, key)
        return self.decode(z)


# --------------------------------------------------------------------------- checkpoints

# Old diffusers attention-block names (before diffusers 0.14), still in many SD 1.x repos and
# converted single-file checkpoints: query/key/value/proj_attn (sometimes 1x1-conv shaped).
_OLD_ATTN = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_NEW_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def canonical_key(key: str) -> str:
    """Map an old attention key (``...attentions.0.query.weight``) to the current one (``...to_q.weight``)."""
    m = _OLD_ATTN.match(key)
    return f"{m.group(1)}{_NEW_NAMES[m.group(2)]}.{m.group(3)}" if m else key


def param_shapes(model: AutoencoderKL):
    """The model's parameter tree as ``jax.ShapeDtypeStruct`` (nothing is computed)."""
    size = 2 * model.config.downscale_factor
    x = jax.ShapeDtypeStruct((1, size, size, model.config.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]


def load(folder: str, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla",
         policy: Optional[Policy] = None, variant: Optional[str] = None, allow_pickle: bool = False):
    """A diffusers ``vae/`` folder -> ``(model, params)`` (use as ``model.apply({"params": params}, ...)``).

    The model computes as ``policy`` says, or when it is None, as
    ``Policy(dtype, param_dtype, attention)`` (``param_dtype`` defaults to ``dtype``).
    Old attention key names are accepted.
    Raises CheckpointError when config.json describes an unsupported VAE or the weights do
    not match it.
    """
    try:
        config = VAEConfig.from_dict(read_config(folder))
    except CheckpointError:
        raise
    except ValueError as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from None
    policy = policy or Policy(dtype, param_dtype, attention)
    if policy.dtype == jnp.float16 and config.force_upcast:
        warnings.warn("this VAE's config sets force_upcast: its activations overflow float16; "
                      "use dtype=jnp.bfloat16 or jnp.float32", stacklevel=2)
    model = AutoencoderKL(config, policy=policy)
    sd = read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    params = state_dict_to_params(sd, param_shapes(model), what="vae", rename=canonical_key,
                                  dtype=policy.param_dtype)
    return model, jax.tree.map(jnp.asarray, params)


def save(folder: str, config: VAEConfig, params, dtype=None) -> None:
    """Write a diffusers ``vae/`` folder (config.json + diffusion_pytorch_model.safetensors).

    ``params``: the tree from :func:`load` / ``model.init`` (with or without the "params" level).
    """
    params = params.get("params", params)
    write_component(folder, config.to_dict(), params_to_state_dict(params, dtype=dtype))
