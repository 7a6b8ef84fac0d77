"""Training the VAE (``AutoencoderKL``) of the small model, with the machinery of
:mod:`sd_jax.train.loop` (checkpoints, exact resumption, logging, sharding, EMA).

Loss per image, averaged over the batch::

    recon(x, D(z)) + edge_weight * recon(grad x, grad D(z)) + kl_weight * KL(q(z|x) || N(0, I)) / P

with ``z`` a draw from the posterior, ``recon`` the mean absolute (``"l1"``) or squared
(``"l2"``) error per pixel and channel, ``grad`` the horizontal and vertical finite
differences (a cheap edge term: it penalises blurred or misplaced edges directly), the
KL summed over the latent and divided by ``P = H * W * 3`` (so ``kl_weight`` means what
it means in the LDM code, 1e-6 there).

At export the latent ``scaling_factor`` is set to ``1 / std`` of the posterior means
over held-out images, so the diffusion model sees unit-variance latents.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax import families
from sd_jax.models import vae as vae_lib
from sd_jax.models.policy import Policy
from sd_jax.train import data as data_lib
from sd_jax.train.checkpointing import check_run_folder
from sd_jax.train.config import RunConfig
from sd_jax.train.diffusion import resolve_vae
from sd_jax.train.loop import TrainResult, run
from sd_jax.train.step import compile_cheap
from sd_jax.train.task import Task

__all__ = ["VAETrainConfig", "VAELoss", "small_vae_config", "build_vae_task", "train_vae", "calibrate_scaling_factor"]

RECON = ("l1", "l2")


small_vae_config = families.shapes_vae_config   # the preset, registered with the family


@dataclasses.dataclass(frozen=True)
class VAETrainConfig(RunConfig):
    """VAE training settings.  ``vae_config``: the architecture (default :func:`small_vae_config`);
    ``model``: start from this VAE instead (a run folder, a diffusers model or a ``vae/`` folder)."""
    vae_config: vae_lib.VAEConfig | None = None
    model: str | None = None
    kl_weight: float = 1e-6
    recon: str = "l1"
    edge_weight: float = 1.0
    lr: float = 1e-3
    decoder_only: bool = False
    latent_noise: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.latent_noise < 0:
            raise ValueError(f"--latent-noise must be >= 0, got {self.latent_noise}")
        if self.decoder_only and self.model is None:
            raise ValueError("--decoder-only fine-tunes a trained VAE's decoder (its encoder, and so its latent "
                             "space, stay as they are): give the VAE with --model")
        if self.recon not in RECON:
            raise ValueError(f"unknown reconstruction loss {self.recon!r}; use l1 or l2")
        if self.kl_weight < 0 or self.edge_weight < 0:
            raise ValueError("kl weight and edge weight must be >= 0")
        if self.model is not None and not os.path.exists(self.model):
            raise ValueError(f"model {self.model!r} not found")
        if self.model is not None and self.vae_config is not None:
            raise ValueError("give a VAE config or a starting model, not both")


def _err(a, b, kind):
    d = a - b
    return jnp.abs(d) if kind == "l1" else d * d


@dataclasses.dataclass(frozen=True)
class VAELoss:
    """``loss(params, batch, key) -> (loss, metrics)`` with ``params = {"vae": ...}``.

    ``latent_noise``: the decoder sees the latent plus Gaussian noise of a standard deviation
    drawn uniformly per image from [0, ``latent_noise``] (in units of the batch's latent
    standard deviation), and must still draw the clean image: a decoder that maps the slightly
    wrong latents a diffusion model ends with (guidance multiplies its errors) to the nearest
    clean image instead of a distorted one.
    """
    model: vae_lib.AutoencoderKL
    kl_weight: float = 1e-6
    recon: str = "l1"
    edge_weight: float = 1.0
    latent_noise: float = 0.0

    def __call__(self, params, batch, key):
        x = batch["pixels"].astype(jnp.float32)
        p = {"params": params["vae"]}
        mean, logvar = self.model.apply(p, x.astype(self.model.dtype), method="encode")
        z = vae_lib.sample_latent(mean, logvar, key)
        if self.latent_noise:
            k_scale, k_noise = jax.random.split(jax.random.fold_in(key, 1))
            scale = jax.random.uniform(k_scale, (z.shape[0],) + (1,) * (z.ndim - 1)) * self.latent_noise
            std = jax.lax.stop_gradient(jnp.std(mean.astype(jnp.float32)))
            z = z + scale * std * jax.random.normal(k_noise, z.shape, jnp.float32)
        y = self.model.apply(p, z, method="decode").astype(jnp.float32)
        rec = jnp.mean(_err(y, x, self.recon))
        edge = 0.5 * (jnp.mean(_err(jnp.diff(y, axis=1), jnp.diff(x, axis=1), self.recon))
                      + jnp.mean(_err(jnp.diff(y, axis=2), jnp.diff(x, axis=2), self.recon)))
        kl = jnp.mean(vae_lib.kl_divergence(mean, logvar)) / (x.shape[1] * x.shape[2] * x.shape[3])
        loss = rec + self.edge_weight * edge + self.kl_weight * kl
        mse = jnp.mean((jnp.clip(y, -1, 1) - x) ** 2)
        psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))  # peak-to-peak 2 in [-1, 1]
        return loss, {"rec": rec, "edge": edge, "kl": kl, "psnr": psnr}


def calibrate_scaling_factor(model, params, source, n: int = 256, batch: int = 32, seed: int = 12345) -> float:
    """``1 / std`` of the posterior means of ``n`` images of ``source`` (rounded to 5 digits)."""
    it = data_lib.batches(source, batch, seed)
    enc = None
    means = []
    for _ in range(max(1, n // batch)):
        x = jnp.asarray(next(it)["pixels"], model.dtype)
        if enc is None:
            enc = compile_cheap(lambda p, x: model.apply({"params": p}, x, method="encode")[0], params, x)
        means.append(np.asarray(enc(params, x), np.float64))
    std = float(np.concatenate(means).std())
    return float(f"{1.0 / max(std, 1e-8):.5g}")


def _init_fn(cfg: vae_lib.VAEConfig):
    x = jnp.zeros((1, 2 * cfg.downscale_factor, 2 * cfg.downscale_factor, cfg.in_channels))
    return lambda key: vae_lib.AutoencoderKL(cfg).init(key, x)["params"]


@functools.lru_cache(maxsize=4)
def _compiled_init(cfg: vae_lib.VAEConfig):
    return compile_cheap(_init_fn(cfg), jax.random.key(0))


def build_vae_task(config: VAETrainConfig) -> Task:
    dt = config.compute_dtype
    init = None
    if config.model is not None:
        start, params = vae_lib.load(resolve_vae(config.model), dtype=jnp.float32)
        cfg = start.config
    else:
        cfg = config.vae_config or small_vae_config(sample_size=config.size)
        params = jax.eval_shape(_init_fn(cfg), jax.random.key(config.seed))
        init = functools.partial(_compiled_init(cfg), jax.random.key(config.seed))
    if config.size % cfg.downscale_factor:
        raise ValueError(f"size {config.size} must be a multiple of the VAE's downscale factor {cfg.downscale_factor}")
    model = vae_lib.AutoencoderKL(cfg, policy=Policy(dt, param_dtype=jnp.float32))     # float32 master weights
    if config.data is not None:
        source = data_lib.ImageCaptionFolder(config.data, config.size, skip_bad=config.skip_bad_images)
        held_out = source
        notes = (source.summary(),)
    else:
        notes = ()
        source = data_lib.SyntheticShapes(config.seed, config.size, "train", config.max_shapes)
        held_out = data_lib.SyntheticShapes(config.seed + 1, config.size, "all", config.max_shapes)
    loss = VAELoss(model, kl_weight=config.kl_weight, recon=config.recon, edge_weight=config.edge_weight,
                   latent_noise=config.latent_noise)
    # --decoder-only: the encoder (and so the latent space a UNet was trained on) stays as it is.
    trainable = (r"vae/decoder/", r"vae/post_quant_conv/") if config.decoder_only else ("vae",)

    def export(folder, p):
        f32 = vae_lib.AutoencoderKL(cfg)
        # A decoder-only run keeps the latent space, so the scaling factor a UNet was trained with.
        sf = cfg.scaling_factor if config.decoder_only else calibrate_scaling_factor(f32, p["vae"], held_out)
        vae_lib.save(folder, dataclasses.replace(cfg, scaling_factor=sf, sample_size=config.size),
                     jax.tree.map(lambda x: np.asarray(x, np.float32), p["vae"]))

    return Task(name="vae", params={"vae": params}, trainable=trainable, frozen={}, loss=loss, source=source,
                batch_keys=("pixels",), export=export, export_name="vae", notes=notes,
                init=None if init is None else (lambda: {"vae": init()}))


def train_vae(config: VAETrainConfig, mesh=None) -> TrainResult:
    """Train a VAE; the result is exported to ``config.out/vae`` (a diffusers ``vae/`` folder)."""
    if config.model is None and config.vae_config is None:  # record the preset in run.json
        config = dataclasses.replace(config, vae_config=small_vae_config(sample_size=config.size))
    check_run_folder(config, "vae")
    return run(config, build_vae_task(config), mesh=mesh)
