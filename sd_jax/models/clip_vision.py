"""The CLIP vision tower (transformers' ``CLIPVisionModel`` / ``...WithProjection``) in Flax,
and CLIPImageProcessor's preprocessing as a jittable function.

The safety checker and CLIP scoring (issue 17) both rest on it.  Parameter names mirror
transformers' modules, so checkpoints convert with the generic table of
:mod:`sd_jax.weights.convert`::

    vision_model/embeddings/class_embedding                    [D]
    vision_model/embeddings/patch_embedding/kernel             [P, P, C, D] (conv, no bias)
    vision_model/embeddings/position_embedding/embedding       [1 + (S/P)^2, D]
    vision_model/pre_layrnorm/{scale,bias}                     (transformers' spelling)
    vision_model/encoder/layers_N/...                          (the text encoder's layers)
    vision_model/post_layernorm/{scale,bias}
    visual_projection/kernel                                   (with projection only)

The encoder layers are :mod:`sd_jax.models.clip`'s, attending without a causal mask
(``CLIPVisionConfig.causal`` is False).

Numerics: as the text encoder: float32 residual stream, LayerNorms and softmax; matmuls
and the patch convolution in ``policy.dtype``; outputs returned in ``policy.dtype``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.clip import ACTIVATIONS, CLIPEncoder, _layer_norm
from sd_jax.models.policy import Policy, PolicyReads
from sd_jax.weights.convert import state_dict_to_params
from sd_jax.weights.diffusers import read_config, read_state_dict
from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["CLIPVisionConfig", "CLIPVisionModel", "load", "preprocess", "PreprocessConfig",
           "CLIP_MEAN", "CLIP_STD"]

_WITH_PROJECTION = "CLIPVisionModelWithProjection"

# transformers' CLIPVisionConfig defaults: a config.json missing a key means this value.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, projection_dim=512,
                    num_hidden_layers=12, num_attention_heads=12, num_channels=3,
                    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters of a CLIP vision tower (the defaults are OpenAI CLIP ViT-L/14's, the
    safety checker's).  ``projection_dim`` is None for ``CLIPVisionModel`` and the width of
    ``visual_projection`` for ``CLIPVisionModelWithProjection``."""
    hidden_size: int = 1024
    intermediate_size: int = 4096
    projection_dim: int | None = 768
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: ClassVar[bool] = False     # read by sd_jax.models.clip.CLIPAttention

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP vision hidden_act {self.hidden_act!r} is not supported; "
                             f"use one of {', '.join(ACTIVATIONS)}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_channels", "image_size", "patch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"CLIP vision {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP vision hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP vision image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.projection_dim is not None and (not isinstance(self.projection_dim, int)
                                                or self.projection_dim <= 0):
            raise ValueError(f"CLIP vision projection_dim must be a positive integer or None, "
                             f"got {self.projection_dim!r}")

    @property
    def num_positions(self) -> int:
        """The class token plus one token per patch."""
        return 1 + (self.image_size // self.patch_size) ** 2

    # ---- variants -------------------------------------------------------------------
    @classmethod
    def vit_l14(cls, **overrides) -> "CLIPVisionConfig":
        """OpenAI CLIP ViT-L/14 at 224 px (the SD 1.x/2.x safety checker's tower)."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> "CLIPVisionConfig":
        """A few-thousand-parameter tower for tests: 30 px images, 6 px patches."""
        return cls(**{**dict(hidden_size=32, intermediate_size=64, projection_dim=24,
                             num_hidden_layers=2, num_attention_heads=4, image_size=30,
                             patch_size=6), **overrides})

    # ---- config.json ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        """From a transformers ``CLIPVisionConfig`` json, or the ``vision_config`` of a full
        ``CLIPModel`` json (whose top-level ``projection_dim`` is the projection's width).

        Missing keys take transformers' defaults.  A projection is assumed for a full
        ``CLIPModel`` and when ``architectures`` names ``CLIPVisionModelWithProjection``
        (transformers writes a ``projection_dim`` into every CLIP vision config).
        """
        if "vision_config" in d or d.get("model_type") == "clip":
            if "vision_config" not in d:
                raise CheckpointError("config.json describes a full CLIPModel but has no "
                                      "vision_config; this CLIP folder has no vision model")
            top = d
            d = dict(d["vision_config"] or {})
            proj = top.get("projection_dim", _HF_DEFAULTS["projection_dim"])
        else:
            if d.get("model_type") not in (None, "clip_vision_model"):
                raise CheckpointError(f"config.json describes a {d.get('model_type')!r} model, "
                                      f"not a CLIP vision model ('clip_vision_model')")
            proj = (d.get("projection_dim", _HF_DEFAULTS["projection_dim"])
                    if _WITH_PROJECTION in (d.get("architectures") or ()) else None)
        get = lambda k: d.get(k, _HF_DEFAULTS[k])  # noqa: E731
        try:
            return cls(hidden_size=get("hidden_size"), intermediate_size=get("intermediate_size"),
                       projection_dim=proj, num_hidden_layers=get("num_hidden_layers"),
                       num_attention_heads=get("num_attention_heads"),
                       num_channels=get("num_channels"), image_size=get("image_size"),
                       patch_size=get("patch_size"), hidden_act=get("hidden_act"),
                       layer_norm_eps=float(get("layer_norm_eps")))
        except ValueError as e:
            raise CheckpointError(f"invalid CLIP vision config: {e}") from None

    def to_dict(self) -> dict:
        """A ``config.json`` that transformers' ``CLIPVisionModel``/``...WithProjection`` loads."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        d["architectures"] = [_WITH_PROJECTION if self.projection_dim else "CLIPVisionModel"]
        d["model_type"] = "clip_vision_model"
        return d


# ---- modules --------------------------------------------------------------------------

class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (a stride-``patch_size`` convolution without bias), the class token
    in front, plus learned position embeddings.  [B, S, S, C] -> float32 [B, 1 + N, D]."""
    config: CLIPVisionConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, pixels):
        c, p = self.config, self.policy
        ps = c.patch_size
        patches = nn.Conv(c.hidden_size, (ps, ps), strides=(ps, ps), padding="VALID",
                          use_bias=False, dtype=p.dtype, param_dtype=p.param_dtype,
                          name="patch_embedding")(pixels.astype(p.dtype))
        b = patches.shape[0]
        # Row-major (h, w) patch order, as PyTorch's conv output ``.flatten(2)``.
        patches = patches.reshape(b, -1, c.hidden_size).astype(jnp.float32)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,),
                         p.param_dtype)
        cls = jnp.broadcast_to(cls.astype(jnp.float32), (b, 1, c.hidden_size))
        pos = nn.Embed(c.num_positions, c.hidden_size, dtype=jnp.float32,
                       param_dtype=p.param_dtype, name="position_embedding")
        return jnp.concatenate([cls, patches], axis=1) + pos(jnp.arange(c.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, pixels):
        c, p = self.config, self.policy
        x = CLIPVisionEmbeddings(c, p, name="embeddings")(pixels)
        x = _layer_norm("pre_layrnorm", c.layer_norm_eps, p.param_dtype)(x)
        last = CLIPEncoder(c, p, name="encoder")(x)[-1]
        # As transformers: last_hidden_state has no final norm; the pooled class token does.
        pooled = _layer_norm("post_layernorm", c.layer_norm_eps, p.param_dtype)(last[:, 0])
        return last, pooled


class CLIPVisionModel(PolicyReads, nn.Module):
    """transformers' ``CLIPVisionModel`` (``config.projection_dim is None``) or
    ``CLIPVisionModelWithProjection``.

    Attributes:
      config: the :class:`CLIPVisionConfig`.
      policy: how it computes (:class:`sd_jax.models.policy.Policy`).
    """
    config: CLIPVisionConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, pixel_values) -> dict:
        """Encode images.

        Args:
          pixel_values: [B, S, S, num_channels] float, already normalised (:func:`preprocess`),
            S = ``config.image_size``.  NHWC, where transformers takes NCHW.
        Returns:
          ``last_hidden_state`` [B, 1 + (S/P)^2, D] (the encoder's output, no final norm);
          ``pooler_output`` [B, D]: ``post_layernorm`` of the class token;
          ``image_embeds`` [B, projection_dim] (projection models only):
          ``visual_projection(pooler_output)``.
        """
        c, p = self.config, self.policy
        want = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [batch, {want[0]}, {want[1]}, {want[2]}] "
                             f"(NHWC at the model's image_size), got shape {pixel_values.shape}; "
                             f"resize with sd_jax.models.clip_vision.preprocess")
        last, pooled = CLIPVisionTransformer(c, p, name="vision_model")(pixel_values)
        out = dict(last_hidden_state=last.astype(p.dtype), pooler_output=pooled.astype(p.dtype))
        if c.projection_dim:
            out["image_embeds"] = nn.Dense(c.projection_dim, use_bias=False, dtype=p.dtype,
                                           param_dtype=p.param_dtype,
                                           name="visual_projection")(pooled.astype(p.dtype))
        return out

    @nn.nowrap
    def init_params(self, rng):
        """Random parameters (the tree :func:`load` fills)."""
        c = self.config
        return self.init(rng, jnp.zeros((1, c.image_size, c.image_size, c.num_channels)))["params"]

    @nn.nowrap
    def param_shapes(self):
        """The parameter tree as ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
        return jax.eval_shape(lambda: self.init_params(jax.random.key(0)))


# ---- checkpoints ----------------------------------------------------------------------

def _canonical_key(key: str) -> str | None:
    """Map every checkpoint form onto ``vision_model.*`` / ``visual_projection.weight``; drop
    a full CLIPModel's text half and buffers."""
    if key.endswith("position_ids") or key == "logit_scale" \
            or key.startswith(("text_model.", "text_projection.")):
        return None
    if key.startswith(("vision_model.", "visual_projection.")):
        return key
    return "vision_model." + key       # transformers 5's CLIPVisionModel: no prefix


def load(folder: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla",
         policy: Policy | None = None, variant: str | None = None,
         allow_pickle: bool = False) -> tuple[CLIPVisionModel, dict]:
    """Read a transformers CLIP vision folder: ``config.json`` + weights of a
    ``CLIPVisionModelWithProjection``, a ``CLIPVisionModel``, or a full ``CLIPModel`` (whose
    vision half and ``visual_projection`` are read; the text half is ignored).

    Args:
      folder: the model folder.
      dtype, param_dtype, attention, policy: as :func:`sd_jax.models.clip.load`.
      variant, allow_pickle: as :func:`sd_jax.weights.diffusers.read_state_dict`.
    Returns:
      ``(model, params)``; params are on the default device.
    Raises:
      CheckpointError: missing folder/files, no vision model, or weights that do not match
        the config (every key must be used and every shape equal).
    """
    folder = os.fspath(folder)
    policy = policy or Policy(dtype, param_dtype, attention)
    if not os.path.isdir(folder):
        raise CheckpointError(f"CLIP vision folder {folder!r} not found")
    config = CLIPVisionConfig.from_dict(read_config(folder))
    state_dict = read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    model, params = params_from_state_dict(config, state_dict, folder, policy)
    return model, jax.device_put(params)


def params_from_state_dict(config: CLIPVisionConfig, state_dict, folder: str, policy: Policy = Policy()
                           ) -> tuple[CLIPVisionModel, dict]:
    """The model and (host) parameters of a vision tower's state dict (any key form
    :func:`load` reads; no other keys).  ``config.projection_dim`` is taken from
    ``visual_projection.weight`` when the config did not say; one that disagrees with it
    raises CheckpointError (one line, naming both)."""
    if not any(k.startswith("vision_model.") or k.startswith("embeddings.patch_embedding")
               for k in state_dict):
        raise CheckpointError(f"{folder!r} holds no CLIP vision model weights "
                              f"(no vision_model.* keys); give a CLIP model with a vision tower")
    proj = state_dict.get("visual_projection.weight")
    if proj is not None:
        if config.projection_dim is None:      # architectures did not say so
            config = dataclasses.replace(config, projection_dim=int(proj.shape[0]))
        elif tuple(proj.shape) != (config.projection_dim, config.hidden_size):
            raise CheckpointError(
                f"CLIP vision model in {folder!r}: visual_projection.weight has shape "
                f"{tuple(proj.shape)} but config.json says projection_dim={config.projection_dim}, "
                f"hidden_size={config.hidden_size} (wants {(config.projection_dim, config.hidden_size)}); "
                f"check that config.json belongs to these weights")
    model = CLIPVisionModel(config, policy=policy)
    params = state_dict_to_params(state_dict, model.param_shapes(),
                                  what=f"CLIP vision model ({folder})",
                                  rename=_canonical_key, dtype=policy.param_dtype)
    return model, params


# ---- preprocessing --------------------------------------------------------------------

# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalise_table(mean, std) -> np.ndarray:
    """[256, 3] float32: each uint8 value rescaled and normalised exactly as
    CLIPImageProcessor does it (float64 rescale cast to float32, then float32
    ``(x - mean) / std``), so a lookup reproduces its bits."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)[:, None]
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _resize_axis(x, axis: int, size: int):
    """PIL's bicubic resize along one axis of a float image holding uint8 values, rounded
    back to uint8 values as PIL's 8-bit passes are."""
    if x.shape[axis] == size:
        return x
    shape = list(x.shape)
    shape[axis] = size
    # Keys cubic (a = -0.5) widened by the scale when shrinking, as PIL's BICUBIC filter.
    y = jax.image.resize(x, shape, method="bicubic", antialias=True)
    return jnp.clip(jnp.round(y), 0, 255)


def preprocess(images, image_size: int = 224, crop_size: int | None = None,
               mean=CLIP_MEAN, std=CLIP_STD):
    """CLIPImageProcessor's preprocessing (resize, centre crop, rescale, normalise), jittable.

    Args:
      images: [B, H, W, 3] uint8 (RGB).
      image_size: the shortest side after resizing (``size["shortest_edge"]``); the other
        side is ``int(image_size * long / short)`` as transformers computes it.
      crop_size: the square centre crop (``crop_size``); None = ``image_size``.
      mean, std: per-channel normalisation (default OpenAI CLIP's).
    Returns:
      [B, crop_size, crop_size, 3] float32, the model's ``pixel_values`` in NHWC.

    The resize is bicubic with antialiasing done as PIL does it (horizontal pass, then
    vertical, each rounded to uint8); PIL's fixed-point arithmetic is not reproduced, so a
    resized pixel can differ from CLIPImageProcessor's by one uint8 step (1/255/std, about
    0.015 after normalising).  Without a resize (an image whose shortest side is already
    ``image_size``) the result equals CLIPImageProcessor's bit for bit.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3] uint8, got shape {images.shape}")
    if images.dtype != jnp.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
    crop = image_size if crop_size is None else crop_size
    _, h, w, _ = images.shape
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(image_size * long / short)
    new_h, new_w = (new_long, image_size) if w <= h else (image_size, new_long)
    if crop > new_h or crop > new_w:
        raise ValueError(f"crop_size {crop} is larger than the resized image {new_h}x{new_w}")
    x = images.astype(jnp.float32)
    x = _resize_axis(_resize_axis(x, 2, new_w), 1, new_h)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    x = x[:, top:top + crop, left:left + crop].astype(jnp.int32)
    table = jnp.asarray(_normalise_table(mean, std))
    return table[x, jnp.arange(3)]


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """The settings of a ``preprocessor_config.json`` (a ``feature_extractor/`` folder) that
    :func:`preprocess` implements: ``preprocess(images, **cfg.kwargs())``."""
    image_size: int = 224
    crop_size: int = 224
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    def kwargs(self) -> dict:
        return dict(image_size=self.image_size, crop_size=self.crop_size, mean=self.mean, std=self.std)

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        """From CLIPImageProcessor's / CLIPFeatureExtractor's json: ``size`` and
        ``crop_size`` as ints (the SD checkpoints' old form) or dicts
        (``{"shortest_edge": N}``, ``{"height": N, "width": N}``).  Settings
        :func:`preprocess` does not implement raise CheckpointError."""
        def side(v, keys, name):
            if isinstance(v, int):
                return v
            if isinstance(v, dict):
                vals = {v.get(k) for k in keys if k in v}
                if len(vals) == 1 and isinstance(next(iter(vals)), int):
                    return next(iter(vals))
            raise CheckpointError(f"preprocessor_config.json: {name} {v!r} is not supported; "
                                  f"sd-jax preprocesses for CLIP with a square centre crop")
        size = side(d.get("size", 224), ("shortest_edge",), "size")
        crop = side(d.get("crop_size", size), ("height", "width"), "crop_size")
        unsupported = [k for k, want in (("do_resize", True), ("do_center_crop", True),
                                         ("do_rescale", True), ("do_normalize", True),
                                         ("resample", 3)) if d.get(k, want) != want]
        if abs(float(d.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
            unsupported.append("rescale_factor")
        if unsupported:
            raise CheckpointError(f"preprocessor_config.json: {', '.join(unsupported)} differ from "
                                  f"CLIP's (bicubic resize, centre crop, rescale 1/255, normalise), "
                                  f"which is all sd-jax implements")
        mean, std = tuple(d.get("image_mean", CLIP_MEAN)), tuple(d.get("image_std", CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise CheckpointError(f"preprocessor_config.json: image_mean and image_std need 3 "
                                  f"values (RGB), got {list(mean)} and {list(std)}")
        return cls(image_size=size, crop_size=crop, mean=mean, std=std)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "PreprocessConfig":
        """From ``folder/preprocessor_config.json`` (e.g. a model's ``feature_extractor/``)."""
        return cls.from_dict(read_config(os.fspath(folder), "preprocessor_config.json"))
