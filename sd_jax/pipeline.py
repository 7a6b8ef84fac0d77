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
from sd_jax.diffusion.denoisers import Conditioning, classifier_free_guidance, unet_denoiser
from sd_jax.diffusion.samplers import SchedulerConfig, make_sampler
from sd_jax.diffusion.sampling import sample, step_range
from sd_jax.families import Models  # noqa: F401  (re-exported: the pipeline's networks)
from sd_jax.micro_conditioning import add_time_ids, time_id_rows
from sd_jax.request import Dispatcher, GenerationRequest, RequestError
from sd_jax.tokenizer import tokenize
from sd_jax.weights import loader

OUTPUTS = ("uint8", "float32", "latent")
# GenerationRequest fields that __call__ takes by their diffusers names, the same for every image
SDXL_ARGUMENTS = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                  "negative_crops_coords_top_left", "negative_target_size", "aesthetic_score",
                  "negative_aesthetic_score", "denoising_start", "denoising_end")

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
    add_noise: bool = True
    image_latents: bool = False


def encode_prompt(models: Models, encoding: families.PromptEncoding, params, ids, clip_skip, time_ids=None,
                  zero=None) -> Conditioning:
    """Token ids int32 [B, 77] (a tuple of them, one per tokenizer, for SDXL) -> Conditioning,
    as the model family combines its encoders.

    time_ids: float32 [B, K] micro-conditioning (SDXL), or None.  zero: optional bool [B]:
    samples whose context and pooled embedding are zeros (SDXL's
    ``force_zeros_for_empty_prompt`` for an empty negative prompt; traced, per sample)."""
    context, pooled = encoding.encode(models, params, ids, clip_skip)
    if zero is not None:
        context = jnp.where(zero[:, None, None], jnp.zeros_like(context), context)
        pooled = None if pooled is None else jnp.where(zero[:, None], jnp.zeros_like(pooled), pooled)
    dtype = models.unet.dtype
    return Conditioning(context=context.astype(dtype), pooled=None if pooled is None else pooled.astype(dtype),
                        time_ids=time_ids)


def ids_key(i: int, negative: bool = False) -> str:
    """The batch key of tokenizer ``i``'s ids: ``ids``, ``ids_2``, ... (``neg_ids``, ``neg_ids_2``, ...)."""
    return ("neg_" if negative else "") + ("ids" if i == 0 else f"ids_{i + 1}")


def _batch_ids(encoding: families.PromptEncoding, batch, negative: bool = False):
    keys = [ids_key(i, negative) for i in range(len(encoding.tokenizers))]
    return batch[keys[0]] if len(keys) == 1 else tuple(batch[k] for k in keys)


def vae_encode(models: Models, params, images):
    """float32 [B, H, W, 3] in [-1, 1] -> latents in the diffusion model's space.

    The distribution's mean, not a sample: a trained VAE's std is ~1e-3 of the latent scale."""
    mean, _ = models.vae.apply({"params": params["vae"]}, images.astype(models.vae.dtype), method="encode")
    return models.vae.config.scale_latents(mean.astype(jnp.float32))


def vae_decode(models: Models, params, latents, output: str = "float32"):
    """Latents [B, h, w, C] -> images [B, H, W, 3]: float32 in [0, 1], or uint8 (``output="uint8"``)."""
    z = models.vae.config.unscale_latents(latents).astype(models.vae.dtype)
    img = models.vae.apply({"params": params["vae"]}, z, method="decode")
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
    Returns the output of ``plan.output`` for every sample.
    """
    sampler = plan.sampler
    keys = jax.vmap(jax.random.key)(batch["seeds"])
    noise_at = lambda step: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), plan.latent_shape))(keys)
    noise0 = batch["latents"].astype(jnp.float32) if "latents" in batch else noise_at(0)

    time_ids = batch.get("time_ids")
    cond = encode_prompt(models, encoding, params, _batch_ids(encoding, batch), plan.clip_skip, time_ids)
    # diffusers applies clip_skip to the prompt only, not to the negative prompt
    uncond = (encode_prompt(models, encoding, params, _batch_ids(encoding, batch, negative=True), None,
                            batch.get("neg_time_ids", time_ids), batch.get("neg_zero")) if plan.guidance else None)

    blend = None  # (x, i) -> x after each step: inpainting with an ordinary UNet
    if plan.mode == "txt2img":
        x = noise0 * sampler.init_noise_sigma
    else:
        image_latents = (batch["image_latents"].astype(jnp.float32) if plan.image_latents
                         else vae_encode(models, params, batch["image"]))
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
            masked = vae_encode(models, params, batch["image"] * (m < 0.5))
            extra = jnp.concatenate([mask_lat, masked], axis=-1).astype(models.unet.dtype)
            cond = cond.replace(concat=extra)
            uncond = uncond.replace(concat=extra) if uncond is not None else None
        else:  # an ordinary UNet: keep the known region on the image's own noisy trajectory
            n = sampler.num_steps

            def blend(x, i):
                nxt = jnp.minimum(i + 1, n - 1)
                known = jnp.where(i < n - 1, sampler.add_noise(image_latents, noise0, nxt), image_latents)
                return (1 - mask_lat) * known + mask_lat * x

    make = lambda c: unet_denoiser(models.unet, params["unet"], c)
    model_fn = (classifier_free_guidance(make, cond, uncond, batch["guidance"], batch["rescale"])
                if plan.guidance else make(cond))
    x, _ = sample(model_fn, sampler, x, start=plan.start, end=plan.end, noise_fn=noise_at,
                  post_step=blend, loop="python" if plan.loop == "debug" else plan.loop)
    if plan.output == "latent":
        return x
    return vae_decode(models, params, x, plan.output)


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
                 tokenizers: dict | None = None, options: dict | None = None):
        """``tokenizer``: the (first) tokenizer; ``tokenizers``: ``{folder: tokenizer}`` of every
        tokenizer of the family (SDXL has two; default: ``tokenizer`` alone); ``options``: the
        pipeline options (:meth:`sd_jax.families.Family.pipeline_options`)."""
        self.models = models
        self.family = family or families.detect({"text_encoder": models.text_encoder.config})
        self.tokenizer = tokenizer
        self.tokenizers = dict(tokenizers) if tokenizers else {self.family.tokenizers[0].name: tokenizer}
        self.options = self.family.pipeline_options(options)
        self.scheduler_config = scheduler_config
        self.scheduler_name = scheduler_name
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.params = sharding.replicate(params, self.mesh)
        self.source = source
        self._compiled: dict = {}
        self.compilations = 0  # programs compiled by this pipeline (tests, metrics)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla",
                        mesh=None, variant: str | None = None, allow_pickle: bool = False):
        """Load a diffusers folder (``model_index.json``), a single-file ``.safetensors`` or an
        sd-jax checkpoint folder (:func:`sd_jax.weights.loader.load`)."""
        mesh = mesh if mesh is not None else sharding.make_mesh()
        m = loader.load(path, dtype=dtype, param_dtype=param_dtype, attention=attention, variant=variant,
                        allow_pickle=allow_pickle, mesh=mesh)
        return cls(m.models, m.params, m.tokenizer, m.scheduler_config, m.scheduler_name, mesh=mesh, source=m.source,
                   family=m.family, tokenizers=m.tokenizers, options=m.options)

    def save_pretrained(self, path: str, format: str = "orbax") -> None:
        """Save as an sd-jax orbax checkpoint (``format="orbax"``) or a diffusers folder."""
        if format not in ("orbax", "diffusers"):
            raise ValueError(f"unknown format {format!r}; use 'orbax' or 'diffusers'")
        family = self.family
        model = loader.LoadedModel(family, self.models, self.params, self.tokenizers,
                                   self.scheduler_config.to_dict(), self.scheduler_name, self.source, self.options)
        loader.save(model, path, format)

    @property
    def latent_channels(self) -> int:
        return self.models.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        return self.models.unet.config.sample_size * self.models.vae_scale

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
        sampler = self.sampler(scheduler, r.steps)
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
        r = r.replace(height=height, width=width, scheduler=scheduler)
        self._check_time_ids(r)
        plan = Plan(sampler, start, end, r.mode, r.guided, r.clip_skip, latent_shape,
                    output, loop, r.latents is not None, add_noise=r.denoising_start is None)
        return r, plan

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
        for i, name in enumerate(self.family.prompt.tokenizers):
            tok = self.tokenizers[name]
            batch[ids_key(i)] = tokenize(tok, [_prompt(r, i) for r in requests])
            if plan.guidance:
                batch[ids_key(i, negative=True)] = tokenize(tok, [_prompt(r, i, negative=True) for r in requests])
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
        return batch

    def _executable(self, plan: Plan, batch):
        key = (plan, tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items())))
        fn = self._compiled.get(key)
        if fn is None:
            f = functools.partial(_generate, self.models, self.family.prompt, plan)
            if plan.loop == "debug":
                fn = f
            else:
                f_ = self.models.vae_scale  # refuse what cannot fit before XLA tries (and aborts)
                memory.check_generation(self, batch["seeds"].shape[0], plan.latent_shape[0] * f_,
                                        plan.latent_shape[1] * f_)
                fn = jax.jit(f, out_shardings=sharding.batch_sharded(self.mesh)).lower(self.params, batch).compile()
                self.compilations += 1
            self._compiled[key] = fn
        return fn

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
        return self._executable(plan, batch)(self.params, batch)

    def compile(self, plan: Plan, request: GenerationRequest, size: int) -> None:
        """Compile ``plan`` for calls of ``size`` rows (the request gives example inputs)."""
        size = sharding.padded_size(size, self.mesh)
        specs = {k: jax.ShapeDtypeStruct((size,) + v.shape[1:], v.dtype, sharding=sharding.batch_sharded(self.mesh))
                 for k, v in self._inputs(plan, [request]).items()}
        self._executable(plan, specs)

    def requests(self, prompt, negative_prompt=None, *, seed=0, num_inference_steps=30, guidance_scale=7.5,
                 guidance_rescale=0.0, height=None, width=None, scheduler=None, clip_skip=None, image=None,
                 mask_image=None, strength=0.8, latents=None, num_images_per_prompt=1, prompt_2=None,
                 negative_prompt_2=None, **sdxl) -> list[GenerationRequest]:
        """The diffusers-style arguments of :meth:`__call__` as one request per image (``sdxl``:
        the other :data:`SDXL_ARGUMENTS`, the same for every image)."""
        unknown = set(sdxl) - set(SDXL_ARGUMENTS)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(sorted(unknown))}")
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
                    image=_to_list(images, n, "image"), mask=_to_list(masks, n, "mask_image"), **seconds)
        return [GenerationRequest(prompts[i], steps=num_inference_steps, width=width, height=height,
                                  scheduler=scheduler, clip_skip=clip_skip, strength=strength,
                                  latents=None if latents is None else latents[i], **sdxl,
                                  **{c: v[i] for c, v in cols.items()}) for i in range(n)]

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 seed: int | Sequence[int] = 0, num_inference_steps: int = 30, guidance_scale: float | Sequence[float] = 7.5,
                 guidance_rescale: float | Sequence[float] = 0.0, height: int | None = None, width: int | None = None,
                 scheduler: str | None = None, clip_skip: int | None = None, image=None, mask_image=None,
                 strength: float = 0.8, latents=None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 batch_size: int | None = None, loop: str = "scan", prompt_2=None, negative_prompt_2=None, **sdxl):
        """Generate images.

        Args:
          prompt: one prompt or a list (one image each, times ``num_images_per_prompt``).
          negative_prompt: one for all or one per prompt; empty by default (ignored where
            guidance is off, i.e. ``guidance_scale <= 1``, as in diffusers).
          seed: an int (image i gets ``seed + i``) or one seed per image.
          guidance_scale, guidance_rescale: scalars or one per image (traced: no recompilation;
            at ``guidance_scale <= 1`` the UNet runs once per step instead of twice).
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
          prompt_2, negative_prompt_2: SDXL's second text encoder's prompts (default: the first's).
          sdxl: the rest of diffusers' SDXL arguments (:data:`SDXL_ARGUMENTS`): micro-conditioning
            ``original_size``, ``crops_coords_top_left``, ``target_size`` and their
            ``negative_`` counterparts as (height, width), ``aesthetic_score`` /
            ``negative_aesthetic_score`` (a refiner), ``denoising_start`` / ``denoising_end``.
        """
        output = {"pil": "uint8", "np": "float32", "uint8": "uint8", "latent": "latent"}.get(output_type)
        if output is None:
            raise RequestError(f"output_type must be 'pil', 'np', 'uint8' or 'latent', got {output_type!r}")
        requests = self.requests(prompt, negative_prompt, seed=seed, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, height=height,
                                 width=width, scheduler=scheduler, clip_skip=clip_skip, image=image,
                                 mask_image=mask_image, strength=strength, latents=latents,
                                 num_images_per_prompt=num_images_per_prompt, prompt_2=prompt_2,
                                 negative_prompt_2=negative_prompt_2, **sdxl)
        images = np.stack(Dispatcher(self, batch_size=batch_size, output=output, loop=loop).generate(requests))
        if output_type != "pil":
            return images
        from PIL import Image
        return [Image.fromarray(im) for im in images]

    def generate_async(self, prompt, negative_prompt=None, *, loop="scan", output="uint8", **kwargs):
        """Like ``__call__`` but returns at once: (output [B_padded, ...] global jax.Array, n).

        All images must share their static settings (one call).  The device work runs
        asynchronously (JAX dispatch), so a caller can prepare the next batch or write the
        previous one's files meanwhile; rows ``n:`` are padding.
        """
        requests = self.requests(prompt, negative_prompt, **kwargs)
        planned = Dispatcher(self, output=output, loop=loop).plan(requests)
        if len(planned) != 1:
            raise RequestError("generate_async takes images with the same static settings (size, steps, "
                               "scheduler, guidance on or off); use __call__ or a Dispatcher for a mix")
        plan, items = planned[0]
        return self.dispatch(plan, [r for _, r in items]), len(items)

    def lower(self, *, batch_size=1, height=None, width=None, num_inference_steps=30, scheduler=None,
              guidance_scale=7.5, output="uint8"):
        """The lowered txt2img function (for FLOP counts and compile timing in benchmarks)."""
        r, plan = self.resolve(GenerationRequest("", steps=num_inference_steps, height=height, width=width,
                                                 scheduler=scheduler, guidance=guidance_scale), output=output)
        size = sharding.padded_size(batch_size, self.mesh)
        batch = sharding.shard_batch({k: sharding.pad_batch(v, size) for k, v in self._inputs(plan, [r]).items()},
                                     self.mesh)
        return jax.jit(functools.partial(_generate, self.models, self.family.prompt, plan),
                       out_shardings=sharding.batch_sharded(self.mesh)).lower(self.params, batch)
