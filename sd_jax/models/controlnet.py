"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): diffusers' ``ControlNetModel`` in flax.linen, NHWC.

A trainable copy of the UNet's encoder (time embedding, ``conv_in``, down blocks, mid block:
the very code of :class:`sd_jax.models.unet.UNetEncoder`, under the same parameter names)
whose input is the noisy latents plus an embedding of the control image
(``controlnet_cond_embedding``: a few 3x3 convolutions, SiLU, strided down to the latent
grid), and whose outputs go through "zero convolutions" (1x1 convs initialised at zero,
``controlnet_down_blocks_N`` and ``controlnet_mid_block``) to become residuals that the UNet
adds to its skip connections and its mid block's output (``down_block_additional_residuals``,
``mid_block_additional_residual``).  SD 1.x, SD 2.x and SDXL (``addition_embed_type
="text_time"``) ControlNets share this module; a diffusers ``ControlNetModel`` folder converts
by the generic table in :mod:`sd_jax.weights.convert` (:func:`load`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from sd_jax.models.layers import conv2d
from sd_jax.models.policy import Policy
from sd_jax.models.unet import UNetConfig, UNetEncoder, _tup, dummy_added
from sd_jax.weights.convert import params_to_state_dict, state_dict_to_params
from sd_jax.weights.diffusers import read_config, read_state_dict, write_component
from sd_jax.weights.safetensors_io import CheckpointError, load_file
from sd_jax.weights.single_file import _indices, _one, _unet_table, rename_all

# config.json keys of a ControlNetModel that its UNet-like encoder does not have.
_OWN = ("conditioning_channels", "conditioning_embedding_out_channels",
        "controlnet_conditioning_channel_order", "global_pool_conditions")
# UNet config.json keys that a ControlNetModel does not take (its encoder has no up path, no
# output conv, and the defaults of these settings).
_NOT_OWN = ("attention_type", "center_input_sample", "class_embeddings_concat", "conv_in_kernel", "conv_out_kernel",
            "cross_attention_norm", "dual_cross_attention", "mid_block_only_cross_attention", "out_channels",
            "resnet_out_scale_factor", "resnet_skip_time_act", "reverse_transformer_layers_per_block", "sample_size",
            "time_cond_proj_dim", "time_embedding_act_fn", "time_embedding_dim", "time_embedding_type",
            "timestep_post_act", "up_block_types")


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers ``ControlNetModel`` ``config.json``: the encoder's settings as a
    :class:`UNetConfig` (its up blocks mirror the down blocks and are not built) and the
    ControlNet's own fields (same names, same meanings)."""
    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False

    def __post_init__(self):
        object.__setattr__(self, "conditioning_embedding_out_channels",
                           _tup(tuple(self.conditioning_embedding_out_channels)))
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order must be 'rgb' or 'bgr', "
                             f"got {self.controlnet_conditioning_channel_order!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        """From a diffusers ``ControlNetModel`` config dict (unsupported settings raise
        ``NotImplementedError`` as for the UNet)."""
        name = d.get("_class_name")
        if name not in (None, "ControlNetModel"):
            raise CheckpointError(f"config describes a {name}, not a ControlNetModel")
        u = {k: v for k, v in d.items() if k not in _OWN and not k.startswith("_")}
        u.setdefault("cross_attention_dim", 1280)           # ControlNetModel's default
        downs = u.get("down_block_types", UNetConfig.down_block_types)
        u["up_block_types"] = [t.replace("Down", "Up") for t in downs][::-1]
        u.pop("time_embedding_dim", None)                   # always 4 x block_out_channels[0]
        own = {k: d[k] for k in _OWN if k in d and d[k] is not None}
        return cls(UNetConfig.from_dict(u), **own)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **kw) -> "ControlNetConfig":
        """The ControlNet of a UNet's shape (as diffusers' ``ControlNetModel.from_unet``)."""
        return cls(dataclasses.replace(unet, time_embedding_dim=None), **kw)

    def to_dict(self) -> dict:
        """A diffusers ``ControlNetModel`` ``config.json`` dict (:meth:`from_dict` reads it back)."""
        d = {k: v for k, v in self.unet.to_dict().items() if k not in _NOT_OWN}
        d.update({k: list(v) if isinstance(v, tuple) else v
                  for k, v in ((f, getattr(self, f)) for f in _OWN)})
        return {**d, "_class_name": "ControlNetModel"}

    def mismatch(self, unet: UNetConfig, latent_channels: int) -> str | None:
        """Why this ControlNet cannot steer ``unet`` (a short clause), or None when it fits."""
        c = self.unet
        checks = (
            ("cross-attention width", c.cross_dims[0], unet.cross_dims[0]),
            ("input channels", c.in_channels, latent_channels),
            ("block widths", c.block_out_channels, unet.block_out_channels),
            ("layers per block", c.layers, unet.layers),
            ("text-time conditioning (SDXL)", c.addition_embed_type, unet.addition_embed_type),
        )
        for what, mine, theirs in checks:
            if mine != theirs:
                return f"its {what} is {mine}, the model's {theirs}"
        return None


class ControlNetConditioningEmbedding(nn.Module):
    """The control image [B, H, W, C] -> features [B, H / 2^k, W / 2^k, out] (k = the number
    of ``block_out_channels`` minus one): conv_in, SiLU, then per level a 3x3 conv and a
    strided 3x3 conv each followed by SiLU, and the zero-initialised ``conv_out``."""
    features: int
    block_out_channels: tuple
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        p, ch = self.policy, self.block_out_channels
        x = nn.silu(conv2d(ch[0], "conv_in", p)(x))
        for i in range(len(ch) - 1):
            x = nn.silu(conv2d(ch[i], f"blocks_{2 * i}", p)(x))
            x = nn.silu(conv2d(ch[i + 1], f"blocks_{2 * i + 1}", p, stride=2)(x))
        return conv2d(self.features, "conv_out", p)(x)


class ControlNetModel(UNetEncoder, nn.Module):
    """The ControlNet; ``policy`` as for :class:`sd_jax.models.unet.UNet2DConditionModel`."""
    config: ControlNetConfig
    policy: Policy = Policy()

    @property
    def encoder_config(self) -> UNetConfig:
        return self.config.unet

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                 guess_mode: bool = False, added_cond_kwargs=None):
        """sample [B, h, w, in_channels] (the UNet's input latents, NHWC); timesteps [B] or
        scalar; encoder_hidden_states [B, L, cross_attention_dim]; controlnet_cond
        [B, H, W, conditioning_channels] in [0, 1] at the image's size (H = h * 2^k);
        conditioning_scale: a number or float32 [B] (traced); guess_mode (static): the
        residuals scaled from 0.1 (first skip) to 1 (mid block) on a log scale, as diffusers;
        added_cond_kwargs: SDXL's, as for the UNet.

        Returns (down, mid): one residual per UNet skip connection ([B, h_i, w_i, C_i], a
        list) and the mid block's [B, h_n, w_n, C_n], in ``dtype``, already scaled."""
        cfg, ucfg, p = self.config, self.config.unet, self.policy
        d = p.dtype
        b = sample.shape[0]
        if sample.shape[-1] != ucfg.in_channels:
            raise ValueError(f"sample has {sample.shape[-1]} channels, the ControlNet takes {ucfg.in_channels}")
        if controlnet_cond.shape[-1] != cfg.conditioning_channels:
            raise ValueError(f"the control image has {controlnet_cond.shape[-1]} channels, the ControlNet "
                             f"takes {cfg.conditioning_channels} (NHWC layout expected)")
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        context = encoder_hidden_states.astype(d)
        emb = self.embed_time(timesteps, b, added_cond_kwargs)
        x = conv2d(ucfg.block_out_channels[0], "conv_in", p)(sample.astype(d))
        x = x + ControlNetConditioningEmbedding(ucfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                                policy=p, name="controlnet_cond_embedding")(controlnet_cond.astype(d))
        x, skips = self.down_path(x, emb, context)
        x = self.mid(x, emb, context)
        zero_conv = lambda h, name: conv2d(h.shape[-1], name, p, kernel=1, padding=0)(h)  # noqa: E731
        down = [zero_conv(h, f"controlnet_down_blocks_{i}") for i, h in enumerate(skips)]
        mid = zero_conv(x, "controlnet_mid_block")

        scale = jnp.broadcast_to(jnp.asarray(conditioning_scale, jnp.float32).reshape(-1), (b,))[:, None, None, None]
        if guess_mode and not cfg.global_pool_conditions:
            levels = jnp.logspace(-1.0, 0.0, len(down) + 1, dtype=jnp.float32)
            scales = [levels[i] * scale for i in range(len(down) + 1)]
        else:
            scales = [scale] * (len(down) + 1)
        down = [(h * s).astype(d) for h, s in zip(down, scales)]
        mid = (mid * scales[-1]).astype(d)
        if cfg.global_pool_conditions:
            down = [jnp.mean(h, axis=(1, 2), keepdims=True) for h in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid

    def dummy_inputs(self, batch: int = 1, size: int | None = None, seq: int = 1):
        """Zero inputs of the right shapes (for ``init``/``eval_shape``)."""
        cfg, ucfg = self.config, self.config.unet
        size = size or 2 ** (ucfg.n_blocks - 1)
        f = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        added = dummy_added(ucfg, batch, self.dtype)
        return (jnp.zeros((batch, size, size, ucfg.in_channels), self.dtype), jnp.zeros((batch,), jnp.float32),
                jnp.zeros((batch, seq, ucfg.cross_dims[0]), self.dtype),
                jnp.zeros((batch, size * f, size * f, cfg.conditioning_channels), self.dtype), 1.0, False, added)

    def param_shapes(self):
        """The parameter tree as ``jax.ShapeDtypeStruct`` (no memory, no compute)."""
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), *self.dummy_inputs()))["params"]


# ------------------------------------------------------------------ the original (single-file) layout
SINGLE_FILE_PREFIX = "control_model."


def single_file_table(n_levels: int, layers: int, down_attn: list, hint: list) -> dict:
    """{original prefix: (diffusers prefix, kind)} of a ControlNet checkpoint in the original
    layout (lllyasviel's ``cldm``): the UNet encoder's names (as the SD single file's UNet),
    ``input_hint_block.N`` (the conv layers of a Sequential with SiLUs between them: indices
    ``hint``), ``zero_convs.N.0`` and ``middle_block_out.0``."""
    t = {k: v for k, v in _unet_table(n_levels, layers, down_attn, [False] * n_levels).items()
         if not k.startswith(("output_blocks", "out."))}
    t["label_emb.0.0"] = ("add_embedding.linear_1", "same")
    t["label_emb.0.2"] = ("add_embedding.linear_2", "same")
    t[f"input_hint_block.{hint[0]}"] = ("controlnet_cond_embedding.conv_in", "same")
    for k, i in enumerate(hint[1:-1]):
        t[f"input_hint_block.{i}"] = (f"controlnet_cond_embedding.blocks.{k}", "same")
    t[f"input_hint_block.{hint[-1]}"] = ("controlnet_cond_embedding.conv_out", "same")
    for i in range(1 + n_levels * layers + n_levels - 1):
        t[f"zero_convs.{i}.0"] = (f"controlnet_down_blocks.{i}", "same")
    t["middle_block_out.0"] = ("controlnet_mid_block", "same")
    return t


def convert_single_file(sd, base: UNetConfig, where: str = "checkpoint") -> tuple[dict, dict]:
    """A ControlNet in the original layout (keys ``control_model.*``, or without the prefix)
    -> (diffusers ``config.json`` dict, diffusers-named state dict).

    The shapes come from the weights; what the weights do not hold (attention heads, norm
    groups, attention upcasting, SDXL's time-id width) from ``base``, the UNet it is for."""
    u = {k[len(SINGLE_FILE_PREFIX):]: v for k, v in sd.items() if k.startswith(SINGLE_FILE_PREFIX)} or dict(sd)
    if "input_hint_block.0.weight" not in u or "time_embed.0.weight" not in u:
        raise CheckpointError(f"{where} is not a ControlNet checkpoint (no control_model.input_hint_block)")
    keys = list(u)
    n_in = len(_indices(keys, "input_blocks."))
    ops = [i for i in _indices(keys, "input_blocks.") if f"input_blocks.{i}.0.op.weight" in u]
    layers = ops[0] - 1 if ops else n_in - 1
    n_levels = len(ops) + 1
    first = [1 + b * (layers + 1) for b in range(n_levels)]
    widths = [int(u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in first]
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in u for i in first]
    depth = [len(_indices(keys, f"input_blocks.{i}.1.transformer_blocks.")) if a else 1
             for i, a in zip(first, down_attn)]
    mid = "middle_block.1"
    cross = int(u[f"{mid}.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    hint = _indices(keys, "input_hint_block.")
    hint_ch = [int(u[f"input_hint_block.{i}.weight"].shape[0]) for i in hint]
    config = {
        "_class_name": "ControlNetModel", "in_channels": int(u["input_blocks.0.0.weight"].shape[1]),
        "conditioning_channels": int(u["input_hint_block.0.weight"].shape[1]),
        "conditioning_embedding_out_channels": [hint_ch[0]] + hint_ch[2:-1:2],
        "block_out_channels": widths, "layers_per_block": layers, "cross_attention_dim": cross,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "transformer_layers_per_block": depth if any(d != depth[0] for d in depth) else depth[0],
        "attention_head_dim": _one(list(base.heads)), "use_linear_projection": u[f"{mid}.proj_in.weight"].ndim == 2,
        "upcast_attention": base.upcast_attention, "norm_num_groups": base.norm_num_groups,
    }
    if "label_emb.0.0.weight" in u:  # SDXL
        config.update(addition_embed_type="text_time", addition_time_embed_dim=base.addition_time_embed_dim,
                      projection_class_embeddings_input_dim=int(u["label_emb.0.0.weight"].shape[1]))
    table = single_file_table(n_levels, layers, down_attn, hint)
    out, bad = rename_all(u, table, SINGLE_FILE_PREFIX)
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} ControlNet keys not understood ({', '.join(sorted(bad)[:3])})")
    return config, out


def load(path: str, *, policy: Policy | None = None, variant: str | None = None, allow_pickle: bool = False,
         base: UNetConfig | None = None):
    """Read a diffusers ``ControlNetModel`` folder (``config.json`` + safetensors, or the
    ``variant``'s, e.g. ``"fp16"``), or a ``.safetensors`` file in the original layout (then
    ``base``, the UNet it is for, gives what the weights do not: :func:`convert_single_file`),
    -> ``(model, params)``; every key is checked against the model's own shapes
    (``CheckpointError`` naming what differs)."""
    policy = policy or Policy()
    if os.path.isfile(path):
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: a single-file ControlNet must be a .safetensors file")
        cfg, sd = convert_single_file(load_file(path), base or UNetConfig.sd15(), where=path)
        config = ControlNetConfig.from_dict(cfg)
    else:
        config = ControlNetConfig.from_dict(read_config(path))
        sd = read_state_dict(path, variant=variant, allow_pickle=allow_pickle)
    model = ControlNetModel(config, policy=policy)
    params = state_dict_to_params(sd, model.param_shapes(), what="controlnet", dtype=policy.param_dtype)
    return model, jax.tree.map(jnp.asarray, params)


# ------------------------------------------------------------------ inside a pipeline folder
# diffusers' ControlNet pipelines hold their ControlNet in ``controlnet/`` (several: a
# MultiControlNetModel in ``controlnet/``, ``controlnet_1/``, ...); sd-jax also records each
# one's name there (``_sd_jax_name``, a private key diffusers ignores).
NAME_KEY = "_sd_jax_name"


def default_name(path: str) -> str:
    """The name a ControlNet loaded from ``path`` gets unless given one: its folder's (or file's) name."""
    return os.path.basename(os.path.normpath(path)).removesuffix(".safetensors")


def folder_name(i: int) -> str:
    """The folder of a pipeline's ``i``-th ControlNet, as diffusers' MultiControlNetModel."""
    return "controlnet" if i == 0 else f"controlnet_{i}"


def pipeline_class(name: str) -> str:
    """diffusers' ControlNet pipeline of a pipeline class (``StableDiffusionXLInpaintPipeline``
    -> ``StableDiffusionXLControlNetInpaintPipeline``)."""
    return re.sub(r"(Img2Img|Inpaint)?Pipeline$", r"ControlNet\1Pipeline", name)


def index_entry(n: int) -> list:
    """The ``model_index.json`` entry of ``n`` ControlNets."""
    return ["diffusers", "ControlNetModel" if n == 1 else "MultiControlNetModel"]


def saved_count(path: str) -> int:
    """How many ControlNets a model folder holds (diffusers ControlNet pipeline or sd-jax
    checkpoint), from its description files alone; 0 for anything else."""
    try:
        if os.path.isfile(os.path.join(path, "sd_jax.json")):
            return len(read_config(path, "sd_jax.json").get("controlnets", ()))
        entry = read_config(path, "model_index.json").get("controlnet") if os.path.isdir(path) else None
    except (OSError, ValueError):
        return 0
    if not entry or not entry[0]:
        return 0
    n = 0
    while os.path.isdir(os.path.join(path, folder_name(n))) and (n == 0 or entry[1] != "ControlNetModel"):
        n += 1
    return n


def save(folder: str, config: ControlNetConfig, params, name: str | None = None) -> None:
    """Write a diffusers ``ControlNetModel`` folder (``config.json`` + safetensors);
    ``name``: the name sd-jax gives it when the pipeline folder is loaded again."""
    cfg = config.to_dict()
    if name is not None:
        cfg[NAME_KEY] = name
    # the ControlNet's own module lists, which the generic table does not know: name_N -> name.N
    sd = {re.sub(r"(controlnet_down_blocks|controlnet_cond_embedding\.blocks)_(\d+)\.", r"\1.\2.", k): v
          for k, v in params_to_state_dict(jax.device_get(params)).items()}
    write_component(folder, cfg, sd)


def load_all(path: str, index: dict, *, policy: Policy, base: UNetConfig, variant: str | None = None,
             allow_pickle: bool = False) -> list:
    """The ControlNets of a diffusers pipeline folder (``index``: its ``model_index.json``):
    ``[(name, ControlNetConfig, params)]``, named as they were saved (else by folder)."""
    entry = index.get("controlnet")
    if not entry or not entry[0]:
        return []
    out = []
    while os.path.isdir(os.path.join(path, folder_name(len(out)))):
        folder = os.path.join(path, folder_name(len(out)))
        model, params = load(folder, policy=policy, variant=variant, allow_pickle=allow_pickle, base=base)
        out.append((read_config(folder).get(NAME_KEY) or folder_name(len(out)), model.config, params))
        if entry[1] == "ControlNetModel":
            break
    if not out:
        raise CheckpointError(f"{path}: model_index.json names a ControlNet but there is no controlnet/ folder")
    return out


__all__ = ["ControlNetConfig", "ControlNetModel", "ControlNetConditioningEmbedding", "convert_single_file", "load"]
