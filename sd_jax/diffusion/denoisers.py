"""What a sampler calls: ``model_fn(x_in, t, i) -> prediction``, built from the UNet by wrappers.

The samplers never see the UNet, the prompt or the guidance.  A generation composes:

* :class:`Conditioning`: everything the network is conditioned on besides the noisy latents
  (cross-attention context, and the optional fields later model families fill: SDXL's pooled
  text embedding and micro-conditioning time ids, latent channels concatenated to the input
  as the 9-channel inpainting UNet takes them, ControlNet inputs).  A pytree, so a batch of
  conditionings is concatenated, sharded and traced like any array.
* :func:`unet_denoiser`: the UNet as ``f(x_in, t, cond) -> prediction`` in float32, in the
  network's own parametrisation (epsilon, v or sample: see
  ``SchedulerConfig.prediction_type``).  The samplers convert the prediction to (x0, eps)
  with one table, as diffusers' schedulers do, so their arithmetic equals diffusers' step for
  step; classifier-free guidance is linear, so guiding in the network's parametrisation is
  the same as guiding x0 (and it is what diffusers does, which matters for guidance rescale).
* :func:`classifier_free_guidance`: Ho & Salimans 2022 (eq. 6) plus guidance rescale (Lin et
  al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4).  It is
  applied or not as a static choice of the compiled program: without guidance the UNet runs
  on the batch once per step, not twice.

A ControlNet, an LCM guidance embedding or a refiner's aesthetic score changes a wrapper or a
field of :class:`Conditioning`, never the sampling loop (:mod:`sd_jax.diffusion.sampling`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import numpy as np
import jax
import jax.numpy as jnp

# f(x_in [B, h, w, C] scaled by the sampler, t: scalar timestep, i: int32 step index) -> [B, h, w, C] float32
ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class Conditioning:
    """What the denoiser is conditioned on, per sample (leading axis = batch).

    context:  [B, L, D] cross-attention states (the text encoder's ``prompt_embeds``).
    pooled:   [B, P] pooled text embedding (SDXL's ``text_embeds``), or None.
    time_ids: [B, K] micro-conditioning (SDXL's ``add_time_ids``), or None.
    concat:   [B, h, w, C'] latent channels concatenated to the UNet input (the 9-channel
              inpainting UNet: mask + masked-image latents), or None.
    control:  ControlNet inputs (any pytree), or None.
    timestep_cond: [B, time_cond_proj_dim] an LCM-distilled UNet's guidance embedding
              (diffusers' ``timestep_cond``), or None.
    """
    context: jax.Array
    pooled: Optional[jax.Array] = None
    time_ids: Optional[jax.Array] = None
    concat: Optional[jax.Array] = None
    control: Any = None
    timestep_cond: Optional[jax.Array] = None

    def added_cond_kwargs(self) -> dict | None:
        """The UNet's ``added_cond_kwargs`` (diffusers' name), or None when there are none."""
        if self.pooled is None and self.time_ids is None:
            return None
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}


def concat_batches(*conds: Conditioning) -> Conditioning:
    """Concatenate conditionings along the batch axis (fields absent in all stay None)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *conds)


def unet_denoiser(unet, params, cond: Conditioning, residuals: Callable | None = None) -> ModelFn:
    """The UNet (a Flax module and its parameters) as a model function under ``cond``.

    residuals: optional ``(x, t, i, cond) -> (down, mid)`` added to the UNet's skip
    connections and mid block (ControlNets: :func:`controlnet_residuals`)."""
    def model_fn(x, t, i):
        extra = {}
        if residuals is not None:  # on the latents alone, before any concatenated channels
            down, mid = residuals(x, t, i, cond)
            extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if cond.timestep_cond is not None:
            extra["timestep_cond"] = cond.timestep_cond
        if cond.concat is not None:
            x = jnp.concatenate([x, cond.concat.astype(x.dtype)], axis=-1)
        out = unet.apply({"params": params}, x.astype(unet.dtype), t, cond.context.astype(unet.dtype),
                         added_cond_kwargs=cond.added_cond_kwargs(), **extra)
        return out.astype(jnp.float32)
    return model_fn


def controlnet_residuals(controlnets, params, guess_mode: bool = False) -> Callable:
    """Several ControlNets' summed residuals, as diffusers' ``MultiControlNetModel``.

    controlnets: the Flax modules (static); params: one parameter tree each.  Reads
    ``cond.control``: ``{"image": (one float32 [B, H, W, C] in [0, 1] per ControlNet),
    "scale": float32 [B, K], "keep": float32 [B, K, steps]}``; ControlNet k acts at step i
    with ``scale[:, k] * keep[:, k, i]`` (diffusers' ``cond_scale``: a guidance window's
    steps outside it get 0).  Classifier-free guidance doubles the batch with the images;
    guess mode's negative half has scale 0, so its residuals are zeros as in diffusers."""
    def residuals(x, t, i, cond):
        c = cond.control
        down = mid = None
        for k, (net, p) in enumerate(zip(controlnets, params)):
            scale = c["scale"][:, k] * c["keep"][:, k, i]
            d, m = net.apply({"params": p}, x.astype(net.dtype), t, cond.context.astype(net.dtype), c["image"][k],
                             scale, guess_mode, cond.added_cond_kwargs())
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return down, mid
    return residuals


def guidance_window(start: float, end: float, first: int, num_steps: int) -> np.ndarray:
    """float32 [num_steps]: 1 at the sampler steps classifier-free guidance runs at, 0 elsewhere.

    As diffusers' ``ClassifierFreeGuidance(start=, stop=)`` guider (``_is_cfg_enabled``): over
    the ``n = num_steps - first`` steps that run (an img2img run starts at ``first``), step
    ``j`` is guided when ``int(start * n) <= j < int(end * n)``.  ``end = 0.8`` leaves the last
    fifth of the steps unguided: at the least noisy steps the image is laid out and guidance
    only multiplies the model's errors there (Kynkaanniemi et al. 2024)."""
    n = num_steps - first
    lo, hi = int(start * n), int(end * n)
    keep = np.zeros(num_steps, np.float32)
    keep[first + lo:first + max(hi, lo)] = 1.0
    return keep


def classifier_free_guidance(make_model_fn: Callable[[Conditioning], ModelFn], cond: Conditioning,
                             uncond: Conditioning, scale: jax.Array, rescale: jax.Array,
                             window: jax.Array | None = None) -> ModelFn:
    """Guided prediction ``u + scale * (c - u)``, rescaled, from one UNet call on a doubled batch.

    scale, rescale: float32 [B] (traced: changing them does not recompile).  A sample whose
    scale is <= 1 gets the conditional prediction, as diffusers (which turns guidance off at
    ``guidance_scale <= 1``); a batch in which no sample is guided runs without this wrapper.
    window: optional float32 [B, steps] (:func:`guidance_window`): at step i a sample with
    ``window[:, i] == 0`` gets the conditional prediction (diffusers' guider outside
    ``[start, stop)``).  A step at which no sample is guided runs the UNet on the conditional
    half alone (half the work; the program then holds a second UNet trace, so only programs
    with a window pay that compile time).
    """
    both = make_model_fn(concat_batches(uncond, cond))
    conditional = None if window is None else make_model_fn(cond)
    g = jnp.where(scale > 1.0, scale, 1.0).astype(jnp.float32)[:, None, None, None]
    r = rescale.astype(jnp.float32)[:, None, None, None]

    def model_fn(x, t, i):
        if window is None:
            return guided(x, t, i)
        return jax.lax.cond(jnp.any(window[:, i] > 0), lambda x: guided(x, t, i), lambda x: conditional(x, t, i), x)

    def guided(x, t, i):
        u, c = jnp.split(both(jnp.concatenate([x, x]), t, i), 2)
        mixed = u + g * (c - u)
        # Rescale: match the guided prediction's std to the conditional one's (per sample).
        std_c = jnp.std(c, axis=(1, 2, 3), keepdims=True, ddof=1)
        std_g = jnp.std(mixed, axis=(1, 2, 3), keepdims=True, ddof=1)
        rescaled = r * mixed * (std_c / std_g) + (1 - r) * mixed
        out = jnp.where(r > 0, rescaled, mixed)
        if window is not None:
            out = jnp.where(window[:, i][:, None, None, None] > 0, out, c)
        return out
    return model_fn
