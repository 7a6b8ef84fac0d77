"""Model families: what a Stable Diffusion model is made of, in one registry.

A :class:`Family` (frozen) names its components (the networks, their Flax module and
config classes, where each is stored in a diffusers folder and in a single file), its
tokenizers, how a prompt is encoded, the ``model_index.json`` class names, its default
size and sampler, and the noise schedule it was trained with.  The loader
(:mod:`sd_jax.weights.loader`), the single-file converter
(:mod:`sd_jax.weights.single_file`), the pipeline and training read it from here;
adding a family (SDXL) is adding an entry (and its model code), not edits across them.

Entries: ``sd1`` (SD 1.x), ``sd2`` (SD 2.x), ``tiny`` (the SD 1.x architecture at
test / shapes-model size), ``sdxl`` (SDXL base: two text encoders, text-time UNet) and
``sdxl-refiner`` (the second text encoder only, aesthetic-score micro-conditioning).  Inpainting is not a family but a flag of a model (its UNet
takes 9 channels: latents + mask + masked-image latents), with its own pipeline class
name.

Which family a model is:

* a diffusers folder: :func:`detect` from ``model_index.json`` (``StableDiffusionXLPipeline``
  is SDXL) and the component configs (an OpenCLIP text encoder, ``hidden_act == "gelu"``, is SD 2.x);
* a single file: :func:`detect_single_file` from its keys (:class:`SingleFileLayout`);
* an sd-jax checkpoint: the ``"family"`` in its ``sd_jax.json`` (older ones: the configs).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from sd_jax.models import clip, unet, vae
from sd_jax.models.policy import Policy
from sd_jax.prompts.chunks import emphasis
from sd_jax.weights.convert import state_dict_to_params
from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["Component", "TokenizerSpec", "PromptEncoding", "SingleFileLayout", "Family", "Models", "FAMILIES",
           "SD1", "SD2", "TINY", "SDXL", "SDXL_REFINER", "get", "detect", "detect_single_file", "sd_scheduler_config",
           "sdxl_scheduler_config", "build_models", "params_from_state_dicts", "shapes_text_encoder_config", "shapes_unet_config",
           "shapes_vae_config"]

DIFFUSERS_VERSION = "0.42.1"


# =========================================================================== what a family is made of
@dataclasses.dataclass(frozen=True)
class Component:
    """One network of a family.

    ``name``: its folder in a diffusers model and its key in the params tree;
    ``library`` / ``class_name``: its ``model_index.json`` entry; ``module`` / ``config``:
    the Flax module and config classes; ``load(folder, **kw) -> (module, params)`` and
    ``save(folder, config, params)``: its diffusers-folder I/O (in the model file);
    ``param_shapes(module)``: its parameter tree as ``ShapeDtypeStruct``; ``rename``: maps
    other spellings of its state-dict keys onto the module's (None: keys as they are);
    ``fp16_upcast``: computes in float32 when float16 is asked for (SD's VAE overflows).
    """
    name: str
    library: str
    class_name: str
    module: type
    config: type
    load: Callable
    save: Callable
    param_shapes: Callable
    rename: Callable | None = None
    fp16_upcast: bool = False

    def compute_dtype(self, dtype):
        return jnp.float32 if self.fp16_upcast and jnp.dtype(dtype) == jnp.float16 else dtype

    def policy_for(self, policy: Policy) -> Policy:
        """The policy this component computes with: ``policy``, in float32 where it asks for
        float16 and the component has ``fp16_upcast`` (its parameters keep their dtype)."""
        dtype = self.compute_dtype(policy.dtype)
        return policy if dtype == policy.dtype else policy.replace(dtype=dtype)

    def make(self, config, policy: Policy):
        return self.module(config, policy=self.policy_for(policy))


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer folder of the family: ``name`` (folder), ``class_name`` (transformers class),
    ``pad_token`` (SD 1.x pads with ``<|endoftext|>``, SD 2.x with ``!``); ``cache_name``: the
    folder :func:`sd_jax.tokenizer.clip_tokenizer` caches it in (for single files, which have none)."""
    name: str = "tokenizer"
    library: str = "transformers"
    class_name: str = "CLIPTokenizer"
    pad_token: str = "<|endoftext|>"
    cache_name: str = "clip-vit-large-patch14"


@dataclasses.dataclass(frozen=True)
class PromptEncoding:
    """How token ids become the UNet's conditioning.

    ``encoders[i]`` reads the ids of ``tokenizers[i]``.  ``combine``: ``"single"`` (one
    encoder; SD 1.x/2.x) or ``"concat"`` (the hidden states of every encoder concatenated on
    the feature axis; SDXL).  ``hidden_state``: which hidden state is the context by default,
    ``"last"`` or ``"penultimate"``; diffusers' ``clip_skip`` picks an earlier one (SD 2.x's
    encoder already lacks OpenCLIP's last layer, so its ``"last"`` is OpenCLIP's
    penultimate).  ``pooled``: the encoder whose pooled, projected output is also
    conditioning (SDXL: ``"text_encoder_2"``), or None.
    """
    encoders: tuple[str, ...] = ("text_encoder",)
    tokenizers: tuple[str, ...] = ("tokenizer",)
    combine: str = "single"
    hidden_state: str = "last"
    pooled: str | None = None

    def encode(self, models, params, ids, clip_skip: int | None = None, weights=None):
        """``(context [B, L, D], pooled [B, P] or None)`` for ``ids`` (one int32 [B, L] per tokenizer).

        Runs inside the caller's jit; ``clip_skip`` is static.  ``weights``: optional float32
        [B, L] per tokenizer, A1111's emphasis applied to each encoder's output before they
        are combined (:func:`sd_jax.prompts.chunks.emphasis`).
        """
        if self.combine == "concat":
            return self._encode_concat(models, params, ids, clip_skip, weights)
        if self.combine != "single" or self.pooled is not None:
            raise NotImplementedError(f"prompt encoding {self.combine!r} (pooled: {self.pooled}) is not implemented")
        if isinstance(ids, (tuple, list)):
            (ids,) = ids
        skip = clip_skip
        if self.hidden_state == "penultimate":
            skip = (clip_skip or 0) + 1
        name = self.encoders[0]
        context = getattr(models, name).encode(params[name], ids, clip_skip=skip)
        if weights is not None:
            context = emphasis(context, weights[0] if isinstance(weights, (tuple, list)) else weights)
        return context, None

    def _encode_concat(self, models, params, ids, clip_skip, weights=None):
        """SDXL (diffusers' ``StableDiffusionXLPipeline.encode_prompt``): each encoder's
        ``hidden_states[-(clip_skip + 2)]`` (``"penultimate"``; ``[-(clip_skip + 1)]`` for
        ``"last"``), without the final layer norm, concatenated on the feature axis; the
        pooled embedding is ``self.pooled``'s ``text_embeds`` (its projected pooled output)."""
        ids = (ids,) if not isinstance(ids, (tuple, list)) else tuple(ids)
        if weights is not None and not isinstance(weights, (tuple, list)):  # one tokenizer (the refiner)
            weights = (weights,)
        if len(ids) != len(self.encoders):
            raise ValueError(f"prompt encoding takes {len(self.encoders)} id arrays (one per tokenizer), got {len(ids)}")
        back = (clip_skip or 0) + (2 if self.hidden_state == "penultimate" else 1)
        states, pooled = [], None
        for i, (name, x) in enumerate(zip(self.encoders, ids)):
            model = getattr(models, name)
            layers = model.config.num_hidden_layers
            if back > layers + 1:
                raise ValueError(f"clip_skip {clip_skip} is too large for the {layers}-layer {name}")
            out = model.apply({"params": params[name]}, jnp.asarray(x))
            states.append(out["hidden_states"][-back] if weights is None
                          else emphasis(out["hidden_states"][-back], weights[i]))
            if name == self.pooled:
                pooled = out["text_embeds"]
        return jnp.concatenate(states, axis=-1), pooled


@dataclasses.dataclass(frozen=True)
class SingleFileLayout:
    """Where a family's networks are in an original-layout (CompVis / A1111) single file.

    ``prefixes``: component -> key prefix; ``text_layout``: the text encoder's layout,
    ``"clip"`` (transformers' names) or ``"openclip"`` (a ``text_encoder_2``, SDXL's, is
    always OpenCLIP with its projection); ``marker``: a key only this family
    has (how :func:`detect_single_file` tells families apart); ``unet_heads``: how many
    attention heads the UNet has (they are not in the weights): ``"8"`` (8 per level, SD 1.x)
    or ``"64ch"`` (64-channel heads, SD 2.x).  The key tables themselves (resnets,
    attention, OpenCLIP blocks) are in :mod:`sd_jax.weights.single_file`.
    """
    prefixes: Mapping[str, str]
    text_layout: str
    marker: str
    unet_heads: str


_SD_INDEX_EXTRAS = {"safety_checker": [None, None], "feature_extractor": [None, None],
                    "image_encoder": [None, None], "requires_safety_checker": False}
_SDXL_INDEX_EXTRAS = {"feature_extractor": [None, None], "image_encoder": [None, None]}


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""
    name: str
    description: str
    components: tuple[Component, ...]
    tokenizers: tuple[TokenizerSpec, ...]
    prompt: PromptEncoding
    pipeline_class: str
    inpaint_pipeline_class: str | None
    single_file: SingleFileLayout | None
    default_size: int
    default_sampler: str
    text_hidden_act: str                      # the text encoder's activation (tells SD 1.x from SD 2.x)
    variants: Mapping[str, Callable[[], dict]] = dataclasses.field(default_factory=dict)
    # model_index.json's other entries (absent optional components, fixed flags)
    index_extras: Mapping[str, Any] = dataclasses.field(default_factory=lambda: dict(_SD_INDEX_EXTRAS))
    # pipeline options a model_index.json may set, with their defaults (:meth:`pipeline_options`)
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # its images get the invisible watermark by default (diffusers' SDXL pipelines; sd_jax.watermark)
    watermark: bool = False

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"family {self.name} has no component {name!r}")

    def folders(self) -> tuple[str, ...]:
        """The sub-folders of a diffusers model of this family."""
        return self.component_names + tuple(t.name for t in self.tokenizers) + ("scheduler",)

    def pipeline_class_name(self, inpainting: bool = False) -> str:
        if inpainting:
            if self.inpaint_pipeline_class is None:
                raise ValueError(f"family {self.name} has no inpainting pipeline")
            return self.inpaint_pipeline_class
        return self.pipeline_class

    def pipeline_options(self, model_index: Mapping[str, Any] | None = None) -> dict:
        """The pipeline options (``model_index.json`` entries that are not components, e.g.
        SDXL's ``force_zeros_for_empty_prompt``): this family's defaults, overridden by
        ``model_index`` where it has them."""
        return {k: (model_index or {}).get(k, v) for k, v in self.options.items()}

    def model_index(self, scheduler_class: str, inpainting: bool = False, options: Mapping[str, Any] | None = None) -> dict:
        """The ``model_index.json`` of a diffusers folder of this family (``options``: see
        :meth:`pipeline_options`)."""
        index: dict[str, Any] = {"_class_name": self.pipeline_class_name(inpainting),
                                 "_diffusers_version": DIFFUSERS_VERSION}
        for c in self.components:
            index[c.name] = [c.library, c.class_name]
        for t in self.tokenizers:
            index[t.name] = [t.library, t.class_name]
        index["scheduler"] = ["diffusers", scheduler_class]
        index.update(self.index_extras)
        index.update(self.pipeline_options(options))
        return index

    def configs(self, variant: str | None = None) -> dict:
        """The component configs of a named variant (default: the first)."""
        if not self.variants:
            raise ValueError(f"family {self.name} has no preset variants")
        name = variant or next(iter(self.variants))
        if name not in self.variants:
            raise ValueError(f"family {self.name} has no variant {name!r}; use one of {', '.join(self.variants)}")
        return self.variants[name]()


@dataclasses.dataclass(frozen=True)
class Models:
    """The networks (Flax modules, hashable) of a pipeline (``text_encoder_2``: SDXL's second
    text encoder, None for the families that have one; ``text_encoder``: None for the SDXL
    refiner, which has only the second)."""
    text_encoder: Any = None
    unet: Any = None
    vae: Any = None
    text_encoder_2: Any = None

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# =========================================================================== presets
def sd_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The SD 1.x/2.x training noise schedule as a ``scheduler_config.json`` dict (the SD 1.5
    repository's PNDM one; DDIM, as stabilityai/stable-diffusion-2-1 ships, for v-prediction)."""
    v = prediction_type == "v_prediction"
    return {"_class_name": "DDIMScheduler" if v else "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "num_train_timesteps": 1000, "prediction_type": prediction_type, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


def shapes_text_encoder_config(vocab_size: int = 873, **overrides) -> clip.CLIPTextConfig:
    """The shapes model's text encoder: 4 layers of width 128, 77 positions (0.91M parameters, 3.7 MB)."""
    base = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    base.update(overrides)
    return clip.CLIPTextConfig(**base)


def shapes_unet_config(sample_size: int = 16, latent_channels: int = 4, cross_attention_dim: int = 128,
                       **overrides) -> unet.UNetConfig:
    """The shapes model's UNet: 3 levels (16x16, 8x8, 4x4 latents), widths 32/64/128, one
    ResNet per level, cross-attention (4 heads) at the two lower levels and in the middle
    (4.2M parameters, 17 MB: with the VAE and text encoder the model is 23 MB in float32; the
    shipped model's UNet is this with widths 64/64/128, ``train diffusion --unet-widths``: 4.7M)."""
    base = dict(sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
                block_out_channels=(32, 64, 128), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=16, cross_attention_dim=cross_attention_dim, attention_head_dim=4)
    base.update(overrides)
    return unet.UNetConfig(**base)


def shapes_vae_config(**overrides) -> vae.VAEConfig:
    """The shapes model's VAE: 64x64 -> 16x16x4 (downscale 4), widths 16/32/64, one ResNet
    per level, attention in the middle (0.68M parameters, 2.7 MB in float32)."""
    base = dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                sample_size=64, scaling_factor=1.0)
    base.update(overrides)
    return vae.VAEConfig(**base)


# =========================================================================== the entries
_SD_COMPONENTS = (
    Component("text_encoder", "transformers", "CLIPTextModel", clip.CLIPTextModel, clip.CLIPTextConfig,
              load=clip.load, save=clip.save, param_shapes=lambda m: m.param_shapes(), rename=clip._canonical_key),
    Component("unet", "diffusers", "UNet2DConditionModel", unet.UNet2DConditionModel, unet.UNetConfig,
              load=unet.load, save=unet.save, param_shapes=lambda m: m.param_shapes()),
    Component("vae", "diffusers", "AutoencoderKL", vae.AutoencoderKL, vae.VAEConfig,
              load=vae.load, save=vae.save, param_shapes=vae.param_shapes, rename=vae.canonical_key,
              fp16_upcast=True),
)

_LDM = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}

SD1 = Family(
    name="sd1", description="Stable Diffusion 1.x (OpenAI CLIP ViT-L/14 text encoder)",
    components=_SD_COMPONENTS, tokenizers=(TokenizerSpec(),), prompt=PromptEncoding(),
    pipeline_class="StableDiffusionPipeline", inpaint_pipeline_class="StableDiffusionInpaintPipeline",
    single_file=SingleFileLayout(prefixes={**_LDM, "text_encoder": "cond_stage_model.transformer."},
                                 text_layout="clip", marker="cond_stage_model.transformer.", unet_heads="8"),
    default_size=512, default_sampler="pndm", text_hidden_act="quick_gelu",
    variants={"sd15": lambda: {"text_encoder": clip.CLIPTextConfig.sd15(), "unet": unet.UNetConfig.sd15(),
                               "vae": vae.VAEConfig.sd15(), "scheduler": sd_scheduler_config("epsilon")},
              "sd15-inpaint": lambda: {"text_encoder": clip.CLIPTextConfig.sd15(),
                                       "unet": unet.UNetConfig.sd15_inpaint(), "vae": vae.VAEConfig.sd15(),
                                       "scheduler": sd_scheduler_config("epsilon")}},
)

SD2 = Family(
    name="sd2", description="Stable Diffusion 2.x (OpenCLIP ViT-H/14 text encoder, penultimate layer)",
    components=_SD_COMPONENTS, tokenizers=(TokenizerSpec(pad_token="!", cache_name="sd2-openclip"),), prompt=PromptEncoding(),
    pipeline_class="StableDiffusionPipeline", inpaint_pipeline_class="StableDiffusionInpaintPipeline",
    single_file=SingleFileLayout(prefixes={**_LDM, "text_encoder": "cond_stage_model.model."},
                                 text_layout="openclip", marker="cond_stage_model.model.token_embedding.weight",
                                 unet_heads="64ch"),
    default_size=768, default_sampler="ddim", text_hidden_act="gelu",
    variants={"sd21": lambda: {"text_encoder": clip.CLIPTextConfig.sd21(), "unet": unet.UNetConfig.sd21(),
                               "vae": vae.VAEConfig.sd15(), "scheduler": sd_scheduler_config("v_prediction")}},
)

# The SD 1.x architecture at the sizes of the tests (``test``) and of the shipped shapes
# model (``shapes``, trained by :mod:`sd_jax.train`); its tokenizer is the shapes one
# (:mod:`sd_jax.data.tokenizer`).  Never detected: a tiny diffusers folder is ``sd1``.
TINY = dataclasses.replace(
    SD1, name="tiny", description="the SD 1.x architecture, tiny (tests, the shapes model)",
    single_file=None, default_size=64, default_sampler="dpmpp_2m",
    variants={"test": lambda: {"text_encoder": clip.CLIPTextConfig.tiny(), "unet": unet.UNetConfig.tiny(),
                               "vae": vae.VAEConfig.tiny()},
              "shapes": lambda: {"text_encoder": shapes_text_encoder_config(), "unet": shapes_unet_config(),
                                 "vae": shapes_vae_config()}},
)

def sdxl_scheduler_config() -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's ``scheduler_config.json`` (Euler, leading)."""
    return {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
            "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
            "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}


_TEXT_ENCODER_2 = dataclasses.replace(_SD_COMPONENTS[0], name="text_encoder_2",
                                      class_name="CLIPTextModelWithProjection")

# SDXL base: CLIP ViT-L (text_encoder) and OpenCLIP bigG with projection (text_encoder_2),
# their penultimate hidden states concatenated, the pooled projection of the second as
# the UNet's added text embedding.  Detected from model_index.json's class name.
SDXL = Family(
    name="sdxl", description="Stable Diffusion XL (CLIP ViT-L + OpenCLIP bigG text encoders, 1024 px)",
    components=(_SD_COMPONENTS[0], _TEXT_ENCODER_2) + _SD_COMPONENTS[1:],
    tokenizers=(TokenizerSpec(), TokenizerSpec(name="tokenizer_2", pad_token="!", cache_name="sdxl-openclip")),
    prompt=PromptEncoding(encoders=("text_encoder", "text_encoder_2"), tokenizers=("tokenizer", "tokenizer_2"),
                          combine="concat", hidden_state="penultimate", pooled="text_encoder_2"),
    pipeline_class="StableDiffusionXLPipeline", inpaint_pipeline_class="StableDiffusionXLInpaintPipeline",
    single_file=SingleFileLayout(prefixes={**_LDM, "text_encoder": "conditioner.embedders.0.transformer.",
                                           "text_encoder_2": "conditioner.embedders.1.model."},
                                 text_layout="clip", marker="conditioner.embedders.1.model.", unet_heads="64ch"),
    default_size=1024, default_sampler="euler", text_hidden_act="quick_gelu",
    index_extras=_SDXL_INDEX_EXTRAS, options={"force_zeros_for_empty_prompt": True}, watermark=True,
)

_REFINER_INDEX_EXTRAS = {"text_encoder": [None, None], "tokenizer": [None, None], **_SDXL_INDEX_EXTRAS}

# SDXL refiner: OpenCLIP bigG alone (its penultimate state, 1280 wide, is the context; the
# first tokenizer is absent, so it reads the prompt, not prompt_2, as diffusers' zip of
# [prompt, prompt_2] with [tokenizer_2] does), a UNet whose micro-conditioning is
# (original size, crop, aesthetic score).  An img2img pipeline (StableDiffusionXLImg2ImgPipeline
# with null text_encoder / tokenizer in model_index.json).
SDXL_REFINER = Family(
    name="sdxl-refiner", description="Stable Diffusion XL refiner (OpenCLIP bigG text encoder, aesthetic score)",
    components=(_TEXT_ENCODER_2,) + _SD_COMPONENTS[1:], tokenizers=SDXL.tokenizers[1:],
    prompt=PromptEncoding(encoders=("text_encoder_2",), tokenizers=("tokenizer_2",), combine="concat",
                          hidden_state="penultimate", pooled="text_encoder_2"),
    pipeline_class="StableDiffusionXLImg2ImgPipeline", inpaint_pipeline_class="StableDiffusionXLInpaintPipeline",
    single_file=None, default_size=1024, default_sampler="euler", text_hidden_act="gelu",
    index_extras=_REFINER_INDEX_EXTRAS,
    options={"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True},
    watermark=True,  # diffusers' StableDiffusionXLImg2ImgPipeline marks its images too
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, TINY, SDXL, SDXL_REFINER)}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


# =========================================================================== detection
_UNSUPPORTED_PIPELINES = {"XLInstructPix2Pix": "SDXL InstructPix2Pix", "Flux": "Flux", "StableDiffusion3": "SD 3", "Kandinsky": "Kandinsky"}


_SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")


def detect(configs: Mapping[str, Any], model_index: Mapping[str, Any] | None = None,
           where: str = "model") -> Family:
    """The family of a diffusers model from its ``model_index.json`` and component configs.

    ``configs``: component -> ``config.json`` dict (or config dataclass).  Raises
    CheckpointError (one line) for a pipeline of a family sd-jax does not have.
    """
    # a ControlNet pipeline's folder is its base pipeline's plus controlnet/ (read by the loader)
    cls = str((model_index or {}).get("_class_name", "")).replace("ControlNet", "")
    for marker, what in _UNSUPPORTED_PIPELINES.items():
        if marker in cls:
            raise CheckpointError(f"{where} is a {what} model ({cls}); sd-jax loads Stable Diffusion 1.x/2.x "
                                  f"and SDXL (base, refiner, img2img, inpainting)")
    if cls in _SDXL_PIPELINES:
        # the refiner has no first text encoder (model_index.json: "text_encoder": [null, null])
        te = (model_index or {}).get("text_encoder")
        return SDXL_REFINER if cls != SDXL.pipeline_class and not (te and te[0]) else SDXL
    if "XL" in cls:
        raise CheckpointError(f"{where} is an SDXL pipeline sd-jax does not load yet ({cls}); "
                              f"it loads the StableDiffusionXL, -Img2Img and -Inpaint pipelines' folders")
    te = configs.get("text_encoder")
    act = te.get("hidden_act") if isinstance(te, Mapping) else getattr(te, "hidden_act", None)
    return SD2 if act == SD2.text_hidden_act else SD1


def detect_single_file(keys) -> Family | None:
    """The family whose single-file text encoder is among ``keys``, or None.

    Markers are key prefixes; when several match, the later entry wins (it is the more
    specific: a file with both text encoders' keys is read as SD 2.x, as diffusers does).
    """
    keys = list(keys)
    found = None
    for f in FAMILIES.values():
        if f.single_file is not None and any(k.startswith(f.single_file.marker) for k in keys):
            found = f
    return found


# =========================================================================== building
def build_models(family: Family, configs: Mapping[str, Any], *, policy: Policy | None = None,
                 dtype=jnp.float32, param_dtype=None, attention: str = "xla") -> Models:
    """The family's Flax modules from its component configs (dicts or config dataclasses),
    computing as ``policy`` says (None: ``Policy(dtype, param_dtype, attention)``; see
    :meth:`Component.policy_for`)."""
    policy = policy or Policy(dtype, param_dtype, attention)
    mods = {}
    for c in family.components:
        cfg = configs[c.name]
        cfg = cfg if isinstance(cfg, c.config) else c.config.from_dict(cfg)
        mods[c.name] = c.make(cfg, policy)
    return Models(**mods)


def params_from_state_dicts(family: Family, models: Models, state_dicts: Mapping[str, Mapping],
                            param_dtype=None) -> dict:
    """``{component: params}`` from diffusers-layout state dicts, every key and shape checked."""
    out = {}
    for c in family.components:
        module = getattr(models, c.name)
        out[c.name] = state_dict_to_params(state_dicts[c.name], c.param_shapes(module), what=c.name,
                                           rename=c.rename, dtype=param_dtype or module.param_dtype)
    return out
