"""Training settings: what every run has (:class:`RunConfig`) and the text-encoder + UNet
run (:class:`TrainConfig`); the VAE's is in :mod:`sd_jax.train.vae`."""
from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp

from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.train import optim
from sd_jax.train.losses import PREDICTION_TYPES, ZERO_SNR_NEEDS_V

__all__ = ["DTYPES", "RESTART_MAY_CHANGE", "RunConfig", "TrainConfig"]

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}

# Settings that may change when a run is restarted (everything else must match run.json).
RESTART_MAY_CHANGE = ("out", "progress", "save_every", "keep", "stop_after", "export", "shard_params")


# --------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings every training run has (the diffusion and VAE configs extend it).

    Steps count batches; with ``grad_accum = k`` the optimizer updates every ``k``
    batches (see :mod:`sd_jax.train.optim`).  ``batch_size`` is the global batch (split
    over the devices; it must divide by their number).  ``data``: a folder of images with
    captions (:class:`sd_jax.train.data.ImageCaptionFolder`), or None for the synthetic
    shapes; ``skip_bad_images``: train without its unreadable images instead of refusing.
    ``stop_after``: return after that many steps (checkpoint saved, no export), as if
    killed there -- for tests and for training in slices.
    """
    out: str
    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "cosine"
    final_lr_ratio: float = 0.0
    weight_decay: float = 1e-2
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    ema: float = 0.0
    dtype: str = "fp32"
    remat: bool = False
    save_every: int = 500
    keep: int = 3
    data: str | None = None
    skip_bad_images: bool = False
    size: int = 64
    random_flip: bool = False
    max_shapes: int = 1
    export: bool = True
    progress: bool = True
    stop_after: int | None = None
    shard_params: bool = False

    def __post_init__(self):
        if not self.out:
            raise ValueError("an output folder is needed (--out DIR)")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported for training; use bf16 or fp32")
        if self.save_every < 1:
            raise ValueError(f"save-every must be at least 1, got {self.save_every}")
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, got {self.keep}")
        if self.size < 8 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {self.size}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be at least 1, got {self.stop_after}")
        if self.data is not None and not os.path.isdir(self.data):
            raise ValueError(f"data folder {self.data!r} not found")
        self.optim_config(("x",))  # validates the optimizer settings

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def optim_config(self, trainable) -> optim.OptimConfig:
        return optim.OptimConfig(lr=self.lr, steps=self.steps, warmup=self.warmup, schedule=self.schedule,
                                 final_lr_ratio=self.final_lr_ratio, weight_decay=self.weight_decay,
                                 clip_norm=self.clip_norm or None, grad_accum=self.grad_accum, ema=self.ema,
                                 trainable=tuple(trainable))


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Text-encoder + UNet training (from scratch or fine-tuning).

    From scratch (``model`` None): ``vae`` (a trained VAE: its run folder or a diffusers
    ``vae/`` folder) is required; the text encoder and UNet are built from
    ``text_encoder_config`` / ``unet_config`` (default: the small shapes model,
    :func:`sd_jax.families.shapes_text_encoder_config` / :func:`~sd_jax.families.shapes_unet_config`) with the shapes
    tokenizer (``tokenizer``: another CLIP tokenizer folder).  Fine-tuning: ``model`` is
    a diffusers folder or an sd-jax checkpoint; ``vae`` may replace its VAE.

    ``train``: components (``unet``, ``text_encoder``) or regexes over parameter paths
    (see :mod:`sd_jax.train.optim`); default: both from scratch, ``unet`` when
    fine-tuning.  ``prediction_type``: None = the model's scheduler config (epsilon from
    scratch).  ``snr_gamma``: min-SNR-gamma weighting (e.g. 5.0), None = off.
    ``zero_terminal_snr``: rescale the betas so the last timestep is pure noise (Lin et al.
    2023; needs v-prediction), None = the model's scheduler config (off from scratch).
    ``text_encoder_pretrain``: from scratch, batches of caption reading for the new text
    encoder before the run (:mod:`sd_jax.train.text_pretrain`; 0 = none).
    ``low_noise_consistency``: weight of the loss that teaches the empty-prompt prediction to
    match the captioned one below timestep ``consistency_below`` (0 = off; see
    :meth:`sd_jax.train.losses.DiffusionLoss.low_noise_consistency`).
    ``guided_loss``: weight of the loss on the clean latent that guidance at ``guided_scale``
    predicts below timestep ``guided_below`` (0 = off; see
    :meth:`sd_jax.train.losses.DiffusionLoss.guided_loss`).
    ``text_blind_below``: at timesteps below it, train on another example's caption, so the
    model learns to ignore the text there and guidance at the last steps is a no-op (0 = off;
    see :func:`sd_jax.train.losses.mismatch_captions`).
    ``unet_widths`` / ``unet_layers``: from scratch, the shapes UNet's block widths (one per
    level, e.g. ``(64, 64, 128)``) and ResNets per level instead of its defaults (32/64/128, 1).
    """
    model: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    text_encoder_config: clip_lib.CLIPTextConfig | None = None
    unet_config: unet_lib.UNetConfig | None = None
    train: tuple[str, ...] | None = None
    prediction_type: str | None = None
    snr_gamma: float | None = None
    caption_dropout: float = 0.1
    zero_terminal_snr: bool | None = None
    text_encoder_pretrain: int = 0
    low_noise_consistency: float = 0.0
    consistency_below: int = 200
    guided_loss: float = 0.0
    guided_scale: float = 7.5
    guided_below: int = 200
    text_blind_below: int = 0
    unet_widths: tuple[int, ...] | None = None
    unet_layers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.zero_terminal_snr and (self.prediction_type or ("epsilon" if self.model is None else None)) == "epsilon":
            raise ValueError(ZERO_SNR_NEEDS_V)
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; "
                             f"use one of {', '.join(PREDICTION_TYPES)}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr gamma must be positive, got {self.snr_gamma}")
        if self.text_encoder_pretrain < 0:
            raise ValueError(f"text encoder pre-training steps must be >= 0, got {self.text_encoder_pretrain}")
        if self.text_encoder_pretrain and self.model is not None:
            raise ValueError("--pretrain-text-encoder is for a text encoder trained from scratch; "
                             "a --model brings its own")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption dropout must be in [0, 1), got {self.caption_dropout}")
        if self.low_noise_consistency < 0:
            raise ValueError(f"--low-noise-consistency must be >= 0, got {self.low_noise_consistency}")
        if not 0 < self.consistency_below <= 1000:
            raise ValueError(f"--consistency-below must be a timestep in 1..1000, got {self.consistency_below}")
        if self.guided_loss < 0:
            raise ValueError(f"--guided-loss must be >= 0, got {self.guided_loss}")
        if self.guided_loss and not self.guided_scale > 1:
            raise ValueError(f"--guided-scale must be > 1 (guidance that changes the prediction), got {self.guided_scale}")
        if not 0 < self.guided_below <= 1000:
            raise ValueError(f"--guided-below must be a timestep in 1..1000, got {self.guided_below}")
        if not 0 <= self.text_blind_below <= 1000:
            raise ValueError(f"--text-blind-below must be a timestep in 0..1000 (0 = off), got {self.text_blind_below}")
        if self.text_blind_below and self.batch_size < 2:
            raise ValueError("--text-blind-below gives low-noise examples another example's caption, "
                             "so it needs --batch-size 2 or more")
        if self.guided_loss and self.prediction_type == "v_prediction":
            raise ValueError("--guided-loss is for epsilon-prediction models; drop it or --prediction-type v_prediction")
        if self.unet_widths is not None or self.unet_layers is not None:
            if self.model is not None or self.unet_config is not None:
                raise ValueError("--unet-widths/--unet-layers shape a UNet trained from scratch; "
                                 "a --model brings its own")
            if self.unet_widths is not None and (len(self.unet_widths) != 3 or any(
                    w <= 0 or w % 16 for w in self.unet_widths)):
                raise ValueError(f"--unet-widths needs 3 widths, each a positive multiple of 16 (the UNet's "
                                 f"GroupNorm groups), e.g. 64,64,128; got {','.join(map(str, self.unet_widths))}")
            if self.unet_layers is not None and not 1 <= self.unet_layers <= 4:
                raise ValueError(f"--unet-layers must be 1..4 ResNets per level, got {self.unet_layers}")
        for name in ("model", "vae", "tokenizer"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ValueError(f"{name} {path!r} not found")
        if self.model is None and self.vae is None:
            raise ValueError("training from scratch needs a trained VAE (--vae DIR; train one with "
                             "`sd-jax train vae`), or start from a model (--model)")
