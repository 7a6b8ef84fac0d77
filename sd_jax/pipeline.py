"""Prompt -> pixels as one compiled function: encode text, denoise with ``lax.scan``, decode.

``StableDiffusionPipeline.from_pretrained(path)`` loads a diffusers folder or an sd-jax
(orbax) checkpoint; calling the pipeline returns PIL images.  Everything between
token ids and uint8 pixels runs inside one ``jax.jit``:

* prompts, negative prompts, seeds, guidance scale and guidance rescale are traced
  arrays, so changing them never recompiles;
* steps, size, batch size, scheduler and the img2img start step are static: each
  combination compiles once and is cached in the process (and on disk by JAX's
  persistent compilation cache when :func:`enable_compilation_cache` is on);
* the batch is split over every device of a ``jax.sharding.Mesh`` (parameters
  replicated), padded up to a multiple of the device count;
* every sample's noise comes from its own seed (``fold_in(key(seed), step)``), so an
  image depends on its prompt, seed and settings, not on its batch position or the other
  prompts in its batch (bit for bit at the same batch size on the same devices; another
  batch size or device count can move a pixel by a grey level, from the order in which
  XLA sums some reductions: README, "Several devices and hosts").
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import families, memory, sharding
from sd_jax.lora import LoraSet
from sd_jax.lora import prompts as lora_prompts
from sd_jax.control import keep_table, load_control_image
from sd_jax.diffusion.denoisers import (Conditioning, classifier_free_guidance, controlnet_residuals,
                                        guidance_window, unet_denoiser)
from sd_jax.diffusion.samplers import SchedulerConfig, make_sampler
from sd_jax.models.embeddings import get_guidance_scale_embedding
from sd_jax.diffusion.sampling import sample, step_range
from sd_jax.models import vae_tiling
from sd_jax.families import Models  # noqa: F401  (re-exported: the pipeline's networks)
from sd_jax.models import controlnet as controlnet_model
from sd_jax.micro_conditioning import add_time_ids, time_id_rows
from sd_jax.prompts import editing, embeddings
from sd_jax.prompts.chunks import count_chunks, prompt_arrays
from sd_jax.request import (GUIDANCE_WINDOW, Control, Dispatcher, GenerationRequest, RequestError,
                            resolve_guidance_window)
from sd_jax.models import safety_checker as safety
from sd_jax.models.policy import Policy
from sd_jax.tokenizer import tokenize
from sd_jax.watermark import apply_watermark, applies as watermark_applies
from sd_jax.weights import loader

OUTPUTS = ("uint8", "float32", "latent")
# GenerationRequest fields that __call__ takes by their diffusers names, the same for every image
SDXL_ARGUMENTS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                  "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                  "negative_aesthetic_score", "denoising_start", "denoising_end",
                  "timestep_spacing")  # (not SDXL's alone: any sampler's spacing, e.g. "trailing")

def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache so a second process starts fast."""
    path = path or os.environ.get("SD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sd_jax", "xla"))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@dataclasses.dataclass(frozen=True)
class Plan:
    """The static settings of one compiled generation (each distinct Plan compiles once).

    sampler: the :class:`~sd_jax.diffusion.samplers.Sampler` (steps, schedule, config).
    start, end: the sampler steps to run (img2img's strength, ``denoising_start/_end``).
    mode: ``"txt2img"``, ``"img2img"`` or ``"inpaint"``.
    guidance: whether classifier-free guidance runs (any sample's scale > 1): without it
      the UNet runs once per step on the batch and negative prompts are not encoded.
    clip_skip: diffusers' ``clip_skip`` (None = last layer).
    latent_shape: (h, w, C) of one sample's latents.
    output: ``"uint8"`` [B, H, W, 3], ``"float32"`` [B, H, W, 3] in [0, 1], or ``"latent"``
      (the final latents [B, h, w, C], not decoded: for a second model to continue from).
    loop: ``"scan"``, ``"python"`` (compiled, unrolled) or ``"debug"`` (not compiled).
    given_noise: the initial noise comes with the request (``latents``) instead of its seed.
    prompt_chunks: 75-token chunks per prompt (A1111 syntax: long prompts; 1 in plain syntax).
    emphasis: A1111 emphasis weights are applied (``prompt_syntax="a1111"``; traced weights).
    prompt_variants: texts per prompt from prompt editing / alternation (``[a:b:5]``, ``[a|b]``),
      all encoded; a traced per-step index picks one (:mod:`sd_jax.prompts.editing`).
    controlnets: the ControlNets that steer it, ``(index in pipe.controlnets, ControlNetConfig)``
      each, in the order their residuals are summed; guess_mode: diffusers' ``guess_mode``.
    vae_tile: the VAE decodes/encodes in tiles of this many latents (None: untiled); set per
      batch size from ``pipe.vae_tiling`` (:func:`sd_jax.memory.pipeline_vae_tile`).
    safety: the safety checker run on the decoded images, with its action on flagged ones
      (:class:`sd_jax.models.safety_checker.SafetyChecker`), or None; with one, the output is
      ``(images, nsfw bool [B])``.
    add_noise: img2img noises the image's latents to step ``start`` (strength); False: they are
      taken as they are (diffusers' ``denoising_start``: latents handed over part-denoised).
    image_latents: the init image comes as latents (``batch["image_latents"]``, a base
      model's output in an ensemble) instead of pixels to encode.
    """
    sampler: Any
    start: int
    end: int
    mode: str
    guidance: bool
    clip_skip: int | None
    latent_shape: tuple
    output: str = "uint8"
    loop: str = "scan"
    given_noise: bool = False
    watermark: bool = False      # SDXL's invisible watermark on the decoded images (sd_jax.watermark)
    prompt_chunks: int = 1
    emphasis: bool = False
    prompt_variants: int = 1
    controlnets: tuple = ()
    guess_mode: bool = False
    vae_tile: int | None = None
    safety: Any = None
    add_noise: bool = True
    image_latents: bool = False
    preview: Any = None          # per-step host callbacks (sd_jax.serve.preview.PlanHook), or None


def encode_prompt(models: Models, encoding: families.PromptEncoding, params, ids, clip_skip, time_ids=None,
                  zero=None, weights=None) -> Conditioning:
    """Token ids int32 [B, 77] (a tuple of them, one per tokenizer, for SDXL) -> Conditioning,
    as the model family combines its encoders.

    time_ids: float32 [B, K] micro-conditioning (SDXL), or None.  zero: optional bool [B]:
    samples whose context and pooled embedding are zeros (SDXL's
    ``force_zeros_for_empty_prompt`` for an empty negative prompt; traced, per sample).
    weights: optional float32 [B, N * 77] (one per tokenizer, as ids): A1111 emphasis; ids of
    N * 77 tokens are N chunks, encoded separately and concatenated (the pooled embedding is
    the first chunk's, as A1111 and compel), :mod:`sd_jax.prompts.chunks`."""
    context, pooled = _encode_chunks(models, encoding, params, ids, clip_skip, weights)
    if zero is not None:
        context = jnp.where(zero[:, None, None], jnp.zeros_like(context), context)
        pooled = None if pooled is None else jnp.where(zero[:, None], jnp.zeros_like(pooled), pooled)
    dtype = models.unet.dtype
    return Conditioning(context=context.astype(dtype), pooled=None if pooled is None else pooled.astype(dtype),
                        time_ids=time_ids)


def _encode_chunks(models: Models, encoding: families.PromptEncoding, params, ids, clip_skip, weights):
    """ids [B, N * 77] -> each chunk encoded as its own sample -> context [B, N * 77, D]."""
    one = ids[0] if isinstance(ids, (tuple, list)) else ids
    b, length = one.shape
    n = length // 77 if length % 77 == 0 else 1
    rows = lambda x: None if x is None else (tuple(v.reshape(b * n, -1) for v in x) if isinstance(x, (tuple, list))
                                             else x.reshape(b * n, -1))
    context, pooled = encoding.encode(models, params, rows(ids), clip_skip, rows(weights))
    context = context.reshape(b, -1, context.shape[-1])
    pooled = None if pooled is None else pooled.reshape(b, n, -1)[:, 0]
    return context, pooled


def ids_key(i: int, negative: bool = False) -> str:
    """The batch key of tokenizer ``i``'s ids: ``ids``, ``ids_2``, ... (``neg_ids``, ``neg_ids_2``, ...)."""
    return ("neg_" if negative else "") + ("ids" if i == 0 else f"ids_{i + 1}")


def _batch_ids(encoding: families.PromptEncoding, batch, negative: bool = False, what: str = "ids"):
    keys = [ids_key(i, negative).replace("ids", what) for i in range(len(encoding.tokenizers))]
    if keys[0] not in batch:
        return None
    return batch[keys[0]] if len(keys) == 1 else tuple(batch[k] for k in keys)


def vae_encode(models: Models, params, images, tile: int | None = None):
    """float32 [B, H, W, 3] in [-1, 1] -> latents in the diffusion model's space (in tiles of
    ``tile`` latents: :mod:`sd_jax.models.vae_tiling`).

    The distribution's mean, not a sample: a trained VAE's std is ~1e-3 of the latent scale."""
    if tile:
        mean, _ = vae_tiling.encode(models.vae, params["vae"], images.astype(models.vae.dtype), tile)
    else:
        mean, _ = models.vae.apply({"params": params["vae"]}, images.astype(models.vae.dtype), method="encode")
    return models.vae.config.scale_latents(mean.astype(jnp.float32))


def vae_decode(models: Models, params, latents, output: str = "float32", watermark: bool = False,
               tile: int | None = None):
    """Latents [B, h, w, C] -> images [B, H, W, 3]: float32 in [0, 1], or uint8 (``output="uint8"``);
    ``watermark``: marked as diffusers' SDXL pipelines do (:func:`sd_jax.watermark.apply_watermark`);
    in tiles of ``tile`` latents (:mod:`sd_jax.models.vae_tiling`) when given."""
    z = models.vae.config.unscale_latents(latents).astype(models.vae.dtype)
    img = (vae_tiling.decode(models.vae, params["vae"], z, tile) if tile else
           models.vae.apply({"params": params["vae"]}, z, method="decode"))
    if watermark:
        img = apply_watermark(img)
    img = jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(img * 255).astype(jnp.uint8) if output == "uint8" else img


def _generate(models: Models, encoding: families.PromptEncoding, plan: Plan, params, batch):
    """The whole generation for one static :class:`Plan`.

    batch (all leading dim B, batch-sharded):
      ids, neg_ids: int32 [B, 77] (neg_ids only with guidance);  ids_2, neg_ids_2: the second
      tokenizer's (SDXL);  time_ids, neg_time_ids: float32 [B, K] (SDXL's micro-conditioning;
      neg_time_ids with guidance);
      neg_zero: bool [B] (SDXL, ``force_zeros_for_empty_prompt``: a zero negative conditioning);
      seeds: uint32 [B];
      guidance, rescale: float32 [B];  latents: optional float32 [B, h, w, C] initial noise
      (replaces the seeded noise);  image: float32 [B, H, W, 3] in [-1, 1] (img2img, inpaint);
      mask: float32 [B, H, W, 1], 1 = repaint.
      A1111 syntax: ids of [B, K * N * 77] (K texts of N chunks), ``weights`` / ``neg_weights``
      (``weights_2``, ...) float32 like the ids; prompt_steps, neg_prompt_steps: int32 [B, S]
      (K > 1: the text of each step).
    Returns the output of ``plan.output`` for every sample.
    """
    sampler = plan.sampler
    keys = jax.vmap(jax.random.key)(batch["seeds"])
    noise_at = lambda step: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), plan.latent_shape))(keys)
    noise0 = batch["latents"].astype(jnp.float32) if "latents" in batch else noise_at(0)

    time_ids = batch.get("time_ids")
    k = plan.prompt_variants

    def encode(negative: bool):
        ids, w = _batch_ids(encoding, batch, negative), _batch_ids(encoding, batch, negative, "weights")
        zero = batch.get("neg_zero") if negative else None
        skip = None if negative else plan.clip_skip  # diffusers: clip_skip on the prompt only, not the negative
        tids = batch.get("neg_time_ids", time_ids) if negative else time_ids
        if k == 1:
            return encode_prompt(models, encoding, params, ids, skip, tids, zero, w)
        rows = lambda x: None if x is None else jax.tree.map(lambda a: a.reshape(a.shape[0] * k, -1), x)  # noqa: E731
        c = encode_prompt(models, encoding, params, rows(ids), skip, None,
                          None if zero is None else jnp.repeat(zero, k), rows(w))
        return editing.stack(c, k).replace(time_ids=tids)

    if plan.guidance and k == 1 and plan.clip_skip is None:
        cond, uncond = _encode_pair(models, encoding, params, batch, time_ids)
    else:
        cond = encode(False)
        uncond = encode(True) if plan.guidance else None
    proj = models.unet.config.time_cond_proj_dim
    if proj:  # LCM-distilled UNet: guidance as an embedding of w = scale - 1 (LatentConsistencyModelPipeline)
        w = get_guidance_scale_embedding(batch["guidance"].astype(jnp.float32) - 1.0, proj)
        cond = cond.replace(timestep_cond=w.astype(models.unet.dtype))

    blend = None  # (x, i) -> x after each step: inpainting with an ordinary UNet
    if plan.mode == "txt2img":
        x = noise0 * sampler.init_noise_sigma
    else:
        image_latents = (batch["image_latents"].astype(jnp.float32) if plan.image_latents
                         else vae_encode(models, params, batch["image"], plan.vae_tile))
        if plan.mode == "inpaint" and plan.start == 0:
            x = noise0 * sampler.init_noise_sigma
        elif not plan.add_noise:
            x = image_latents
        else:
            x = sampler.add_noise(image_latents, noise0, plan.start)
    if plan.mode == "inpaint":
        m = batch["mask"]
        h, w = plan.latent_shape[:2]
        # diffusers resizes the mask with nearest-neighbour interpolation to the latent grid.
        mask_lat = m[:, ::m.shape[1] // h, ::m.shape[2] // w, :]
        if models.unet.config.in_channels == 9:  # the inpainting UNet sees mask and masked image
            masked = vae_encode(models, params, batch["image"] * (m < 0.5), plan.vae_tile)
            extra = jnp.concatenate([mask_lat, masked], axis=-1).astype(models.unet.dtype)
            cond = cond.replace(concat=extra)
            uncond = uncond.replace(concat=extra) if uncond is not None else None
        else:  # an ordinary UNet: keep the known region on the image's own noisy trajectory
            n = sampler.num_steps

            def blend(x, i):
                nxt = jnp.minimum(i + 1, n - 1)
                known = jnp.where(i < n - 1, sampler.add_noise(image_latents, noise0, nxt), image_latents)
                return (1 - mask_lat) * known + mask_lat * x

    residuals = None
    if plan.controlnets:  # diffusers' StableDiffusion(XL)ControlNet*Pipeline
        control = {"image": tuple(batch[f"control_{j}"] for j in range(len(plan.controlnets))),
                   "scale": batch["control_scale"], "keep": batch["control_keep"]}
        cond = cond.replace(control=control)
        if uncond is not None:  # guess mode: the ControlNets steer the conditional half only
            uncond = uncond.replace(control={**control, "scale": control["scale"] * (0.0 if plan.guess_mode else 1.0)})
        nets = [controlnet_model.ControlNetModel(cfg, policy=models.unet.policy) for _, cfg in plan.controlnets]
        residuals = controlnet_residuals(nets, [params["controlnets"][j] for j, _ in plan.controlnets],
                                         plan.guess_mode)
    make = lambda c: unet_denoiser(models.unet, params["unet"], c, residuals)  # noqa: E731
    guided = lambda c, u: (classifier_free_guidance(make, c, u, batch["guidance"], batch["rescale"],  # noqa: E731
                                                    batch.get("guidance_window"))
                           if plan.guidance else make(c))
    model_fn = (guided(cond, uncond) if k == 1 else
                editing.per_step(guided, cond, uncond, batch["prompt_steps"], batch.get("neg_prompt_steps")))
    if plan.preview is not None:  # the server's step progress / live preview (reads x only)
        blend = plan.preview.post_step(blend, sampler, plan)
    x, _ = sample(model_fn, sampler, x, start=plan.start, end=plan.end, noise_fn=noise_at,
                  post_step=blend, loop="python" if plan.loop == "debug" else plan.loop)
    if plan.output == "latent":
        return x
    images = vae_decode(models, params, x, plan.output, plan.watermark, plan.vae_tile)
    return images if plan.safety is None else plan.safety(params["safety_checker"], images)


def _encode_pair(models: Models, encoding: families.PromptEncoding, params, batch, time_ids):
    """(cond, uncond): the prompts and the negative prompts encoded by one text-encoder call
    on [negatives; prompts] rows, so the text encoders are traced and compiled once, not twice
    (each row is encoded on its own: the same as two calls).  Without ``clip_skip`` only: the
    negative prompt never takes it (diffusers)."""
    b = batch["seeds"].shape[0]
    both = lambda what: jax.tree.map(lambda n, p: jnp.concatenate([n, p]),  # noqa: E731
                                     _batch_ids(encoding, batch, True, what), _batch_ids(encoding, batch, False, what))
    weights = both("weights") if _batch_ids(encoding, batch, False, "weights") is not None else None
    zero = batch.get("neg_zero")
    zero = None if zero is None else jnp.concatenate([zero, jnp.zeros_like(zero)])
    c = encode_prompt(models, encoding, params, both("ids"), None, None, zero, weights)
    half = lambda lo: jax.tree.map(lambda a: a[lo:lo + b], c)  # noqa: E731
    return half(b).replace(time_ids=time_ids), half(0).replace(time_ids=batch.get("neg_time_ids", time_ids))


def img2img_start(num_inference_steps: int, strength: float, order: int = 1) -> int:
    """First scan index for img2img/inpaint, as diffusers' ``get_timesteps``."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    init = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init, 0) * order


def _to_list(x, n, name):
    if x is None or isinstance(x, (str, int, float)):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise ValueError(f"{name} has {len(x)} entries but there are {n} prompts; give one or one per prompt")
    return x


def _load_each(images: list, height: int, width: int, channels: int = 3) -> list:
    """:func:`load_image` of each entry, reading and resizing each distinct image once (``--num N``
    with one init image hands the same path to every request)."""
    done: dict = {}
    for im in images:
        if id(im) not in done:
            done[id(im)] = load_image(im, height, width, channels)
    return [done[id(im)] for im in images]


def load_image(image, height: int, width: int, channels: int = 3) -> np.ndarray:
    """A PIL image, path or array -> float32 [H, W, C] in [-1, 1] (mask: [0, 1], binarised)."""
    from PIL import Image
    if isinstance(image, (str, os.PathLike)):
        try:
            image = Image.open(image)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read image {str(image)!r}: {e}") from None
    if isinstance(image, Image.Image):
        image = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.LANCZOS)
        arr = np.asarray(image, np.float32) / 255.0
    else:
        arr = np.asarray(image, np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
    if arr.ndim == 2:
        arr = arr[..., None]
    if channels == 1:
        return (arr[..., :1] >= 0.5).astype(np.float32)
    if arr.shape[:2] != (height, width):
        raise ValueError(f"image is {arr.shape[1]}x{arr.shape[0]} but the requested size is {width}x{height}")
    return arr[..., :3] * 2.0 - 1.0


def _prompt(r: GenerationRequest, i: int, negative: bool = False) -> str:
    """The text tokenizer ``i`` reads: the prompt, or for the second tokenizer ``prompt_2``
    (diffusers: ``prompt_2 or prompt``; a refiner's one tokenizer reads ``prompt``)."""
    first, second = (r.negative_prompt, r.negative_prompt_2) if negative else (r.prompt, r.prompt_2)
    return (second or first) if i == 1 else first


class StableDiffusionPipeline:
    """Text-to-image (and img2img / inpainting) with a Stable Diffusion checkpoint."""

    def __init__(self, models: Models, params, tokenizer, scheduler_config: SchedulerConfig,
                 scheduler_name: str, mesh=None, source: str | None = None, family: families.Family | None = None,
                 tokenizers: dict | None = None, options: dict | None = None, safety_checker=None,
                 safety_policy: str = "black", generation_defaults: dict | None = None):
        """``tokenizer``: the (first) tokenizer; ``tokenizers``: ``{folder: tokenizer}`` of every
        tokenizer of the family (SDXL has two; default: ``tokenizer`` alone); ``options``: the
        pipeline options (:meth:`sd_jax.families.Family.pipeline_options`); ``safety_checker``:
        None or ``(SafetyChecker, params)`` (:mod:`sd_jax.models.safety_checker`), run on every
        decoded image; ``safety_policy``: what it does to a flagged image (``"black"``,
        ``"blur"``, ``"keep"``; an attribute, changeable between calls); ``generation_defaults``:
        the model's recommended settings for what a request leaves unset (its
        ``generation_defaults.json``: :data:`sd_jax.weights.loader.GENERATION_DEFAULTS`)."""
        self.models = models
        self.family = family or families.detect({"text_encoder": models.text_encoder.config})
        self.tokenizer = tokenizer
        self.tokenizers = dict(tokenizers) if tokenizers else {self.family.tokenizers[0].name: tokenizer}
        self.options = self.family.pipeline_options(options)
        self.generation_defaults = loader.check_generation_defaults(generation_defaults or {})
        self.scheduler_config = scheduler_config
        self.scheduler_name = scheduler_name
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.params = sharding.replicate(params, self.mesh)
        self.source = source
        self._compiled: dict = {}
        self.compilations = 0  # programs compiled by this pipeline (tests, metrics)
        self.loras = LoraSet(self)  # LoRAs merged into self.params (sd_jax.lora)
        self.lora_dir: str | None = None  # where a prompt's <lora:name:w> tags are looked up (sd_jax.lora.prompts)
        # SDXL's invisible watermark, on by default as in diffusers (images >= 256 px wide); settable.
        self.watermark = self.family.watermark
        self.embeddings: dict[str, int] = {}  # textual-inversion tokens: name -> vectors (load_embeddings)
        self.controlnets: list = []  # (name, ControlNetConfig) of each load_controlnet, in order
        self.vae_tiling = "auto"  # "on", "off", "auto" (:func:`sd_jax.memory.vae_tile`)
        self.safety_checker, self.safety_params = safety_checker or (None, None)
        if self.safety_params is not None:
            self.safety_params = sharding.replicate(self.safety_params, self.mesh)
        self.safety_policy = safety_policy
        self.preview = None  # a StepMonitor (sd_jax.serve.preview): step progress through host callbacks

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla",
                        mesh=None, variant: str | None = None, allow_pickle: bool = False,
                        watermark: bool | None = None, unet: str | None = None,
                        embeddings_dir: str | None = None, safety_checker: bool = True,
                        safety_policy: str = "black"):
        """Load a diffusers folder (``model_index.json``), a single-file ``.safetensors`` or an
        sd-jax checkpoint folder (:func:`sd_jax.weights.loader.load`).  ``watermark``: mark
        the images with SDXL's invisible watermark (None: the family's default, on for SDXL).
        ``unet``: a UNet-only ``.safetensors`` whose weights replace the model's
        (:func:`sd_jax.weights.loader.with_unet`; SDXL-Lightning).  ``embeddings_dir``: a
        folder of textual-inversion embeddings to add (:meth:`load_embeddings`).

        A diffusers folder's ``safety_checker/`` (with ``feature_extractor/``) is loaded and
        run on every image unless ``safety_checker=False``; ``safety_policy``: ``"black"``
        (diffusers'), ``"blur"`` or ``"keep"`` for flagged images."""
        mesh = mesh if mesh is not None else sharding.make_mesh()
        m = loader.load(path, dtype=dtype, param_dtype=param_dtype, attention=attention, variant=variant,
                        allow_pickle=allow_pickle, mesh=mesh)
        if unet is not None:
            m = loader.with_unet(m, unet)
        checker = None
        if safety_checker and os.path.isdir(path) and safety.present(path):
            checker = safety.load(path, policy=Policy(dtype, param_dtype, attention), action=safety_policy,
                                  variant=variant, allow_pickle=allow_pickle)
        pipe = cls(m.models, m.params, m.tokenizer, m.scheduler_config, m.scheduler_name, mesh=mesh, source=m.source,
                   family=m.family, tokenizers=m.tokenizers, options=m.options, safety_checker=checker,
                   safety_policy=safety_policy, generation_defaults=m.generation_defaults)
        for name, config, params in m.controlnets:  # a ControlNet pipeline's (saved with the model)
            pipe._add_controlnet(name, config, params)
        if watermark is not None:
            pipe.watermark = bool(watermark)
        if embeddings_dir is not None:
            pipe.load_embeddings(embeddings_dir, allow_pickle=allow_pickle)
        return pipe

    def load_embeddings(self, paths, allow_pickle: bool = False) -> list[str]:
        """Add textual-inversion embeddings (a folder, a file, or a list of files; formats:
        :mod:`sd_jax.prompts.embeddings`) as tokens used in prompts by name; returns the names.
        An embedding that does not fit the model or whose name clashes is a ValueError, and
        then nothing is added."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        files = [f for p in paths for f in (embeddings.find_embeddings(p) if os.path.isdir(p) else [os.fspath(p)])]
        found = [e for f in files for e in embeddings.read_embedding(f, allow_pickle=allow_pickle)]
        clash = [e.name for e in found if e.name in self.embeddings]
        if clash:
            raise ValueError(f"embedding {clash[0]!r} is loaded already")
        models, params, tokenizers = embeddings.add_embeddings(self.family, self.models, self.params, self.tokenizers, found)
        self.models, self.tokenizers = models, tokenizers
        self.tokenizer = tokenizers[self.family.prompt.tokenizers[0]]
        self.params = sharding.replicate(params, self.mesh)
        self._compiled.clear()
        self.embeddings.update({e.name: e.count for e in found})
        return [e.name for e in found]

    def save_pretrained(self, path: str, format: str = "orbax") -> None:
        """Save as an sd-jax orbax checkpoint (``format="orbax"``), a diffusers folder or one
        original-layout ``.safetensors`` (``"single-file"``)."""
        if format not in ("orbax", "diffusers", "single-file"):
            raise ValueError(f"unknown format {format!r}; use 'orbax', 'diffusers' or 'single-file'")
        family = self.family
        params = {k: v for k, v in self.params.items() if k != "controlnets"}  # saved apart, as diffusers does
        nets = [(name, cfg, p) for (name, cfg), p in zip(self.controlnets, self.params.get("controlnets", ()))]
        model = loader.LoadedModel(family, self.models, params, self.tokenizers,
                                   self.scheduler_config.to_dict(), self.scheduler_name, self.source, self.options,
                                   controlnets=nets, generation_defaults=dict(self.generation_defaults))
        loader.save(model, path, format)

    def load_controlnet(self, path: str, name: str | None = None, *, variant: str | None = None,
                        allow_pickle: bool = False) -> str:
        """Load a diffusers ``ControlNetModel`` folder (``config.json`` + safetensors; ``variant``
        e.g. ``"fp16"``) or an original-layout ``.safetensors`` file to steer generations with (``control_image=``); returns its name (default:
        the folder's name), by which a call picks it (``controlnet=``).  Raises ``ValueError``
        (one line) when it does not fit this model (cross-attention width, channels)."""
        policy = self.models.unet.policy
        model, params = controlnet_model.load(path, policy=policy, variant=variant, allow_pickle=allow_pickle,
                                              base=self.models.unet.config)
        return self._add_controlnet(name or controlnet_model.default_name(path), model.config, params)

    def _add_controlnet(self, name: str, config, params) -> str:
        """Add a ControlNet (its config and parameters) under ``name``, after checking it fits."""
        why = config.mismatch(self.models.unet.config, self.latent_channels)
        if why:
            raise ValueError(f"ControlNet {name} does not fit this model: {why} (a ControlNet for another base model?)")
        if name in [n for n, _ in self.controlnets]:
            raise ValueError(f"a ControlNet named {name!r} is loaded already; pass another name=")
        self.controlnets.append((name, config))
        self.params = {**self.params, "controlnets": tuple(self.params.get("controlnets", ()))
                       + (sharding.replicate(params, self.mesh),)}
        self._compiled.clear()  # the parameter tree changed: compiled calls take the old one
        return name

    def _controlnet_index(self, key) -> int:
        names = [n for n, _ in self.controlnets]
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and 0 <= key < len(names):
            return int(key)
        if key in names:
            return names.index(key)
        loaded = ", ".join(names) if names else "none; load one with pipe.load_controlnet(path) or --controlnet"
        raise RequestError(f"no ControlNet {key!r} is loaded (loaded: {loaded})")

    @property
    def latent_channels(self) -> int:
        return self.models.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        return self.models.unet.config.sample_size * self.models.vae_scale

    # ------------------------------------------------------------------ LoRA (sd_jax.lora)
    def load_lora(self, path_or_name: str, weight: float = 1.0, *, lora_dir: str | None = None,
                  allow_partial: bool = False, name: str | None = None):
        """Merge a LoRA (``.safetensors`` in any format :mod:`sd_jax.lora` reads, or a name in
        ``lora_dir``) into the parameters at ``weight``; several add up.  Generation is not
        recompiled.  Raises ``LoraError`` (one line; nothing changed) for a file that does not
        fit the model; ``allow_partial``: load what matches, ignoring keys that match no layer."""
        return self.loras.load(path_or_name, weight, lora_dir=lora_dir, allow_partial=allow_partial, name=name)

    def set_lora_weights(self, weights) -> None:
        """New weights (``{name: weight}`` or a list in load order) for loaded LoRAs (no recompilation)."""
        self.loras.set_weights(weights)

    def use_loras(self, specs, *, lora_dir: str | None = None, allow_partial: bool = False) -> None:
        """Make the loaded LoRAs exactly ``specs``, ``[(path or name, weight), ...]``."""
        self.loras.use(specs, lora_dir=lora_dir, allow_partial=allow_partial)

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all (the base parameters are back, bit for bit)."""
        self.loras.unload(name)

    # ------------------------------------------------------------------ requests -> compiled calls
    def sampler(self, name: str | None, num_inference_steps: int, **overrides):
        return make_sampler(name or self.scheduler_name, self.scheduler_config, num_inference_steps, **overrides)

    def resolve(self, request: GenerationRequest, *, output: str = "uint8", loop: str = "scan"):
        """The request with the model's defaults filled in, and its static :class:`Plan`.

        Raises ``ValueError`` (a :class:`~sd_jax.request.RequestError`) for what this model
        cannot do: sizes that are not multiples of its VAE factor, a sampler or step count
        its schedule does not allow, an img2img strength that leaves no step, text-to-image
        with an inpainting UNet."""
        r = request
        if output not in OUTPUTS:
            raise RequestError(f"output must be one of {OUTPUTS}, got {output!r}")
        if loop not in ("scan", "python", "debug"):
            raise RequestError(f"loop must be 'scan', 'python' or 'debug', got {loop!r}")
        height, width = r.height or self.default_size, r.width or self.default_size
        f = self.models.vae_scale
        if height % f or width % f:
            raise RequestError(f"height and width must be multiples of {f} for this model, got {width}x{height}")
        scheduler = r.scheduler or self.scheduler_name
        spacing = {} if r.timestep_spacing is None else {"timestep_spacing": r.timestep_spacing}
        sampler = self.sampler(scheduler, r.steps, **spacing)
        if self.models.unet.config.in_channels == 9 and r.mode != "inpaint":
            raise RequestError("this is an inpainting model: pass image= and mask_image=")
        start, end = 0, sampler.num_steps
        if r.denoising_start is not None or r.denoising_end is not None:
            start, end = step_range(sampler, denoising_start=r.denoising_start, denoising_end=r.denoising_end)
        if r.denoising_start is None and (r.mode == "img2img" or (r.mode == "inpaint" and r.strength < 1.0)):
            start = img2img_start(r.steps, r.strength, sampler.order)
            if start >= end:
                raise RequestError(f"strength {r.strength} with {r.steps} steps leaves no denoising step; "
                                   f"raise one of them")
        latent_shape = (height // f, width // f, self.latent_channels)
        if r.latents is not None and np.shape(r.latents) != latent_shape:
            raise RequestError(f"latents must have shape {latent_shape} per image, got {np.shape(r.latents)}")
        d = self.generation_defaults
        window = resolve_guidance_window(r.guidance_start, r.guidance_end, d,
                                         f" (with this model's generation_defaults.json {d})" if d else "")
        r = r.replace(height=height, width=width, scheduler=scheduler, **window)
        self._check_time_ids(r)
        chunks, k = 1, 1
        if r.prompt_syntax != "plain":
            negs = (False, True) if r.guided else (False,)
            sides = {(i, neg): editing.variants(_prompt(r, i, neg), r.steps, sampler.num_steps)[0]
                     for i in range(len(self.family.prompt.tokenizers)) for neg in negs}
            if any(len(v) > 1 and _prompt(r, i, neg) != _prompt(r, 0, neg) for (i, neg), v in sides.items()):
                raise RequestError("prompt editing and alternation ([a:b:N], [a|b]) work in prompt and "
                                   "negative_prompt; leave them out of prompt_2 / negative_prompt_2")
            k = max(len(v) for v in sides.values())
            chunks = max(count_chunks(self.tokenizers[self.family.prompt.tokenizers[i]], text, r.prompt_syntax,
                                      self._groups(self.family.prompt.tokenizers[i]))
                         for (i, _), texts in sides.items() for text in texts)
        nets = tuple((self._controlnet_index(c.controlnet), None) for c in r.control)
        if len({j for j, _ in nets}) != len(nets):
            raise RequestError("each ControlNet can be given once per image")
        nets = tuple((j, self.controlnets[j][1]) for j, _ in nets)
        # an LCM-distilled UNet (time_cond_proj_dim) takes the guidance as an input: one UNet call per step
        guided = r.guided and not self.models.unet.config.time_cond_proj_dim
        plan = Plan(sampler, start, end, r.mode, guided, r.clip_skip, latent_shape,
                    output, loop, r.latents is not None,
                    watermark=bool(self.watermark) and output != "latent" and watermark_applies(height, width),
                    prompt_chunks=chunks, emphasis=r.prompt_syntax != "plain", prompt_variants=k,
                    controlnets=nets, guess_mode=r.guess_mode and bool(nets), add_noise=r.denoising_start is None)
        if self.safety_checker is not None and output != "latent":  # diffusers: not on latents either
            try:
                checker = dataclasses.replace(self.safety_checker, action=self.safety_policy)
            except ValueError as e:
                raise RequestError(str(e)) from None
            plan = dataclasses.replace(plan, safety=checker)
        if self.preview is not None:
            plan = dataclasses.replace(plan, preview=self.preview.plan_hook(self.family.name, self.latent_channels))
        return r, plan

    def _groups(self, tokenizer: str) -> dict:
        """The multi-vector embeddings of ``tokenizer``: {first id: ids} (:mod:`sd_jax.prompts.embeddings`)."""
        return embeddings.groups_for(self.tokenizers[tokenizer], self.embeddings) if self.embeddings else {}

    def _prompt_ids(self, plan: Plan, tokenizer: str, texts: list[str]):
        """(ids, weights or None) of ``texts`` for ``plan`` (A1111 chunks, or diffusers' truncation);
        with prompt editing, [B, K * chunks * 77]: each prompt's K texts (:mod:`sd_jax.prompts.editing`)."""
        tok = self.tokenizers[tokenizer]
        if not plan.emphasis:
            return tokenize(tok, [embeddings.expand_plain(t, self.embeddings) for t in texts]), None
        k = plan.prompt_variants
        if k > 1:
            steps = plan.sampler.num_inference_steps
            texts = [v for t in texts for v in editing.variants(t, steps, plan.sampler.num_steps, k)[0]]
        ids, w = prompt_arrays(tok, texts, plan.prompt_chunks, "a1111", self._groups(tokenizer))
        return ids.reshape(ids.shape[0] // k, -1), w.reshape(w.shape[0] // k, -1)

    def _time_id_rules(self, mode: str) -> tuple[str, bool]:
        """(mode whose diffusers rules apply, aesthetic score) for :func:`time_id_rows`: a
        refiner (``requires_aesthetics_score``) is an img2img pipeline whatever it does."""
        aesthetic = bool(self.options.get("requires_aesthetics_score", False))
        return ("img2img" if aesthetic else mode), aesthetic

    def _check_time_ids(self, r: GenerationRequest) -> None:
        """A RequestError unless the UNet's added embedding takes this many time ids (diffusers' check)."""
        cfg = self.models.unet.config
        if cfg.addition_embed_type != "text_time":
            return
        pooled = self.models.text_encoder_2.config.projection_dim
        want = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim
        got = len(add_time_ids(r, *self._time_id_rules(r.mode))[0])
        if got != want:
            raise RequestError(f"this UNet takes {want} micro-conditioning ids but the model makes {got}; "
                               f"set requires_aesthetics_score to {want == 5} in its model_index.json")

    def _inputs(self, plan: Plan, requests: Sequence[GenerationRequest]) -> dict:
        """The host arrays of one call (leading axis = the requests)."""
        batch = {"seeds": np.asarray([r.seed for r in requests], np.uint32),
                 "guidance": np.asarray([r.guidance for r in requests], np.float32),
                 "rescale": np.asarray([r.guidance_rescale for r in requests], np.float32)}
        if plan.guidance and any((r.guidance_start, r.guidance_end) != tuple(GUIDANCE_WINDOW.values())
                                 for r in requests):
            batch["guidance_window"] = np.asarray(
                [guidance_window(r.guidance_start, r.guidance_end, plan.start, plan.sampler.num_steps)
                 for r in requests], np.float32)
        for i, name in enumerate(self.family.prompt.tokenizers):
            for neg in (False, True) if plan.guidance else (False,):
                ids, weights = self._prompt_ids(plan, name, [_prompt(r, i, negative=neg) for r in requests])
                batch[ids_key(i, neg)] = ids
                if weights is not None:
                    batch[ids_key(i, neg).replace("ids", "weights")] = weights
        if plan.prompt_variants > 1:  # the text each step uses (prompt editing, alternation)
            steps = plan.sampler.num_inference_steps
            for neg in (False, True) if plan.guidance else (False,):
                batch[("neg_" if neg else "") + "prompt_steps"] = np.asarray(
                    [editing.variants(r.negative_prompt if neg else r.prompt, steps, plan.sampler.num_steps)[1]
                     for r in requests], np.int32)
        if self.models.unet.config.addition_embed_type == "text_time":
            # SDXL's micro-conditioning (sd_jax.micro_conditioning: diffusers' rules per pipeline)
            batch.update(time_id_rows(requests, *self._time_id_rules(plan.mode), plan.guidance))
            if plan.guidance and self.options.get("force_zeros_for_empty_prompt"):
                batch["neg_zero"] = np.asarray([not r.negative_prompt for r in requests], np.bool_)
        if plan.given_noise:
            batch["latents"] = np.stack([np.asarray(r.latents, np.float32) for r in requests])
        if plan.mode != "txt2img" and not plan.image_latents:
            batch["image"] = np.stack(_load_each([r.image for r in requests], requests[0].height, requests[0].width))
        if plan.mode == "inpaint":
            batch["mask"] = np.stack(_load_each([r.mask for r in requests], requests[0].height, requests[0].width, 1))
        if plan.controlnets:
            h, w, done = requests[0].height, requests[0].width, {}
            for k in range(len(plan.controlnets)):
                ims = [r.control[k].image for r in requests]
                for im in ims:  # each distinct image read and resized once
                    if id(im) not in done:
                        done[id(im)] = load_control_image(im, h, w)
                batch[f"control_{k}"] = np.stack([done[id(im)] for im in ims])
            batch["control_scale"] = np.asarray([[c.scale for c in r.control] for r in requests], np.float32)
            batch["control_keep"] = np.asarray([[keep_table(c.start, c.end, plan.start, plan.sampler.num_steps)
                                                 for c in r.control] for r in requests], np.float32)
        return batch

    def _executable(self, plan: Plan, batch):
        tiled = self._vae_tiled(plan, batch["seeds"].shape[0])
        key = (plan, tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())), tiled.vae_tile)
        fn = self._compiled.get(key)
        if fn is None:
            f = functools.partial(_generate, self.models, self.family.prompt, tiled)
            if plan.loop == "debug":
                fn = f
            else:
                f_ = self.models.vae_scale  # refuse what cannot fit before XLA tries (and aborts)
                memory.check_generation(self, batch["seeds"].shape[0], plan.latent_shape[0] * f_,
                                        plan.latent_shape[1] * f_)
                with sharding.tracing_for(self.mesh):
                    fn = jax.jit(f, out_shardings=sharding.batch_sharded(self.mesh)).lower(
                        self._params(plan), batch).compile()
                self.compilations += 1
            self._compiled[key] = fn
        return fn

    def _vae_tiled(self, plan: Plan, rows: int) -> Plan:
        """``plan`` with the VAE tiling :attr:`vae_tiling` asks for at ``rows`` images per call."""
        f = self.models.vae_scale
        return dataclasses.replace(plan, vae_tile=memory.pipeline_vae_tile(
            self, rows, plan.latent_shape[0] * f, plan.latent_shape[1] * f))

    def compiled_sizes(self, plan: Plan) -> set[int]:
        """The call sizes (rows) ``plan`` is compiled for in this pipeline."""
        return {dict((k, shape) for k, shape, _ in key[1])["seeds"][0] for key in self._compiled if key[0] == plan}

    def dispatch(self, plan: Plan, requests: Sequence[GenerationRequest], size: int | None = None):
        """Start one device call for ``requests`` (resolved, all of ``plan``), padded to ``size``
        rows; returns at once with the batch-sharded global output (rows ``len(requests):``
        are padding)."""
        size = sharding.padded_size(max(size or 0, len(requests)), self.mesh)
        batch = sharding.shard_batch({k: sharding.pad_batch(v, size) for k, v in self._inputs(plan, requests).items()},
                                     self.mesh)
        return self._executable(plan, batch)(self._params(plan), batch)

    def _params(self, plan: Plan) -> dict:
        """The parameters a compiled call of ``plan`` takes (the safety checker's with it)."""
        return self.params if plan.safety is None else {**self.params, "safety_checker": self.safety_params}

    def compile(self, plan: Plan, request: GenerationRequest, size: int) -> None:
        """Compile ``plan`` for calls of ``size`` rows (the request gives example inputs)."""
        size = sharding.padded_size(size, self.mesh)
        specs = {k: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype, sharding=sharding.batch_sharded(self.mesh))
                 for k, v in self._inputs(plan, [request]).items()}
        self._executable(plan, specs)

    def requests(self, prompt, negative_prompt=None, *, seed=0, num_inference_steps=30, guidance_scale=7.5,
                 guidance_rescale=0.0, guidance_start=None, guidance_end=None, height=None, width=None,
                 scheduler=None, clip_skip=None, image=None, mask_image=None, strength=0.8, latents=None,
                 num_images_per_prompt=1, prompt_syntax="a1111", control_image=None,
                 controlnet=None, controlnet_conditioning_scale=1.0, control_guidance_start=0.0,
                 control_guidance_end=1.0, guess_mode=False, prompt_2=None,
                 negative_prompt_2=None, **sdxl) -> list[GenerationRequest]:
        """The diffusers-style arguments of :meth:`__call__` as one request per image (``sdxl``:
        the other :data:`SDXL_ARGUMENTS`, the same for every image)."""
        unknown = set(sdxl) - set(SDXL_ARGUMENTS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}")
        controls = self.controls(control_image, controlnet, controlnet_conditioning_scale, control_guidance_start,
                                 control_guidance_end)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise RequestError("no prompt given")
        k = num_images_per_prompt
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise RequestError(f"num_images_per_prompt must be a positive integer, got {k!r}")
        negs = _to_list(negative_prompt, len(prompts), "negative_prompt")
        seconds = {name: [x for x in _to_list(v, len(prompts), name) for _ in range(k)]
                   for name, v in (("prompt_2", prompt_2), ("negative_prompt_2", negative_prompt_2))}
        prompts = [p for p in prompts for _ in range(k)]
        negs = [x for x in negs for _ in range(k)]
        n = len(prompts)
        if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
            seeds = [int(seed) + i for i in range(n)]
        else:
            seeds = _to_list(seed, n, "seed")
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.ndim != 4 or latents.shape[0] != n:
                raise RequestError(f"latents must be [{n}, h, w, C] (one per image, NHWC), got {latents.shape}")
        images = image if isinstance(image, (list, tuple)) else [image] * n
        masks = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image] * n
        cols = dict(negative_prompt=negs, seed=seeds, guidance=_to_list(guidance_scale, n, "guidance_scale"),
                    guidance_rescale=_to_list(guidance_rescale, n, "guidance_rescale"),
                    guidance_start=_to_list(guidance_start, n, "guidance_start"),
                    guidance_end=_to_list(guidance_end, n, "guidance_end"),
                    image=_to_list(images, n, "image"), mask=_to_list(masks, n, "mask_image"), **seconds)
        return [GenerationRequest(prompts[i], steps=num_inference_steps, width=width, height=height,
                                  scheduler=scheduler, clip_skip=clip_skip, strength=strength,
                                  latents=None if latents is None else latents[i], prompt_syntax=prompt_syntax, control=controls,
                                  guess_mode=guess_mode, **sdxl, **{c: v[i] for c, v in cols.items()}) for i in range(n)]

    def controls(self, control_image, controlnet=None, scale=1.0, start=0.0, end=1.0) -> tuple:
        """diffusers' ControlNet arguments -> :class:`~sd_jax.request.Control` entries: one image
        per ControlNet (``controlnet``: names or indices; default: every loaded one, in order);
        ``scale``, ``start``, ``end``: one for all or one per ControlNet."""
        if control_image is None:
            if controlnet is not None:
                raise RequestError("controlnet= needs control_image= (one image per ControlNet)")
            return ()
        if controlnet is None:
            if not self.controlnets:
                raise RequestError("control_image= given but no ControlNet is loaded; load one with "
                                   "pipe.load_controlnet(path) (CLI: --controlnet PATH)")
            nets = list(range(len(self.controlnets)))
        else:
            nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
        images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
        if len(images) != len(nets):
            raise RequestError(f"{len(images)} control image(s) for {len(nets)} ControlNet(s); give one per ControlNet")
        per = lambda x, what: _to_list(x, len(nets), what)  # noqa: E731
        return tuple(Control(*c) for c in zip(nets, images, per(scale, "controlnet_conditioning_scale"),
                                             per(start, "control_guidance_start"), per(end, "control_guidance_end")))

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 seed: int | Sequence[int] = 0, num_inference_steps: int = 30, guidance_scale: float | Sequence[float] = 7.5,
                 guidance_rescale: float | Sequence[float] = 0.0, guidance_start: float | Sequence[float] | None = None,
                 guidance_end: float | Sequence[float] | None = None, height: int | None = None, width: int | None = None,
                 scheduler: str | None = None, clip_skip: int | None = None, image=None, mask_image=None,
                 strength: float = 0.8, latents=None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 batch_size: int | None = None, loop: str = "scan", prompt_syntax: str = "a1111",
                 control_image=None, controlnet=None,
                 controlnet_conditioning_scale=1.0, control_guidance_start=0.0, control_guidance_end=1.0,
                 guess_mode: bool = False, prompt_2=None, negative_prompt_2=None, lora_dir: str | None = None,
                 **sdxl):
        """Generate images.

        Args:
          prompt: one prompt or a list (one image each, times ``num_images_per_prompt``).
          negative_prompt: one for all or one per prompt; empty by default (ignored where
            guidance is off, i.e. ``guidance_scale <= 1``, as in diffusers).
          seed: an int (image i gets ``seed + i``) or one seed per image.
          guidance_scale, guidance_rescale: scalars or one per image (traced: no recompilation;
            at ``guidance_scale <= 1`` the UNet runs once per step instead of twice).
          guidance_start, guidance_end: the window of steps that are guided, as fractions of the
            steps that run (diffusers' ``ClassifierFreeGuidance(start=, stop=)``: step j of n is
            guided when ``int(start * n) <= j < int(end * n)``; the others take the conditional
            prediction); scalars or one per image (traced).  ``guidance_end=0.8`` leaves the
            least noisy fifth unguided, where guidance only exaggerates a small model's errors.
            None: the model's recommendation (``pipe.generation_defaults``, from its
            ``generation_defaults.json``), else 0 and 1 (every step, as diffusers).
          height, width: multiples of 8; default: the UNet's native size.
          scheduler: a sampler name (``sd_jax.diffusion.samplers.SCHEDULERS``); default: the checkpoint's.
          image: init image for img2img / inpainting (PIL image, path, or HxWx3 array in [0, 255] or [0, 1]).
          mask_image: inpainting mask, white = repaint.
          strength: how far img2img / inpainting moves from ``image`` (1 = all the way).
          latents: optional initial noise [B, h, w, C] (NHWC) instead of the seeded noise.
          output_type: as diffusers: ``"pil"`` (list of PIL images), ``"np"`` (float32
            [B, H, W, 3] in [0, 1]), ``"latent"`` (float32 [B, h, w, C], not decoded); and
            ``"uint8"`` (uint8 [B, H, W, 3], rounded on the devices: the least to copy back).
          batch_size: images per device call (default: all at once).
          loop: ``"scan"`` (compiled, default), ``"python"`` (compiled, unrolled) or ``"debug"`` (eager).
          prompt_syntax: ``"a1111"`` (default: ``(word:1.2)``, ``[word]``, ``BREAK``, prompts of
            any length in 75-token chunks) or ``"plain"`` (diffusers: truncated at 77 tokens).
          control_image: ControlNet control image(s), one per ControlNet (``load_controlnet``),
            resized to the output size; controlnet: their names or indices (default: all loaded).
          controlnet_conditioning_scale, control_guidance_start, control_guidance_end: as
            diffusers, one for all or one per ControlNet (traced: no recompilation).
          guess_mode: as diffusers (the ControlNets see no prompt difference; static).
          prompt_2, negative_prompt_2: SDXL's second text encoder's prompts (default: the first's).
          sdxl: the rest of diffusers' SDXL arguments (:data:`SDXL_ARGUMENTS`): micro-conditioning
            ``original_size``, ``crops_coords_top_left``, ``target_size`` and their
            ``negative_`` counterparts as (height, width), ``aesthetic_score`` /
            ``negative_aesthetic_score`` (a refiner), ``denoising_start`` / ``denoising_end``;
            and ``timestep_spacing`` (``"trailing"`` for SDXL-Turbo/-Lightning, ``"leading"``,
            ``"linspace"``: replaces the scheduler config's).
          lora_dir: the folder the prompts' ``<lora:name:weight>`` tags are looked up in (default
            ``pipe.lora_dir``); those LoRAs are added to the loaded ones for this call (every
            prompt of a call must name the same ones; no recompilation).
        """
        output = {"pil": "uint8", "np": "float32", "uint8": "uint8", "latent": "latent"}.get(output_type)
        if output is None:
            raise RequestError(f"output_type must be 'pil', 'np', 'uint8' or 'latent', got {output_type!r}")
        requests = self.requests(prompt, negative_prompt, seed=seed, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                                 guidance_start=guidance_start, guidance_end=guidance_end, height=height,
                                 width=width, scheduler=scheduler, clip_skip=clip_skip, image=image,
                                 mask_image=mask_image, strength=strength, latents=latents,
                                 num_images_per_prompt=num_images_per_prompt, prompt_syntax=prompt_syntax,
                                 control_image=control_image,
                                 controlnet=controlnet, controlnet_conditioning_scale=controlnet_conditioning_scale,
                                 control_guidance_start=control_guidance_start,
                                 control_guidance_end=control_guidance_end, guess_mode=guess_mode,
                                 prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, **sdxl)
        dispatcher = Dispatcher(self, batch_size=batch_size, output=output, loop=loop)
        tags = lora_prompts.call_loras([r.prompt for r in requests], prompt_syntax)
        with lora_prompts.applied(self, tags, self.lora_dir if lora_dir is None else lora_dir):
            images = np.stack(dispatcher.generate(requests))
        flags = None if self.safety_checker is None or output == "latent" else [bool(f) for f in dispatcher.flags]
        if output_type != "pil":
            return safety.FlaggedArray.of(images, flags)
        from PIL import Image
        return safety.FlaggedList([Image.fromarray(im) for im in images], flags)

    def generate_async(self, prompt, negative_prompt=None, *, loop="scan", output="uint8", **kwargs):
        """Like ``__call__`` but returns at once: (output [B_padded, ...] global jax.Array, n).

        All images must share their static settings (one call).  The device work runs
        asynchronously (JAX dispatch), so a caller can prepare the next batch or write the
        previous one's files meanwhile; rows ``n:`` are padding.  With a safety checker the
        output is ``(images, nsfw bool [B_padded])``.
        """
        lora_dir = kwargs.pop("lora_dir", None)
        requests = self.requests(prompt, negative_prompt, **kwargs)
        planned = Dispatcher(self, output=output, loop=loop).plan(requests)
        if len(planned) != 1:
            raise RequestError("generate_async takes images with the same static settings (size, steps, "
                               "scheduler, guidance on or off); use __call__ or a Dispatcher for a mix")
        plan, items = planned[0]
        tags = lora_prompts.call_loras([r.prompt for r in requests], requests[0].prompt_syntax)
        with lora_prompts.applied(self, tags, self.lora_dir if lora_dir is None else lora_dir):
            return self.dispatch(plan, [r for _, r in items]), len(items)  # (the call holds its parameters)

    def lower(self, *, batch_size=1, height=None, width=None, num_inference_steps=30, scheduler=None,
              guidance_scale=7.5, output="uint8"):
        """The lowered txt2img function (for FLOP counts and compile timing in benchmarks)."""
        r, plan = self.resolve(GenerationRequest("", steps=num_inference_steps, height=height, width=width,
                                                 scheduler=scheduler, guidance=guidance_scale), output=output)
        size = sharding.padded_size(batch_size, self.mesh)
        batch = sharding.shard_batch({k: sharding.pad_batch(v, size) for k, v in self._inputs(plan, [r]).items()},
                                     self.mesh)
        with sharding.tracing_for(self.mesh):
            return jax.jit(functools.partial(_generate, self.models, self.family.prompt, self._vae_tiled(plan, size)),
                           out_shardings=sharding.batch_sharded(self.mesh)).lower(self._params(plan), batch)
