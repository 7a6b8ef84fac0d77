"""The Stable Diffusion denoiser: diffusers' ``UNet2DConditionModel`` in flax.linen, NHWC.

Submodules carry diffusers' names (``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_q``
...), so a diffusers ``unet/`` folder converts by the generic table in
:mod:`sd_jax.weights.convert`.  Supported: SD 1.x, SD 2.x (linear projections,
per-block head counts, ``upcast_attention``), inpainting (9 input channels),
``transformer_layers_per_block`` (int, per block, or per layer) and SDXL's
``addition_embed_type="text_time"`` (pooled text embedding + micro-conditioning
``time_ids``, see :meth:`UNet2DConditionModel._added_embedding`).

Head counts follow diffusers exactly: ``num_attention_heads`` falls back to
``attention_head_dim`` (a historical misnomer), so ``attention_head_dim=8`` means 8
heads and SD 2's ``[5, 10, 20, 20]`` means 5/10/20/20 heads (of dimension 64 each);
the head dimension is ``block channels // heads``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models.attention import dot_product_attention
from sd_jax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from sd_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv2d, group_norm, norm
from sd_jax.models.policy import Policy, PolicyReads
from sd_jax.weights.convert import params_to_state_dict, state_dict_to_params
from sd_jax.weights.diffusers import read_config, read_state_dict, write_component
from sd_jax.weights.safetensors_io import CheckpointError


DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys this port does not implement: any value but the default (first)
# or an equivalent (the others) is refused rather than silently computing something else.
# `dropout` is irrelevant at inference.
_MUST_BE_DEFAULT = {
    "class_embed_type": (None,), "num_class_embeds": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
    "act_fn": ("silu", "swish"), "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
}


def _unsupported(key, value) -> bool:
    allowed = _MUST_BE_DEFAULT[key]
    if key == "only_cross_attention" and isinstance(value, (list, tuple)):
        return any(value)        # per-block list of False is the default too
    return value not in allowed


def _tup(x):
    """Lists (nested) -> tuples, so configs are hashable flax module fields."""
    if isinstance(x, (list, tuple)):
        return tuple(_tup(v) for v in x)
    return x


def _per_block(x, n, what):
    if isinstance(x, tuple):
        if len(x) != n:
            raise ValueError(f"UNetConfig.{what} has {len(x)} entries for {n} blocks")
        return x
    return (x,) * n


@dataclass(frozen=True)
class UNetConfig:
    """diffusers ``unet/config.json`` fields (same names, same meanings)."""
    sample_size: int | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                               "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                             "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 768
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    attention_head_dim: int | tuple = 8
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    # SDXL: "text_time" (add_time_proj + add_embedding); the only addition type supported.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # LCM-distilled UNets: guidance as an embedding (``timestep_cond``) of this width, added through
    # ``time_embedding.cond_proj``; such a UNet runs once per step, without classifier-free guidance.
    time_cond_proj_dim: int | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """From a diffusers config dict; unknown keys are ignored, known-but-unsupported
        settings raise ``NotImplementedError``."""
        name = d.get("_class_name")
        if name not in (None, "UNet2DConditionModel"):
            raise CheckpointError(f"config describes a {name}, not a UNet2DConditionModel")
        for k, allowed in _MUST_BE_DEFAULT.items():
            v = d.get(k, allowed[0])
            if _unsupported(k, v):
                raise NotImplementedError(
                    f"UNet config {k}={v!r} is not supported by sd-jax (only {allowed[0]!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: _tup(v) for k, v in d.items() if k in names}
        return cls(**kw)

    def __post_init__(self):
        n = len(self.down_block_types)
        for k in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, k, _tup(tuple(getattr(self, k))))
        for k in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                  "reverse_transformer_layers_per_block", "attention_head_dim",
                  "num_attention_heads"):
            object.__setattr__(self, k, _tup(getattr(self, k)))
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError("UNetConfig: down_block_types, up_block_types and block_out_channels "
                             f"must have the same length ({n}, {len(self.up_block_types)}, "
                             f"{len(self.block_out_channels)})")
        bad = [t for t in self.down_block_types if t not in DOWN_BLOCKS]
        bad += [t for t in self.up_block_types if t not in UP_BLOCKS]
        if self.mid_block_type not in MID_BLOCKS:
            bad.append(self.mid_block_type)
        if bad:
            raise NotImplementedError(f"UNet block types {bad} are not supported by sd-jax "
                                      f"(supported: {DOWN_BLOCKS + UP_BLOCKS + MID_BLOCKS[:1]})")
        if self.norm_num_groups is None:
            raise NotImplementedError("UNet config norm_num_groups=None is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise NotImplementedError(f"UNet config addition_embed_type={self.addition_embed_type!r} "
                                      "is not supported by sd-jax (only None or 'text_time')")
        if self.addition_embed_type == "text_time" and not (
                self.addition_time_embed_dim and self.projection_class_embeddings_input_dim):
            raise ValueError("UNet config addition_embed_type='text_time' needs "
                             "addition_time_embed_dim and projection_class_embeddings_input_dim")
        tl = self.transformer_layers_per_block
        if (isinstance(tl, tuple) and any(isinstance(t, tuple) for t in tl)
                and self.reverse_transformer_layers_per_block is None):
            raise ValueError("per-layer transformer_layers_per_block needs "
                             "reverse_transformer_layers_per_block (as in diffusers)")
        heads = self.heads
        for c, h, t in zip(self.block_out_channels, heads, self.down_block_types):
            if "CrossAttn" in t and c % h:
                raise ValueError(f"block width {c} is not divisible by its {h} attention heads")

    @classmethod
    def sd15(cls) -> "UNetConfig":
        """runwayml/stable-diffusion-v1-5 ``unet/config.json``."""
        return cls()

    @classmethod
    def sd15_inpaint(cls) -> "UNetConfig":
        """runwayml/stable-diffusion-inpainting: latents + mask + masked-image latents."""
        return cls(in_channels=9)

    @classmethod
    def sd21(cls) -> "UNetConfig":
        """stabilityai/stable-diffusion-2-1 (768-v): 5/10/20/20 heads of dim 64."""
        return cls(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                   use_linear_projection=True, upcast_attention=True)

    @classmethod
    def sdxl(cls, **kw) -> "UNetConfig":
        """stabilityai/stable-diffusion-xl-base-1.0 ``unet/config.json`` (2.6 B parameters):
        no attention at the highest resolution, 1/2/10 transformer layers, 2048-wide
        context, ``text_time`` conditioning on the 1280-wide pooled embedding + 6 x 256."""
        base = dict(sample_size=128, block_out_channels=(320, 640, 1280),
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                    attention_head_dim=(5, 10, 20), use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=256,
                    projection_class_embeddings_input_dim=2816)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw) -> "UNetConfig":
        """A few-hundred-kB model with every block type, for tests."""
        base = dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4)
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny_sdxl(cls, **kw) -> "UNetConfig":
        """SDXL's shape in miniature, for tests: DownBlock2D first (no attention at the
        highest resolution), per-block transformer depths and head counts, linear
        projections, ``text_time`` conditioning on a 32-wide pooled embedding and 6 time ids."""
        base = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=2,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                    transformer_layers_per_block=(1, 2), norm_num_groups=8, cross_attention_dim=64,
                    attention_head_dim=(2, 4), use_linear_projection=True,
                    addition_embed_type="text_time", addition_time_embed_dim=8,
                    projection_class_embeddings_input_dim=6 * 8 + 32)
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        """A diffusers ``config.json`` dict that ``UNet2DConditionModel.from_config`` accepts."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # diffusers refuses an explicit num_attention_heads; for these block types it only
        # reads the (misnamed) attention_head_dim, so write the head counts there.
        d["attention_head_dim"] = self.num_attention_heads or self.attention_head_dim
        d["num_attention_heads"] = None
        d.update({k: v[0] for k, v in _MUST_BE_DEFAULT.items()})

        def lists(x):
            return [lists(v) for v in x] if isinstance(x, tuple) else x
        d = {k: lists(v) for k, v in d.items()}
        return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1", **d}

    # ----------------------------------------------------------------- derived
    @property
    def n_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def heads(self) -> tuple:
        """Attention heads per down block (diffusers: ``num_attention_heads or attention_head_dim``)."""
        h = self.num_attention_heads or self.attention_head_dim
        return _per_block(h, self.n_blocks, "attention_head_dim")

    @property
    def layers(self) -> tuple:
        return _per_block(self.layers_per_block, self.n_blocks, "layers_per_block")

    @property
    def cross_dims(self) -> tuple:
        return _per_block(self.cross_attention_dim, self.n_blocks, "cross_attention_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def down_transformer_layers(self, i) -> tuple:
        t = _per_block(self.transformer_layers_per_block, self.n_blocks, "transformer_layers_per_block")[i]
        return t if isinstance(t, tuple) else (t,) * self.layers[i]

    def up_transformer_layers(self, i) -> tuple:
        if self.reverse_transformer_layers_per_block is not None:
            t = self.reverse_transformer_layers_per_block[i]
        else:
            t = _per_block(self.transformer_layers_per_block, self.n_blocks,
                           "transformer_layers_per_block")[::-1][i]
        return t if isinstance(t, tuple) else (t,) * (self.layers[::-1][i] + 1)

    def mid_transformer_layers(self) -> int:
        t = _per_block(self.transformer_layers_per_block, self.n_blocks, "transformer_layers_per_block")[-1]
        return t[0] if isinstance(t, tuple) else t


# --------------------------------------------------------------------------- modules
class PointwiseConv(nn.Module):
    """A 1x1 convolution (``kernel`` [1, 1, in, out], as PyTorch stores it) done as a matmul."""
    features: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        d, pd = self.policy.dtype, self.policy.param_dtype
        k = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features), pd)
        b = self.param("bias", nn.initializers.zeros, (self.features,), pd)
        y = jnp.dot(x.astype(d), k[0, 0].astype(d))
        return y + b.astype(d)


class Attention(nn.Module):
    """diffusers ``Attention`` (``to_q``/``to_k``/``to_v`` without bias, ``to_out.0``)."""
    heads: int
    dim_head: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, context=None):
        p = self.policy
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias=False: nn.Dense(n, use_bias=bias, dtype=p.dtype,  # noqa: E731
                                                     param_dtype=p.param_dtype, name=name)
        ctx = x if context is None else context
        q, k, v = dense(inner, "to_q")(x), dense(inner, "to_k")(ctx), dense(inner, "to_v")(ctx)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)  # noqa: E731
        # Scores and softmax are float32 in every implementation: this is upcast_attention.
        o = dot_product_attention(split(q), split(k), split(v), impl=p.attention,
                                  cpu_lowerings=p.cpu_lowerings)
        o = o.reshape(x.shape[0], x.shape[1], inner)
        return dense(x.shape[-1], "to_out_0", bias=True)(o)


class FeedForward(nn.Module):
    """diffusers ``FeedForward(activation_fn="geglu")``: ``net.0.proj`` -> GEGLU -> ``net.2``."""
    mult: int = 4
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        p = self.policy
        dim = x.shape[-1]
        inner = dim * self.mult
        h = _GEGLUProj(2 * inner, policy=p, name="net_0")(x)
        h, gate = h[..., :inner], h[..., inner:]
        h = h * nn.gelu(gate, approximate=False)
        return nn.Dense(dim, dtype=p.dtype, param_dtype=p.param_dtype, name="net_2")(h)


class _GEGLUProj(nn.Module):
    """Holds ``net.0.proj`` (diffusers' GEGLU module wraps its Linear as ``proj``)."""
    features: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        p = self.policy
        return nn.Dense(self.features, dtype=p.dtype, param_dtype=p.param_dtype, name="proj")(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm residuals."""
    heads: int
    dim_head: int
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, context):
        p = self.policy

        def ln(name, h):  # float32 statistics, like the group norms
            return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=p.param_dtype, name=name)(
                h.astype(jnp.float32)).astype(p.dtype)

        attn = lambda name: Attention(self.heads, self.dim_head, policy=p, name=name)  # noqa: E731
        x = x + attn("attn1")(ln("norm1", x))
        x = x + attn("attn2")(ln("norm2", x), context)
        x = x + FeedForward(policy=p, name="ff")(ln("norm3", x))
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out, + residual."""
    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, context):
        p = self.policy
        b, hh, ww, c = x.shape
        inner = self.heads * self.dim_head
        proj = (lambda n, name: nn.Dense(n, dtype=p.dtype, param_dtype=p.param_dtype, name=name)) \
            if self.use_linear_projection else \
            (lambda n, name: PointwiseConv(n, policy=p, name=name))
        h = norm(group_norm("norm", self.groups, 1e-6, p.param_dtype), x, p.dtype)
        h = proj(inner, "proj_in")(h.reshape(b, hh * ww, c))
        for i in range(self.num_layers):
            h = BasicTransformerBlock(self.heads, self.dim_head, policy=p,
                                      name=f"transformer_blocks_{i}")(h, context)
        h = proj(c, "proj_out")(h)
        return h.reshape(b, hh, ww, c) + x


class DownBlock(nn.Module):
    """``CrossAttnDownBlock2D`` (``transformer_layers`` given) or ``DownBlock2D``."""
    out_channels: int
    num_layers: int
    transformer_layers: tuple | None = None
    heads: int = 8
    add_downsample: bool = True
    downsample_padding: int = 1
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, temb, context):
        p = self.policy
        states = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, policy=p,
                              name=f"resnets_{i}")(x, temb)
            if self.transformer_layers is not None:
                x = Transformer2DModel(self.heads, self.out_channels // self.heads,
                                       self.transformer_layers[i], self.groups,
                                       self.use_linear_projection, policy=p,
                                       name=f"attentions_{i}")(x, context)
            states.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, policy=p,
                             name="downsamplers_0")(x)
            states.append(x)
        return x, states


class UpBlock(nn.Module):
    """``CrossAttnUpBlock2D`` (``transformer_layers`` given) or ``UpBlock2D``."""
    out_channels: int
    num_layers: int
    transformer_layers: tuple | None = None
    heads: int = 8
    add_upsample: bool = True
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        p = self.policy
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, policy=p,
                              name=f"resnets_{i}")(x, temb)
            if self.transformer_layers is not None:
                x = Transformer2DModel(self.heads, self.out_channels // self.heads,
                                       self.transformer_layers[i], self.groups,
                                       self.use_linear_projection, policy=p,
                                       name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, policy=p, name="upsamplers_0")(x, upsample_size)
        return x


class MidBlock(nn.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, (transformer, resnet)."""
    channels: int
    transformer_layers: int = 1
    heads: int = 8
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    use_linear_projection: bool = False
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x, temb, context):
        p = self.policy
        res = lambda i: ResnetBlock2D(self.channels, self.groups, self.eps,  # noqa: E731
                                      self.output_scale_factor, policy=p, name=f"resnets_{i}")
        x = res(0)(x, temb)
        x = Transformer2DModel(self.heads, self.channels // self.heads, self.transformer_layers,
                               self.groups, self.use_linear_projection, policy=p,
                               name="attentions_0")(x, context)
        return res(1)(x, temb)


class UNetEncoder(PolicyReads):
    """The UNet's time embedding, down path and mid block, shared by the UNet and the
    ControlNet (:mod:`sd_jax.models.controlnet`), which has the same encoder under the same
    parameter names.  A mixin for a flax module with a ``policy`` whose ``encoder_config``
    is a :class:`UNetConfig`; the methods create submodules, so they are called from the
    module's compact ``__call__``."""

    @property
    def encoder_config(self) -> UNetConfig:
        return self.config

    def _added_embedding(self, emb, added_cond_kwargs):
        """``emb`` [B, time_embed_dim] plus the ``addition_embed_type`` embedding.

        SDXL's ``"text_time"`` (diffusers ``get_aug_embed``): each of the ``time_ids``
        [B, K] (K = 6 for the base: original size, crop top-left, target size; 5 for the
        refiner) gets a sinusoidal embedding of ``addition_time_embed_dim`` (float32, as
        ``add_time_proj``), flattened to [B, K * addition_time_embed_dim], concatenated
        after ``text_embeds`` [B, P] and projected by ``add_embedding`` (linear_1, SiLU,
        linear_2) to ``time_embed_dim``; the sum is what the resnets see.
        """
        cfg = self.encoder_config
        if cfg.addition_embed_type is None:
            return emb
        missing = [k for k in ("text_embeds", "time_ids")
                   if not added_cond_kwargs or added_cond_kwargs.get(k) is None]
        if missing:
            raise ValueError(
                f"this UNet has addition_embed_type='text_time' (SDXL) and needs "
                f"added_cond_kwargs with 'text_embeds' [B, pooled dim] and 'time_ids' [B, K]; "
                f"missing: {', '.join(missing)}")
        text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"])
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        b = emb.shape[0]
        if text_embeds.ndim != 2 or text_embeds.shape[0] != b:
            raise ValueError(f"added_cond_kwargs['text_embeds'] must be [B={b}, pooled dim], "
                             f"got shape {text_embeds.shape}")
        if time_ids.ndim != 2 or time_ids.shape[0] != b:
            raise ValueError(f"added_cond_kwargs['time_ids'] must be [B={b}, K], got shape {time_ids.shape}")
        time_embeds = get_timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
        width = text_embeds.shape[1] + time_embeds.shape[1]
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds ({text_embeds.shape[1]} wide) and {time_ids.shape[1]} time_ids x "
                f"{cfg.addition_time_embed_dim} make {width} features, the UNet's add_embedding "
                f"takes projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}")
        add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        aug = TimestepEmbedding(cfg.time_embed_dim, policy=self.policy, name="add_embedding")(
            add.astype(emb.dtype))
        return emb + aug

    def embed_time(self, timesteps, b, added_cond_kwargs, timestep_cond=None):
        """timesteps [B] or scalar -> the embedding the resnets see, [B, time_embed_dim];
        timestep_cond: [B, time_cond_proj_dim] (LCM's guidance embedding) or None."""
        cfg, p = self.encoder_config, self.policy
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        t_emb = get_timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, policy=p, cond_proj_dim=getattr(cfg, "time_cond_proj_dim", None),
                                name="time_embedding")(t_emb.astype(p.dtype), timestep_cond)
        return self._added_embedding(emb, added_cond_kwargs)

    def down_path(self, x, emb, context):
        """The down blocks on ``x`` (after ``conv_in``) -> (x, skips: ``x`` and every block state)."""
        cfg, p = self.encoder_config, self.policy
        skips = [x]
        groups, eps, heads = cfg.norm_num_groups, cfg.norm_eps, cfg.heads
        for i, kind in enumerate(cfg.down_block_types):
            x, states = DownBlock(
                cfg.block_out_channels[i], cfg.layers[i],
                cfg.down_transformer_layers(i) if kind == "CrossAttnDownBlock2D" else None,
                heads[i], add_downsample=i < cfg.n_blocks - 1,
                downsample_padding=cfg.downsample_padding, groups=groups, eps=eps,
                use_linear_projection=cfg.use_linear_projection, policy=p,
                name=f"down_blocks_{i}")(x, emb, context)
            skips += states
        return x, skips

    def mid(self, x, emb, context):
        """The mid block (the identity where ``mid_block_type`` is None)."""
        cfg = self.encoder_config
        if cfg.mid_block_type is None:
            return x
        return MidBlock(cfg.block_out_channels[-1], cfg.mid_transformer_layers(), cfg.heads[-1],
                        cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor,
                        cfg.use_linear_projection, policy=self.policy, name="mid_block")(x, emb, context)


class UNet2DConditionModel(UNetEncoder, nn.Module):
    """The conditional denoiser.

    ``policy`` (:class:`sd_jax.models.policy.Policy`): how it computes.  A bfloat16
    ``dtype`` works (norms, softmax and the timestep embedding stay float32); ``attention``
    names a :mod:`sd_jax.models.attention` implementation; ``conv_impl`` the convolutions'
    lowering (:class:`sd_jax.models.layers.Conv2D`; "auto" is right unless measuring).
    ``dtype``, ``param_dtype`` and ``attention`` read through to the policy.
    """
    config: UNetConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, timestep_cond=None):
        """sample [B, H, W, in_channels] (NHWC); timesteps [B] or scalar, int or float;
        encoder_hidden_states [B, L, cross_attention_dim]; added_cond_kwargs: SDXL's
        ``{"text_embeds": [B, P], "time_ids": [B, K]}`` (required when the config has
        ``addition_embed_type``, ignored otherwise).  down_block_additional_residuals (a
        sequence, one [B, h, w, C] per skip connection) and mid_block_additional_residual
        ([B, h, w, C]): a ControlNet's, added to the skips and the mid block's output.
        timestep_cond [B, time_cond_proj_dim]: an LCM-distilled UNet's guidance embedding
        (:func:`sd_jax.models.embeddings.get_guidance_scale_embedding`).
        Returns [B, H, W, out_channels] in ``dtype``.  Any H and W: where a level's size is odd, upsampling goes back to the
        skip connection's size (diffusers' ``upsample_size``)."""
        cfg, p = self.config, self.policy
        d, pd = p.dtype, p.param_dtype
        b = sample.shape[0]
        if sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample has {sample.shape[-1]} channels, the UNet takes {cfg.in_channels} "
                             f"(NHWC layout expected)")
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = sample.astype(d)
        context = encoder_hidden_states.astype(d)

        emb = self.embed_time(timesteps, b, added_cond_kwargs, timestep_cond)
        x = conv2d(cfg.block_out_channels[0], "conv_in", p)(x)
        x, skips = self.down_path(x, emb, context)
        if down_block_additional_residuals is not None:  # a ControlNet's, added as diffusers does
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"{len(down_block_additional_residuals)} down_block_additional_residuals "
                                 f"for {len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        x = self.mid(x, emb, context)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)
        groups, eps, heads = cfg.norm_num_groups, cfg.norm_eps, cfg.heads

        rev_ch, rev_heads, rev_layers = (cfg.block_out_channels[::-1], heads[::-1], cfg.layers[::-1])
        for i, kind in enumerate(cfg.up_block_types):
            n = rev_layers[i] + 1
            skips, block_skips = skips[:-n], skips[-n:]
            x = UpBlock(
                rev_ch[i], n, cfg.up_transformer_layers(i) if kind == "CrossAttnUpBlock2D" else None,
                rev_heads[i], add_upsample=i < cfg.n_blocks - 1, groups=groups, eps=eps,
                use_linear_projection=cfg.use_linear_projection, policy=p,
                name=f"up_blocks_{i}")(
                    x, block_skips, emb, context, skips[-1].shape[1:3] if skips else None)

        x = norm(group_norm("conv_norm_out", groups, eps, pd), x, d)
        return conv2d(cfg.out_channels, "conv_out", p)(nn.silu(x))

    # ----------------------------------------------------------------- helpers
    def dummy_inputs(self, batch: int = 1, size: int | None = None, seq: int = 1):
        """Zero inputs of the right shapes (for ``init``/``eval_shape``): sample,
        timesteps, encoder_hidden_states, added_cond_kwargs (None unless the UNet takes
        SDXL's conditioning; then 6 time ids and the pooled width that makes
        ``projection_class_embeddings_input_dim``, or 1 id where that does not fit)."""
        cfg = self.config
        size = size or 2 ** (cfg.n_blocks - 1)
        return (jnp.zeros((batch, size, size, cfg.in_channels), self.dtype),
                jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, seq, cfg.cross_dims[0]), self.dtype), dummy_added(cfg, batch, self.dtype))

    def param_shapes(self):
        """The parameter tree as ``jax.ShapeDtypeStruct`` (no memory, no compute)."""
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), *self.dummy_inputs()))["params"]


# --------------------------------------------------------------------------- I/O
def load(folder: str, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla",
         policy: Policy | None = None, variant: str | None = None, allow_pickle: bool = False):
    """Read a diffusers ``unet/`` folder -> ``(model, params)``.

    The model computes as ``policy`` says, or when it is None, as
    ``Policy(dtype, param_dtype, attention)`` (``param_dtype`` defaults to ``dtype``).
    Raises ``CheckpointError`` when the weights do not match config.json,
    ``NotImplementedError`` for unsupported configs.
    """
    policy = policy or Policy(dtype, param_dtype, attention)
    config = UNetConfig.from_dict(read_config(folder))
    model = UNet2DConditionModel(config, policy=policy)
    shapes = model.param_shapes()
    sd = read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    params = state_dict_to_params(sd, shapes, what="unet", dtype=policy.param_dtype)
    return model, jax.tree.map(jnp.asarray, params)


def save(folder: str, config: UNetConfig, params, dtype=None) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers format)."""
    write_component(folder, config.to_dict(), params_to_state_dict(params, dtype=dtype))


__all__ = ["UNetConfig", "UNet2DConditionModel", "load", "save", "get_timestep_embedding"]


def dummy_added(cfg: UNetConfig, batch: int, dtype):
    """Zero ``added_cond_kwargs`` for ``cfg`` (for ``init``/``eval_shape``), or None when it
    takes no added conditioning: 6 time ids and the pooled width that makes
    ``projection_class_embeddings_input_dim``, or 1 id where that does not fit."""
    if cfg.addition_embed_type is None:
        return None
    a, width = cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim
    k = 6 if width > 6 * a else 1
    return {"text_embeds": jnp.zeros((batch, width - k * a), dtype), "time_ids": jnp.zeros((batch, k), jnp.float32)}
