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
  image depends only on its prompt, seed and settings, not on its batch position,
  the batch size or the number of devices.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import sharding
from sd_jax.diffusion.samplers import SchedulerConfig, make_sampler
from sd_jax.tokenizer import tokenize

MODES = ("txt2img", "img2img", "inpaint")


def enable_compilation_cache(path: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache so a second process starts fast."""
    path = path or os.environ.get("SD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sd_jax", "xla"))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@dataclasses.dataclass(frozen=True)
class Models:
    """The three networks (Flax modules, hashable) of a pipeline."""
    text_encoder: Any
    unet: Any
    vae: Any

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _encode_text(models: Models, params, ids, clip_skip):
    return models.text_encoder.encode(params["text_encoder"], ids, clip_skip=clip_skip)


def _denoise_and_decode(models: Models, sampler, start: int, mode: str, clip_skip, loop: str,
                        latent_shape, params, batch):
    """The whole generation for one static configuration.

    batch (all leading dim B, batch-sharded):
      ids, neg_ids: int32 [B, 77];  seeds: uint32 [B];  guidance, rescale: float32 [B];
      latents: optional float32 [B, h, w, C] initial noise (replaces the seeded noise);
      image: float32 [B, H, W, 3] in [-1, 1] (img2img, inpaint);  mask: float32 [B, H, W, 1], 1 = repaint.
    Returns uint8 [B, H, W, 3].
    """
    te_out = _encode_text(models, params, jnp.concatenate([batch["neg_ids"], batch["ids"]]), clip_skip)
    context = te_out.astype(models.unet.dtype)
    keys = jax.vmap(jax.random.key)(batch["seeds"])
    noise_at = lambda step: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), latent_shape))(keys)
    noise0 = batch["latents"].astype(jnp.float32) if "latents" in batch else noise_at(0)
    sf = models.vae.config.scaling_factor
    shift = getattr(models.vae.config, "shift_factor", None) or 0.0

    def vae_encode(img):
        mean, _ = models.vae.apply({"params": params["vae"]}, img.astype(models.vae.dtype), method="encode")
        # The distribution's mean: a trained VAE's std is ~1e-3 of the latent scale.
        return (mean.astype(jnp.float32) - shift) * sf

    image_latents = mask_lat = cond_extra = None
    if mode in ("img2img", "inpaint"):
        image_latents = vae_encode(batch["image"])
    if mode == "inpaint":
        b, h, w, _ = noise0.shape
        m = batch["mask"]
        # diffusers resizes the mask with nearest-neighbour interpolation to the latent grid.
        fh, fw = m.shape[1] // h, m.shape[2] // w
        mask_lat = m[:, ::fh, ::fw, :]
        if models.unet.config.in_channels == 9:
            masked = vae_encode(batch["image"] * (m < 0.5))
            cond_extra = jnp.concatenate([mask_lat, masked], axis=-1)

    if mode == "txt2img" or (mode == "inpaint" and start == 0):
        x = noise0 * sampler.init_noise_sigma
    else:
        x = sampler.add_noise(image_latents, noise0, start)

    g = batch["guidance"][:, None, None, None]
    rescale = batch["rescale"][:, None, None, None]
    timesteps = jnp.asarray(sampler.timesteps)
    n = len(sampler.timesteps)
    legacy_inpaint = mode == "inpaint" and cond_extra is None

    def body(carry, i):
        x, state = carry
        xin = sampler.scale_model_input(x, i)
        if cond_extra is not None:
            xin = jnp.concatenate([xin, cond_extra], axis=-1)
        xin = jnp.concatenate([xin, xin]).astype(models.unet.dtype)
        t = jnp.broadcast_to(timesteps[i], (xin.shape[0],))
        out = models.unet.apply({"params": params["unet"]}, xin, t, context).astype(jnp.float32)
        uncond, cond = jnp.split(out, 2)
        guided = uncond + g * (cond - uncond)
        # Guidance rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
        # Steps are Flawed", sec. 3.4): match the std of the guided prediction to the text one.
        std_c = jnp.std(cond, axis=(1, 2, 3), keepdims=True, ddof=1)
        std_g = jnp.std(guided, axis=(1, 2, 3), keepdims=True, ddof=1)
        guided = rescale * guided * (std_c / std_g) + (1 - rescale) * guided
        noise = noise_at(i + 1) if sampler.needs_noise else None
        x, state = sampler.step(state, guided, x, i, noise)
        if legacy_inpaint:
            nxt = jnp.minimum(i + 1, n - 1)
            proper = jnp.where(i < n - 1, sampler.add_noise(image_latents, noise0, nxt), image_latents)
            x = (1 - mask_lat) * proper + mask_lat * x
        return (x, state), None

    carry = (x, sampler.init_state(x.shape))
    if loop == "scan":
        carry, _ = jax.lax.scan(body, carry, jnp.arange(start, n, dtype=jnp.int32))
    else:  # plain Python loop, for debugging (and to check the scan against)
        for i in range(start, n):
            carry, _ = body(carry, jnp.int32(i))
    x = carry[0]
    img = models.vae.apply({"params": params["vae"]}, (x / sf + shift).astype(models.vae.dtype), method="decode")
    img = jnp.clip(img.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(img * 255).astype(jnp.uint8)


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


class StableDiffusionPipeline:
    """Text-to-image (and img2img / inpainting) with a Stable Diffusion checkpoint."""

    def __init__(self, models: Models, params, tokenizer, scheduler_config: SchedulerConfig,
                 scheduler_name: str, mesh=None, source: str | None = None):
        self.models = models
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.scheduler_name = scheduler_name
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.params = sharding.replicate(params, self.mesh)
        self.source = source
        self._compiled: dict = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla",
                        mesh=None, variant: str | None = None, allow_pickle: bool = False):
        """Load a diffusers folder (``model_index.json``) or an sd-jax checkpoint folder."""
        from sd_jax.weights import checkpoint
        return checkpoint.load_pipeline(cls, path, dtype=dtype, param_dtype=param_dtype, attention=attention,
                                        mesh=mesh, variant=variant, allow_pickle=allow_pickle)

    def save_pretrained(self, path: str, format: str = "orbax") -> None:
        """Save as an sd-jax orbax checkpoint (``format="orbax"``) or a diffusers folder."""
        from sd_jax.weights import checkpoint
        if format == "orbax":
            checkpoint.save_orbax(self, path)
        elif format == "diffusers":
            checkpoint.save_diffusers(self, path)
        else:
            raise ValueError(f"unknown format {format!r}; use 'orbax' or 'diffusers'")

    @property
    def latent_channels(self) -> int:
        return self.models.vae.config.latent_channels

    @property
    def default_size(self) -> int:
        return self.models.unet.config.sample_size * self.models.vae_scale

    # ------------------------------------------------------------------ compile cache
    def _fn(self, sampler, start, mode, clip_skip, loop, latent_shape, batch_size):
        key = (sampler, start, mode, clip_skip, loop, latent_shape, batch_size)
        fn = self._compiled.get(key)
        if fn is None:
            f = functools.partial(_denoise_and_decode, self.models, sampler, start, mode, clip_skip, loop,
                                  latent_shape)
            fn = self._compiled[key] = f if loop == "debug" else jax.jit(
                f, out_shardings=sharding.batch_sharded(self.mesh))
        return fn

    def sampler(self, name: str | None, num_inference_steps: int, **overrides):
        return make_sampler(name or self.scheduler_name, self.scheduler_config, num_inference_steps, **overrides)

    # ------------------------------------------------------------------ generation
    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 seed: int | Sequence[int] = 0, num_inference_steps: int = 30, guidance_scale: float | Sequence[float] = 7.5,
                 guidance_rescale: float | Sequence[float] = 0.0, height: int | None = None, width: int | None = None,
                 scheduler: str | None = None, clip_skip: int | None = None, image=None, mask_image=None,
                 strength: float = 0.8, latents=None, num_images_per_prompt: int = 1, output_type: str = "pil",
                 loop: str = "scan"):
        """Generate images.

        Args:
          prompt: one prompt or a list (one image each, times ``num_images_per_prompt``).
          negative_prompt: one for all or one per prompt; empty by default.
          seed: an int (image i gets ``seed + i``) or one seed per image.
          guidance_scale, guidance_rescale: scalars or one per image (traced: no recompilation).
          height, width: multiples of 8; default: the UNet's native size.
          scheduler: a sampler name (``sd_jax.diffusion.samplers.SCHEDULERS``); default: the checkpoint's.
          image: init image for img2img / inpainting (PIL image, path, or HxWx3 array in [0, 255] or [0, 1]).
          mask_image: inpainting mask, white = repaint.
          strength: how far img2img / inpainting moves from ``image`` (1 = all the way).
          latents: optional initial noise [B, h, w, C] (NHWC) instead of the seeded noise.
          output_type: ``"pil"`` (list of PIL images) or ``"np"`` (uint8 [B, H, W, 3]).
          loop: ``"scan"`` (compiled, default), ``"python"`` (compiled, unrolled) or ``"debug"`` (eager).
        """
        out, n = self.generate_async(prompt, negative_prompt, seed=seed, num_inference_steps=num_inference_steps,
                                     guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, height=height,
                                     width=width, scheduler=scheduler, clip_skip=clip_skip, image=image,
                                     mask_image=mask_image, strength=strength, latents=latents,
                                     num_images_per_prompt=num_images_per_prompt, loop=loop)
        images = sharding.to_host(out)[:n]
        if output_type == "np":
            return images
        from PIL import Image
        return [Image.fromarray(im) for im in images]

    def generate_async(self, prompt, negative_prompt=None, *, seed=0, num_inference_steps=30, guidance_scale=7.5,
                       guidance_rescale=0.0, height=None, width=None, scheduler=None, clip_skip=None, image=None,
                       mask_image=None, strength=0.8, latents=None, num_images_per_prompt=1, loop="scan"):
        """Like ``__call__`` but returns at once: (uint8 [B_padded, H, W, 3] global jax.Array, n).

        The device work runs asynchronously (JAX dispatch), so a caller can prepare the
        next batch or write the previous one's files meanwhile; rows ``n:`` are padding.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("no prompt given")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        n = len(prompts)
        negs = ["" if x is None else x for x in _to_list(negative_prompt, len(prompts) // num_images_per_prompt,
                                                         "negative_prompt")]
        negs = [x for x in negs for _ in range(num_images_per_prompt)]
        seeds = [int(seed) + i for i in range(n)] if isinstance(seed, (int, np.integer)) else [int(s) for s in _to_list(seed, n, "seed")]
        if any(not 0 <= s < 2**32 for s in seeds):
            raise ValueError("seeds must be integers in [0, 2**32)")
        guidance = np.asarray(_to_list(guidance_scale, n, "guidance_scale"), np.float32)
        rescale = np.asarray(_to_list(guidance_rescale, n, "guidance_rescale"), np.float32)
        height = height or self.default_size
        width = width or self.default_size
        if height % 8 or width % 8 or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of 8, got {width}x{height}")
        f = self.models.vae_scale
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this model, got {width}x{height}")
        if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if loop not in ("scan", "python", "debug"):
            raise ValueError(f"loop must be 'scan', 'python' or 'debug', got {loop!r}")
        sampler = self.sampler(scheduler, num_inference_steps)
        mode = "txt2img" if image is None else ("img2img" if mask_image is None else "inpaint")
        if mask_image is not None and image is None:
            raise ValueError("mask_image needs an image to inpaint")
        if self.models.unet.config.in_channels == 9 and mode != "inpaint":
            raise ValueError("this is an inpainting model: pass image= and mask_image=")
        start = 0
        if mode == "img2img" or (mode == "inpaint" and strength < 1.0):
            # diffusers' `scheduler.order`: Heun takes two model evaluations per step.
            start = img2img_start(num_inference_steps, strength, sampler.order)
            if start >= len(sampler.timesteps):
                raise ValueError(f"strength {strength} with {num_inference_steps} steps leaves no denoising step; raise one of them")
        latent_shape = (height // f, width // f, self.latent_channels)

        batch = {
            "ids": tokenize(self.tokenizer, prompts), "neg_ids": tokenize(self.tokenizer, negs),
            "seeds": np.asarray(seeds, np.uint32), "guidance": guidance, "rescale": rescale,
        }
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != (n,) + latent_shape:
                raise ValueError(f"latents must have shape {(n,) + latent_shape}, got {latents.shape}")
            batch["latents"] = latents
        if mode != "txt2img":
            imgs = image if isinstance(image, (list, tuple)) else [image] * n
            batch["image"] = np.stack([load_image(im, height, width) for im in _to_list(imgs, n, "image")])
        if mode == "inpaint":
            masks = mask_image if isinstance(mask_image, (list, tuple)) else [mask_image] * n
            batch["mask"] = np.stack([load_image(m, height, width, channels=1) for m in _to_list(masks, n, "mask_image")])

        size = sharding.padded_size(n, self.mesh)
        batch = sharding.shard_batch({k: sharding.pad_batch(v, size) for k, v in batch.items()}, self.mesh)
        fn = self._fn(sampler, start, mode, clip_skip, loop, latent_shape, size)
        return fn(self.params, batch), n

    def lower(self, *, batch_size=1, height=None, width=None, num_inference_steps=30, scheduler=None):
        """The lowered txt2img function (for FLOP counts and compile timing in benchmarks)."""
        height = height or self.default_size
        width = width or self.default_size
        f = self.models.vae_scale
        sampler = self.sampler(scheduler, num_inference_steps)
        latent_shape = (height // f, width // f, self.latent_channels)
        size = sharding.padded_size(batch_size, self.mesh)
        ids = np.zeros((size, 77), np.int32)
        batch = sharding.shard_batch({"ids": ids, "neg_ids": ids, "seeds": np.zeros(size, np.uint32),
                                      "guidance": np.ones(size, np.float32), "rescale": np.zeros(size, np.float32)},
                                     self.mesh)
        return self._fn(sampler, 0, "txt2img", None, "scan", latent_shape, size).lower(self.params, batch)
