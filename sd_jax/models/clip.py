"""The CLIP text encoder of Stable Diffusion (transformers' ``CLIPTextModel``) in Flax.

Parameter names mirror transformers' modules, so checkpoints convert with the generic
table of :mod:`sd_jax.weights.convert`::

    text_model/embeddings/{token_embedding,position_embedding}/embedding
    text_model/encoder/layers_N/self_attn/{q_proj,k_proj,v_proj,out_proj}/{kernel,bias}
    text_model/encoder/layers_N/{layer_norm1,layer_norm2}/{scale,bias}
    text_model/encoder/layers_N/mlp/{fc1,fc2}/{kernel,bias}
    text_model/final_layer_norm/{scale,bias}
    text_projection/kernel                      (CLIPTextModelWithProjection only)

Checkpoints come in two key forms, both read by :func:`load`:

* real SD checkpoints (saved by transformers 4) and every ``CLIPTextModelWithProjection``:
  ``text_model.embeddings.token_embedding.weight`` ..., often with a
  ``text_model.embeddings.position_ids`` buffer;
* transformers 5's ``CLIPTextModel.save_pretrained``: the same keys without the
  ``text_model.`` prefix and without ``position_ids``.

:func:`save` writes the first form (without the buffer); transformers 4 and 5 both load it.

Numerics: the residual stream, LayerNorms and the attention softmax are float32 whatever
``dtype`` is; matmuls run in ``dtype``; outputs are returned in ``dtype``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.attention import dot_product_attention
from sd_jax.models.policy import Policy, PolicyReads
from sd_jax.weights.convert import params_to_state_dict, state_dict_to_params
from sd_jax.weights.diffusers import read_config, read_state_dict, write_component
from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["CLIPTextConfig", "CLIPTextModel", "load", "save", "ACTIVATIONS"]



def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names used by CLIP text encoders. "gelu" is the exact (erf) GELU.
ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

_WITH_PROJECTION = "CLIPTextModelWithProjection"

# transformers' CLIPTextConfig defaults: a config.json missing a key means this value.
_HF_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048,
                    num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                    hidden_act="quick_gelu", layer_norm_eps=1e-5, bos_token_id=49406,
                    eos_token_id=49407, pad_token_id=1, projection_dim=512)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters of a CLIP text encoder (the defaults are SD 1.x's ViT-L/14 one).

    ``eos_token_id`` chooses the pooled token, as in transformers: ``2`` (the value the
    real SD 1.x/2.x configs carry, from before transformers PR #24773) pools at
    ``argmax(input_ids)``; any other value pools at the first ``input_ids == eos_token_id``.
    ``projection_dim`` is None for ``CLIPTextModel`` and the width of ``text_projection``
    for ``CLIPTextModelWithProjection``.
    """
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int | None = 0
    eos_token_id: int | None = 2
    pad_token_id: int | None = 1
    projection_dim: int | None = None
    # The text tower attends causally; CLIPVisionConfig (sd_jax.models.clip_vision) says
    # False, so the encoder modules below serve both towers.  Not a config.json field.
    causal: ClassVar[bool] = True

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} is not supported; "
                             f"use one of {', '.join(ACTIVATIONS)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"CLIP {name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.projection_dim is not None and self.projection_dim <= 0:
            raise ValueError(f"CLIP projection_dim must be positive or None, got {self.projection_dim!r}")

    # ---- variants -------------------------------------------------------------------
    @classmethod
    def sd15(cls, **overrides) -> "CLIPTextConfig":
        """SD 1.x: OpenAI CLIP ViT-L/14 text tower (123M parameters)."""
        return cls(**overrides)

    @classmethod
    def sd21(cls, **overrides) -> "CLIPTextConfig":
        """SD 2.x: OpenCLIP ViT-H/14 text tower with its last layer removed (23 of 24
        layers), so ``last_hidden_state`` is already the "penultimate layer" SD 2 uses."""
        return cls(**{**dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu"), **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "CLIPTextConfig":
        """A few-thousand-parameter encoder for tests."""
        return cls(**{**dict(vocab_size=1000, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4), **overrides})

    # ---- config.json ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """From a transformers ``CLIPTextConfig`` json (``text_encoder/config.json``).

        Missing keys take transformers' defaults.  A projection is assumed only when
        ``architectures`` names ``CLIPTextModelWithProjection`` (transformers writes a
        ``projection_dim`` into every CLIP text config); :func:`load` also detects it
        from the weights.
        """
        if d.get("model_type") == "clip" or "text_config" in d:
            raise CheckpointError("config.json describes a full CLIPModel (text + vision); sd-jax "
                                  "loads only a text encoder (model_type 'clip_text_model')")
        get = lambda k: d.get(k, _HF_DEFAULTS[k])  # noqa: E731
        proj = get("projection_dim") if _WITH_PROJECTION in (d.get("architectures") or ()) else None
        try:
            return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                       intermediate_size=get("intermediate_size"),
                       num_hidden_layers=get("num_hidden_layers"),
                       num_attention_heads=get("num_attention_heads"),
                       max_position_embeddings=get("max_position_embeddings"),
                       hidden_act=get("hidden_act"), layer_norm_eps=float(get("layer_norm_eps")),
                       bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
                       pad_token_id=get("pad_token_id"), projection_dim=proj)
        except ValueError as e:
            raise CheckpointError(f"invalid CLIP text config: {e}") from None

    def to_dict(self) -> dict:
        """A ``config.json`` that transformers' ``CLIPTextModel``/``...WithProjection`` loads."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        d["architectures"] = [_WITH_PROJECTION if self.projection_dim else "CLIPTextModel"]
        d["model_type"] = "clip_text_model"
        return d


# ---- modules --------------------------------------------------------------------------

def _layer_norm(name, eps, param_dtype):
    # float32 statistics, two-pass variance (CLIP's residual stream has large outlier channels).
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        c, p = self.config, self.policy
        b, l, _ = x.shape
        heads = c.num_attention_heads
        dense = lambda name: nn.Dense(c.hidden_size, dtype=p.dtype,  # noqa: E731
                                      param_dtype=p.param_dtype, name=name)
        q = dense("q_proj")(x).reshape(b, l, heads, -1)
        k = dense("k_proj")(x).reshape(b, l, heads, -1)
        v = dense("v_proj")(x).reshape(b, l, heads, -1)
        o = dot_product_attention(q, k, v, impl=p.attention, causal=c.causal,
                                  cpu_lowerings=p.cpu_lowerings)
        return dense("out_proj")(o.reshape(b, l, c.hidden_size))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        c, p = self.config, self.policy
        h = nn.Dense(c.intermediate_size, dtype=p.dtype, param_dtype=p.param_dtype, name="fc1")(x)
        h = ACTIVATIONS[c.hidden_act](h)
        return nn.Dense(c.hidden_size, dtype=p.dtype, param_dtype=p.param_dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block. ``x`` is the float32 residual stream."""
    config: CLIPTextConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        c, p = self.config, self.policy
        h = _layer_norm("layer_norm1", c.layer_norm_eps, p.param_dtype)(x).astype(p.dtype)
        x = x + CLIPAttention(c, p, name="self_attn")(h).astype(jnp.float32)
        h = _layer_norm("layer_norm2", c.layer_norm_eps, p.param_dtype)(x).astype(p.dtype)
        return x + CLIPMLP(c, p, name="mlp")(h).astype(jnp.float32)


class CLIPTextEmbeddings(nn.Module):
    """Token + position embeddings, float32 (only the parameters' dtype follows the policy)."""
    config: CLIPTextConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, input_ids):
        c, pd = self.config, self.policy.param_dtype
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=jnp.float32, param_dtype=pd,
                       name="token_embedding")
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=jnp.float32,
                       param_dtype=pd, name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, x):
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.policy, name=f"layers_{i}")(x)
            states.append(x)
        return states


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, input_ids, clip_skip=None):
        c, p = self.config, self.policy
        x = CLIPTextEmbeddings(c, p, name="embeddings")(input_ids)
        states = CLIPEncoder(c, p, name="encoder")(x)
        final_norm = _layer_norm("final_layer_norm", c.layer_norm_eps, p.param_dtype)
        last = final_norm(states[-1])
        if c.eos_token_id == 2 or c.eos_token_id is None:
            # Legacy configs (all real SD 1.x/2.x checkpoints): the EOS token has the highest id.
            idx = jnp.argmax(input_ids, axis=-1)
        else:
            idx = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, idx[:, None, None], axis=1)[:, 0]
        prompt = last if not clip_skip else final_norm(states[-(clip_skip + 1)])
        return last, tuple(states), pooled, prompt


class CLIPTextModel(PolicyReads, nn.Module):
    """transformers' ``CLIPTextModel`` (``config.projection_dim is None``) or
    ``CLIPTextModelWithProjection``.

    Attributes:
      config: the :class:`CLIPTextConfig`.
      policy: how it computes (:class:`sd_jax.models.policy.Policy`): ``dtype`` is the
        computation dtype of the matmuls and of the outputs, ``param_dtype`` the
        parameters' (for ``init``), ``attention`` an implementation name of
        :func:`sd_jax.models.attention.dot_product_attention`.  ``dtype``,
        ``param_dtype`` and ``attention`` read through to it.
    """
    config: CLIPTextConfig
    policy: Policy = Policy()

    @nn.compact
    def __call__(self, input_ids, *, clip_skip: int | None = None) -> dict:
        """Encode token ids.

        Args:
          input_ids: [B, L] integer ids, L <= ``max_position_embeddings``.
          clip_skip: diffusers' ``clip_skip`` (a static Python int): ``prompt_embeds`` is
            ``final_layer_norm(hidden_states[-(clip_skip + 1)])``; 1 = the penultimate
            layer.  None or 0: ``prompt_embeds`` is ``last_hidden_state``.
        Returns:
          ``last_hidden_state`` [B, L, D] (after ``final_layer_norm``);
          ``hidden_states``: tuple of ``num_hidden_layers + 1`` [B, L, D] arrays, the
          embeddings' output and each layer's (no final norm), as transformers'
          ``output_hidden_states``;
          ``pooler_output`` [B, D]: ``last_hidden_state`` at the EOS token;
          ``prompt_embeds`` [B, L, D]: what the UNet is conditioned on (see ``clip_skip``);
          ``text_embeds`` [B, projection_dim] (projection models only):
          ``text_projection(pooler_output)``.
        """
        c, p = self.config, self.policy
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens; the text encoder takes at "
                             f"most max_position_embeddings={c.max_position_embeddings}")
        if clip_skip is not None and not 0 <= clip_skip <= c.num_hidden_layers:
            raise ValueError(f"clip_skip must be in [0, {c.num_hidden_layers}] for a "
                             f"{c.num_hidden_layers}-layer text encoder, got {clip_skip}")
        last, states, pooled, prompt = CLIPTextTransformer(
            c, p, name="text_model")(input_ids, clip_skip)
        out = dict(last_hidden_state=last.astype(p.dtype),
                   hidden_states=tuple(s.astype(p.dtype) for s in states),
                   pooler_output=pooled.astype(p.dtype),
                   prompt_embeds=prompt.astype(p.dtype))
        if c.projection_dim:
            out["text_embeds"] = nn.Dense(c.projection_dim, use_bias=False, dtype=p.dtype,
                                          param_dtype=p.param_dtype,
                                          name="text_projection")(pooled.astype(p.dtype))
        return out

    @nn.nowrap
    def encode(self, params, input_ids, clip_skip: int | None = None):
        """``prompt_embeds`` [B, L, D] of ``input_ids`` (see ``__call__``); jit the caller."""
        return self.apply({"params": params}, jnp.asarray(input_ids), clip_skip=clip_skip)["prompt_embeds"]

    @nn.nowrap
    def init_params(self, rng, seq_len: int = 1):
        """Random parameters (the tree :func:`load` fills)."""
        return self.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]

    @nn.nowrap
    def param_shapes(self):
        """The parameter tree as ``jax.ShapeDtypeStruct`` (nothing is allocated)."""
        return jax.eval_shape(lambda: self.init_params(jax.random.key(0)))


# ---- checkpoints ----------------------------------------------------------------------

def _canonical_key(key: str) -> str | None:
    """Map both checkpoint forms onto ``text_model.*`` / ``text_projection.weight``."""
    if key.endswith("position_ids"):      # a buffer, not a parameter
        return None
    if key.startswith(("text_model.", "text_projection.")):
        return key
    return "text_model." + key


def load(folder: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla",
         policy: Policy | None = None, variant: str | None = None,
         allow_pickle: bool = False) -> tuple[CLIPTextModel, dict]:
    """Read a ``text_encoder/`` (or ``text_encoder_2/``) folder: ``config.json`` + weights.

    Args:
      folder: the component folder.
      dtype: computation dtype.
      param_dtype: dtype the parameters are stored in; None = ``dtype``.
      attention: attention implementation name.
      policy: the model's :class:`~sd_jax.models.policy.Policy`; None:
        ``Policy(dtype, param_dtype, attention)``.
      variant, allow_pickle: as :func:`sd_jax.weights.diffusers.read_state_dict`.
    Returns:
      ``(model, params)``; params are on the default device.
    Raises:
      CheckpointError: missing folder/files, or weights that do not match the config.
    """
    folder = os.fspath(folder)
    policy = policy or Policy(dtype, param_dtype, attention)
    if not os.path.isdir(folder):
        raise CheckpointError(f"text encoder folder {folder!r} not found")
    config = CLIPTextConfig.from_dict(read_config(folder))
    state_dict = read_state_dict(folder, variant=variant, allow_pickle=allow_pickle)
    proj = state_dict.get("text_projection.weight")
    if proj is not None and config.projection_dim is None:   # architectures did not say so
        config = dataclasses.replace(config, projection_dim=int(proj.shape[0]))
    model = CLIPTextModel(config, policy=policy)
    params = state_dict_to_params(state_dict, model.param_shapes(), what=f"text encoder ({folder})",
                                  rename=_canonical_key, dtype=policy.param_dtype)
    return model, jax.device_put(params)


_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
                np.dtype(jnp.bfloat16): "bfloat16"}


def save(folder: str | os.PathLike, config: CLIPTextConfig, params, dtype=None) -> None:
    """Write ``config.json`` + ``model.safetensors`` with ``text_model.``-prefixed keys (the
    layout of real SD checkpoints), loadable by transformers 4 and 5 and by :func:`load`.

    ``dtype``: cast the weights to this dtype (default: as they are).
    """
    state_dict = params_to_state_dict(params, dtype=dtype)
    cfg = config.to_dict()
    first = next(iter(state_dict.values()))
    cfg["dtype"] = cfg["torch_dtype"] = _DTYPE_NAMES.get(np.dtype(first.dtype), "float32")
    write_component(os.fspath(folder), cfg, state_dict, weights_name="model.safetensors")
