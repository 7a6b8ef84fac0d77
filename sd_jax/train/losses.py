"""The denoising loss of Stable Diffusion training, as pure functions of ``(params, batch, key)``.

One training example: encode the image with the frozen VAE (a draw from its posterior,
times ``scaling_factor``), draw a timestep ``t`` uniformly from ``[0, T)`` and Gaussian
noise ``eps``, form ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (``abar`` from the
model's beta schedule: SD's ``scaled_linear`` 0.00085 -> 0.012 over 1000 steps by
default) and regress the UNet's output on

* ``epsilon``: ``eps``;
* ``v_prediction``: ``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022).

Optional min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via
Min-SNR Weighting Strategy"): with ``SNR_t = abar_t / (1 - abar_t)`` the per-example
mean squared error is multiplied by ``min(SNR_t, gamma) / SNR_t`` for epsilon
prediction and ``min(SNR_t, gamma) / (SNR_t + 1)`` for v prediction (the same weight on
the x0 error in both cases).

Caption dropout (for classifier-free guidance): each caption's token ids are replaced
by the empty prompt's with probability ``p``.

:class:`DiffusionLoss` is a frozen, hashable dataclass: a jitted train step takes it as a
static argument, and two runs with equal settings share one compiled program.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.diffusion import parametrization, schedules
from sd_jax.sharding import target_platform
from sd_jax.models import vae as vae_lib

__all__ = ["PREDICTION_TYPES", "NoiseSchedule", "add_noise", "velocity", "prediction_target", "snr",
           "min_snr_weight", "drop_captions", "encode_latents", "remat_blocks", "DiffusionLoss"]

PREDICTION_TYPES = ("epsilon", "v_prediction")
ZERO_SNR_NEEDS_V = ("zero terminal SNR needs v-prediction (the noise is all there is to predict at the last "
                    "timestep): use --prediction-type v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule (fields of a diffusers ``scheduler_config.json``)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def alphas_cumprod(self) -> np.ndarray:
        """float32 ``abar_t``, ``t = 0 .. num_train_timesteps - 1`` (bit-identical to diffusers)."""
        return schedules.get_alphas_cumprod(self.beta_schedule, self.num_train_timesteps, self.beta_start,
                                            self.beta_end, rescale_betas_zero_snr=self.rescale_betas_zero_snr)


def _at(values, t, ndim):
    """``values[t]`` shaped to broadcast against a [B, ...] array of rank ``ndim``."""
    return jnp.asarray(values, jnp.float32)[t].reshape((-1,) + (1,) * (ndim - 1))


def add_noise(x0, noise, t, alphas_cumprod):
    """``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (DDPM forward process)."""
    a = _at(alphas_cumprod, t, x0.ndim)
    return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise


def velocity(x0, noise, t, alphas_cumprod):
    """``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
    return prediction_target(x0, noise, t, alphas_cumprod, "v_prediction")


def prediction_target(x0, noise, t, alphas_cumprod, prediction_type: str):
    """What the UNet regresses on at ``x_t = add_noise(x0, noise, t)`` (:func:`sd_jax.diffusion.parametrization.target`)."""
    parametrization.check(prediction_type, PREDICTION_TYPES, "prediction type")
    a = _at(alphas_cumprod, t, x0.ndim)
    return parametrization.target(x0, noise, jnp.sqrt(a), jnp.sqrt(1.0 - a), prediction_type)


def snr(t, alphas_cumprod):
    """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer timesteps ``t`` [B]."""
    a = jnp.asarray(alphas_cumprod, jnp.float32)[t]
    return a / (1.0 - a)


def min_snr_weight(t, alphas_cumprod, gamma: float, prediction_type: str):
    """Per-example min-SNR-gamma loss weights [B] (Hang et al. 2023)."""
    s = snr(t, alphas_cumprod)
    clipped = jnp.minimum(s, gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    raise ValueError(f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")


def drop_captions(input_ids, empty_ids, p: float, key):
    """Replace each row of ``input_ids`` [B, L] by ``empty_ids`` [L] with probability ``p``."""
    if not p:
        return input_ids
    drop = jax.random.uniform(key, (input_ids.shape[0],)) < p
    drop = drop.reshape((-1,) + (1,) * (input_ids.ndim - 1))   # ids [B, L] or [B, tokenizers, L] (SDXL)
    return jnp.where(drop, jnp.asarray(empty_ids, input_ids.dtype)[None], input_ids)


def mismatch_captions(input_ids, where):
    """``input_ids`` [B, ...] with each row where ``where`` [B] holds replaced by the next
    row's (the batch rolled by one): a caption that belongs to another image.

    Trained on such pairs at low noise, the best prediction there no longer depends on the
    caption (it is the image's own, whatever the text), so classifier-free guidance at
    those steps changes nothing, in any sampler."""
    if input_ids.shape[0] < 2:
        raise ValueError("text-blind training gives each low-noise example another example's caption, "
                         "so it needs batches of at least 2 (raise --batch-size)")
    w = where.reshape((-1,) + (1,) * (input_ids.ndim - 1))
    return jnp.where(w, jnp.roll(input_ids, 1, axis=0), input_ids)


def encode_latents(vae, vae_params, pixels, key):
    """Images [B, H, W, 3] in [-1, 1] -> a posterior draw in the diffusion latent space
    (``(z - shift) * scaling_factor``), float32, no gradient."""
    mean, logvar = vae.apply({"params": vae_params}, pixels.astype(vae.dtype), method="encode")
    z = vae_lib.sample_latent(mean, logvar, key)
    return jax.lax.stop_gradient(vae.config.scale_latents(z))


# --------------------------------------------------------------------------- remat

def remat_modules() -> tuple[type, ...]:
    """The UNet's repeated blocks (and their subclasses), rematerialised one by one: their
    activations are recomputed in the backward pass instead of stored (diffusers'
    gradient checkpointing does the same)."""
    from sd_jax.models import layers, unet
    return (layers.ResnetBlock2D, unet.Transformer2DModel)


_remat_active: set = set()
_remat_count = [0]
_inside_block = [0]
_remat_how = ["ordered"]


def _remat_interceptor(next_fun, args, kwargs, context):
    m = context.module
    if (_inside_block[0] or context.method_name != "__call__" or not isinstance(m, remat_modules())
            or m.path in _remat_active):
        return next_fun(*args, **kwargs)
    _remat_count[0] += 1
    _remat_active.add(m.path)
    try:
        if _remat_how[-1] == "checkpoint":
            # A lifted transform re-enters __call__ on a clone of ``m``, which the
            # ``_remat_active`` guard lets through unwrapped.
            return nn.remat(lambda mdl, *a, **k: mdl(*a, **k), prevent_cse=True)(m, *args, **kwargs)
        return _rematerialised(m, args, kwargs)
    finally:
        _remat_active.discard(m.path)


def _zero_tie(g, like):
    """Zeros shaped to add to ``like`` that XLA cannot compute before ``g`` (``0 * g``; XLA does
    not fold ``x * 0`` for floats).  Per example where ``g`` and ``like`` share the batch axis (no
    communication when both are split over it), else one element of ``g``."""
    if g.ndim and like.ndim and g.shape[0] == like.shape[0]:
        z = g[(slice(None),) + (0,) * (g.ndim - 1)].astype(jnp.float32) * 0.0
        return z.reshape((like.shape[0],) + (1,) * (like.ndim - 1)).astype(like.dtype)
    return (g.reshape(-1)[0].astype(jnp.float32) * 0.0).astype(like.dtype)


def _tied(tree, g):
    """``tree``'s floating leaves plus :func:`_zero_tie` zeros: the same values, available only
    once ``g`` is."""
    return jax.tree.map(lambda x: x + _zero_tie(g, x) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _rematerialised(m: nn.Module, args, kwargs):
    """``m(*args, **kwargs)`` whose backward pass recomputes ``m``'s forward instead of storing
    its activations, *after* the cotangent of its output exists.

    ``jax.checkpoint`` (``nn.remat``) stores only the inputs too, but its recomputation depends
    on nothing from the backward pass: it is ordered by an optimization barrier that XLA's CPU
    pipeline removes, after which the scheduler is free to run every block's recomputation
    right after the forward pass.  Measured on the CPU (SD 1.5 UNet gradient, 512x512, batch 1):
    12.85 GiB of temporaries with ``nn.remat`` on every block, 12.84 GiB without any remat,
    3.42 GiB with this.  Here the recomputation reads the output's cotangent (:func:`_tied`),
    so no backend can hoist it; the values are unchanged.

    On the CPU the block's weights are tied the same way, to its input in the forward pass and
    to the cotangent in the backward: with ``--shard-params`` each weight is all-gathered where
    it is used, and XLA's CPU scheduler otherwise gathers every block's weights at the start
    (SDXL: 14 GiB of full-size float32 copies live at once).  TPU and GPU schedulers place the
    gathers themselves, overlapping them with compute, so there the weights are left alone.
    """
    tie_weights = target_platform() == "cpu"
    unbound = m.clone(parent=None)
    variables = m.variables
    leaves, treedef = jax.tree.flatten((args, kwargs))

    def forward(variables, leaves):
        a, k = jax.tree.unflatten(treedef, leaves)
        _inside_block[0] += 1
        try:
            return unbound.apply(variables, *a, **k)
        finally:
            _inside_block[0] -= 1

    def first_float(leaves):
        return next((x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)), None)

    @jax.custom_vjp
    def block(variables, leaves):
        return forward(variables, leaves)

    def block_fwd(variables, leaves):
        x = first_float(leaves)
        used = _tied(variables, x) if tie_weights and x is not None else variables
        return forward(used, leaves), (variables, leaves)

    def block_bwd(res, g):
        variables, leaves = res
        first = jax.tree.leaves(g)[0]
        leaves = _tied(leaves, first)
        if tie_weights:
            variables = _tied(variables, first)
        _, vjp = jax.vjp(forward, variables, leaves)
        return vjp(g)

    block.defvjp(block_fwd, block_bwd)
    return block(variables, leaves)


def remat_blocks(fn, how: str = "ordered"):
    """``fn`` (which calls flax modules) with every ResNet and transformer block of the
    modules it calls rematerialised, without changing the model code.

    Wrapping the whole UNet call in ``jax.checkpoint`` would save nothing: the backward
    pass recomputes the entire forward and holds all its activations again.  Per-block
    remat keeps only the block inputs, at the price of one extra forward pass; each
    block's recomputation waits for its output's cotangent (see :func:`_rematerialised`),
    so the memory saving holds on every backend, the CPU included.  ``how="checkpoint"``:
    plain ``nn.remat`` instead (for measuring the difference; ``benchmarks/remat_memory.py``).
    """
    if how not in ("ordered", "checkpoint"):
        raise ValueError(f"unknown remat {how!r}; use 'ordered' or 'checkpoint'")

    def wrapped(*args, **kwargs):
        before = _remat_count[0]
        _remat_how.append(how)
        try:
            with nn.intercept_methods(_remat_interceptor):
                out = fn(*args, **kwargs)
        finally:
            _remat_how.pop()
        if _remat_count[0] == before:
            names = " or ".join(t.__name__ for t in remat_modules())
            raise RuntimeError(f"remat: no {names} block was called; the UNet's modules changed, "
                               f"update sd_jax.train.losses.remat_modules")
        return out
    return wrapped


# --------------------------------------------------------------------------- the loss

@dataclasses.dataclass(frozen=True)
class DiffusionLoss:
    """``loss(params, batch, key) -> (scalar loss, metrics)``.

    ``params``: ``{"text_encoder": ..., "unet": ..., "vae": ...}``; ``batch``:
    ``{"pixels": float [B, H, W, 3] in [-1, 1], "input_ids": int [B, L]}`` (or
    ``"latents"`` [B, h, w, C] already in the diffusion latent space instead of pixels).
    """
    text_encoder: Any
    unet: Any
    vae: Any
    schedule: NoiseSchedule = NoiseSchedule()
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None
    caption_dropout: float = 0.0
    empty_ids: tuple[int, ...] = ()
    remat: bool = False
    consistency_weight: float = 0.0
    consistency_below: int = 200
    guided_weight: float = 0.0
    guided_scale: float = 7.5
    guided_below: int = 200
    text_blind_below: int = 0

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; "
                             f"use one of {', '.join(PREDICTION_TYPES)}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr gamma must be positive, got {self.snr_gamma}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption dropout must be in [0, 1], got {self.caption_dropout}")
        if self.caption_dropout and not self.empty_ids:
            raise ValueError("caption dropout needs the empty prompt's token ids (empty_ids)")
        if self.schedule.rescale_betas_zero_snr and self.prediction_type == "epsilon":
            raise ValueError(ZERO_SNR_NEEDS_V)
        if self.consistency_weight < 0:
            raise ValueError(f"low-noise consistency weight must be >= 0, got {self.consistency_weight}")
        if self.consistency_weight and not self.empty_ids:
            raise ValueError("low-noise consistency needs the empty prompt's token ids (empty_ids)")
        if self.consistency_weight and not 0 < self.consistency_below <= self.schedule.num_train_timesteps:
            raise ValueError(f"low-noise consistency threshold must be a timestep in 1..{self.schedule.num_train_timesteps}, "
                             f"got {self.consistency_below}")
        if self.guided_weight < 0:
            raise ValueError(f"guided loss weight must be >= 0, got {self.guided_weight}")
        if self.guided_weight and not self.empty_ids:
            raise ValueError("the guided loss needs the empty prompt's token ids (empty_ids)")
        if self.guided_weight and not self.guided_scale > 1:
            raise ValueError(f"the guided loss's guidance scale must be > 1, got {self.guided_scale}")
        if self.guided_weight and self.prediction_type != "epsilon":
            raise ValueError("the guided loss is for epsilon prediction")
        if self.guided_weight and not 0 < self.guided_below <= self.schedule.num_train_timesteps:
            raise ValueError(f"guided loss threshold must be a timestep in 1..{self.schedule.num_train_timesteps}, "
                             f"got {self.guided_below}")
        if not 0 <= self.text_blind_below <= self.schedule.num_train_timesteps:
            raise ValueError(f"text-blind threshold must be a timestep in 0..{self.schedule.num_train_timesteps} "
                             f"(0 = off), got {self.text_blind_below}")

    def __call__(self, params, batch, key):
        k_lat, k_t, k_noise, k_drop = jax.random.split(key, 4)
        if "latents" in batch:
            x0 = batch["latents"].astype(jnp.float32)
        else:
            x0 = encode_latents(self.vae, params["vae"], batch["pixels"], k_lat)
        b = x0.shape[0]
        t = jax.random.randint(k_t, (b,), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        loss, metrics = self.loss_at(params, batch, x0, t, noise, k_drop)
        if self.consistency_weight:
            c = self.low_noise_consistency(params, batch, x0, jax.random.fold_in(key, 1))
            loss = loss + self.consistency_weight * c
            metrics = {**metrics, "consistency": c}
        if self.guided_weight:
            g = self.guided_loss(params, batch, x0, jax.random.fold_in(key, 2))
            loss = loss + self.guided_weight * g
            metrics = {**metrics, "guided": g}
        return loss, metrics

    def condition(self, params, batch, key, p: float | None = None):
        """``(context [B, L, D], added_cond_kwargs or None)`` for the batch's captions, each
        replaced by the empty prompt with probability ``p`` (default ``caption_dropout``;
        drawn from ``key``)."""
        ids = drop_captions(batch["input_ids"], self.empty_ids, self.caption_dropout if p is None else p, key)
        return self.text_encoder.apply({"params": params["text_encoder"]}, ids)["prompt_embeds"], None

    def _unet(self):
        def unet(p, x, tt, c, a):
            return self.unet.apply({"params": p}, x, tt, c, added_cond_kwargs=a)

        return remat_blocks(unet) if self.remat else unet

    def _low_noise_quarter(self, batch, x0, key, below: int):
        """The batch's first quarter (at least one example) noised at timesteps drawn from
        ``[0, below)``: ``(sub-batch, alphas_cumprod, t, noise, x_t in the UNet's dtype)``."""
        k = max(1, x0.shape[0] // 4)
        k_t, k_noise = jax.random.split(key)
        ac = self.schedule.alphas_cumprod()
        t = jax.random.randint(k_t, (k,), 0, below)
        noise = jax.random.normal(k_noise, x0[:k].shape, jnp.float32)
        xt = add_noise(x0[:k], noise, t, ac).astype(self.unet.dtype)
        return jax.tree.map(lambda a: a[:k], batch), ac, t, noise, xt

    def low_noise_consistency(self, params, batch, x0, key):
        """Mean squared difference between the empty-prompt prediction and the (stop-gradient)
        captioned one, at timesteps below ``consistency_below``, on a quarter of the batch.

        Where the noisy latent alone decides the image, the best captioned and empty-prompt
        predictions are the same, and classifier-free guidance there only multiplies the
        model's errors (Kynkaenniemi et al. 2024 find guidance at low noise harmful; here it
        turns squares into four-pointed stars at guidance 7.5).  Teaching the empty-prompt
        prediction to match the captioned one makes guidance a no-op at those steps in every
        sampler, diffusers' defaults included.
        """
        sub, _, t, _, xt = self._low_noise_quarter(batch, x0, key, self.consistency_below)
        unet = self._unet()
        cond, added = self.condition(params, sub, key, p=0.0)
        empty, added_empty = self.condition(params, sub, key, p=1.0)
        teacher = jax.lax.stop_gradient(unet(params["unet"], xt, t, cond.astype(self.unet.dtype), added))
        student = unet(params["unet"], xt, t, empty.astype(self.unet.dtype), added_empty)
        return jnp.mean((student.astype(jnp.float32) - teacher.astype(jnp.float32)) ** 2)

    def guided_loss(self, params, batch, x0, key):
        """Mean squared error of the clean latent that classifier-free guidance at
        ``guided_scale`` predicts (``u + g (c - u)`` from the captioned and empty-prompt
        noise predictions, gradients through both), at timesteps below ``guided_below``, on a
        quarter of the batch.

        Other tools guide every step at 7.5 by default; at low noise that multiplies the
        difference between the two predictions by 6.5 and the image follows it (squares
        become stars).  This term trains the model for the prediction those samplers
        actually use there.  The error is taken on the clean latent (the eps error times
        ``sqrt(1 - abar) / sqrt(abar)``), the quantity the sampler moves towards.
        """
        sub, ac, t, noise, xt = self._low_noise_quarter(batch, x0, key, self.guided_below)
        cond, added = self.condition(params, sub, key, p=0.0)
        empty, added_empty = self.condition(params, sub, key, p=1.0)
        context = jnp.concatenate([empty, cond]).astype(self.unet.dtype)
        added = None if added is None else jax.tree.map(lambda e, a: jnp.concatenate([e, a]), added_empty, added)
        pred = self._unet()(params["unet"], jnp.concatenate([xt, xt]), jnp.concatenate([t, t]), context, added)
        u, c = jnp.split(pred.astype(jnp.float32), 2)
        guided = u + self.guided_scale * (c - u)
        a = jnp.asarray(ac, jnp.float32)[t][:, None, None, None]
        return jnp.mean(((guided - noise) * jnp.sqrt((1 - a) / a)) ** 2)

    def loss_at(self, params, batch, x0, t, noise, drop_key):
        """The loss at given latents ``x0`` [B, h, w, C], timesteps ``t`` int [B] and ``noise``
        (what :meth:`__call__` draws), captions dropped with ``drop_key``."""
        ac = self.schedule.alphas_cumprod()
        xt = add_noise(x0, noise, t, ac)
        if self.text_blind_below:
            batch = {**batch, "input_ids": mismatch_captions(batch["input_ids"], t < self.text_blind_below)}
        context, added = self.condition(params, batch, drop_key)
        unet = self._unet()
        pred = unet(params["unet"], xt.astype(self.unet.dtype), t, context.astype(self.unet.dtype), added)
        target = prediction_target(x0, noise, t, ac, self.prediction_type)
        per_example = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=(1, 2, 3))
        mse = jnp.mean(per_example)
        if self.snr_gamma is not None:
            loss = jnp.mean(per_example * min_snr_weight(t, ac, self.snr_gamma, self.prediction_type))
        else:
            loss = mse
        return loss, {"mse": mse}
