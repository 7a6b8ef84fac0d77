"""The sampling loop: latents in, latents out, over a range of a sampler's steps.

:func:`sample` runs steps ``[start, end)`` of a sampler with one ``lax.scan``.  A generation
split at any step and continued (passing the returned sampler state on) gives the same
latents as one run through; passing no state starts the second part afresh, which is what
diffusers does when a second model continues where a first stopped (SDXL's base with
``denoising_end`` and refiner with ``denoising_start``): :func:`step_range` turns those
fractions into step indices the way diffusers does.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from sd_jax.diffusion.denoisers import ModelFn

LOOPS = ("scan", "python")


def sample(model_fn: ModelFn, sampler, x: jax.Array, *, start: int = 0, end: Optional[int] = None,
           state: Optional[dict] = None, noise_fn: Optional[Callable[[jax.Array], jax.Array]] = None,
           post_step: Optional[Callable[[jax.Array, jax.Array], jax.Array]] = None, loop: str = "scan"):
    """Run ``sampler``'s steps ``start .. end - 1`` on the latents ``x``.

    Args:
      model_fn: ``f(x_in, t, i) -> prediction`` (see :mod:`sd_jax.diffusion.denoisers`).
      sampler: a :class:`~sd_jax.diffusion.samplers.Sampler` (static).
      x: float32 [B, h, w, C] latents at the noise level of step ``start``.
      start, end: step indices (Python ints; ``end`` defaults to ``sampler.num_steps``).
      state: the sampler state returned by an earlier call that stopped at ``start``; None
        starts afresh (``sampler.init_state``).
      noise_fn: ``i -> standard-normal noise like x`` for stochastic samplers (called with
        the index of the step being taken plus one, so a sample's noise depends only on its
        seed and the step).
      post_step: ``(x, i) -> x`` applied after each step (inpainting's latent blending).
      loop: ``"scan"`` (one ``lax.scan``) or ``"python"`` (unrolled; for debugging).
    Returns:
      (x, state): the latents after step ``end - 1`` and the sampler state to continue with.
    """
    end = sampler.num_steps if end is None else end
    if not 0 <= start <= end <= sampler.num_steps:
        raise ValueError(f"step range [{start}, {end}) is outside the sampler's {sampler.num_steps} steps")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if sampler.needs_noise and noise_fn is None:
        raise ValueError(f"{sampler.name} is stochastic: sample() needs a noise_fn")
    timesteps = jnp.asarray(sampler.timesteps)

    def body(carry, i):
        x, state = carry
        out = model_fn(sampler.scale_model_input(x, i), timesteps[i], i)
        noise = noise_fn(i + 1) if sampler.needs_noise else None
        x, state = sampler.step(state, out, x, i, noise)
        if post_step is not None:
            x = post_step(x, i)
        return (x, state), None

    carry = (x, sampler.init_state(x.shape) if state is None else state)
    if loop == "scan":
        carry, _ = jax.lax.scan(body, carry, jnp.arange(start, end, dtype=jnp.int32))
    else:
        for i in range(start, end):
            carry, _ = body(carry, jnp.int32(i))
    return carry


def step_range(sampler, *, denoising_start: Optional[float] = None,
               denoising_end: Optional[float] = None) -> tuple[int, int]:
    """Step indices ``(start, end)`` for fractions of the noise schedule, as diffusers' SDXL pipelines.

    ``denoising_end = 0.8``: stop once the timestep falls below ``(1 - 0.8) * T``;
    ``denoising_start = 0.8``: begin at the first step below that timestep (a second-order
    sampler begins on a whole step).  None: the schedule's own start / end.
    """
    T = sampler.config.num_train_timesteps
    ts = [int(t) for t in sampler.timesteps]
    start, end = 0, len(ts)
    for name, v in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if v is not None and not 0.0 < float(v) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {v}")
    if denoising_end is not None:
        cutoff = int(round(T - denoising_end * T))
        end = sum(1 for t in ts if t >= cutoff)
    if denoising_start is not None:
        cutoff = int(round(T - denoising_start * T))
        n = sum(1 for t in ts if t < cutoff)
        if sampler.order == 2 and n % 2 == 0:
            n += 1
        start = len(ts) - n
    if start >= end:
        raise ValueError(f"denoising_start={denoising_start} and denoising_end={denoising_end} leave no step")
    return start, end
