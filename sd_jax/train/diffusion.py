"""The text-encoder + UNet recipe: models and parameters (from scratch or from a model),
loss, data and export of a diffusion training run."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from sd_jax import families
from sd_jax.data.tokenizer import vocab_size, write_tokenizer
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.models.policy import Policy
from sd_jax.tokenizer import load_tokenizer, tokenize
from sd_jax.train import data as data_lib
from sd_jax.train.config import TrainConfig
from sd_jax.train.export import export_diffusers
from sd_jax.train.losses import DiffusionLoss, NoiseSchedule
from sd_jax.train.sdxl import build_sdxl_task
from sd_jax.train.step import compile_cheap
from sd_jax.train.task import Task
from sd_jax.weights import loader
from sd_jax.weights.diffusers import read_config

__all__ = ["resolve_vae", "init_params", "param_shapes", "build_diffusion_task", "resolve_configs"]

def resolve_vae(path: str) -> str:
    """A VAE run folder (``vae/`` inside), a diffusers model (``vae/`` inside) or a ``vae/`` folder."""
    for cand in (os.path.join(path, "vae"), os.path.join(path, "model", "vae"), path):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise ValueError(f"no VAE in {path!r}: expected a VAE run folder or a diffusers vae/ folder (with config.json)")


def _init_fn(te_cfg, unet_cfg):
    def init(key):
        te = clip_lib.CLIPTextModel(te_cfg)
        un = unet_lib.UNet2DConditionModel(unet_cfg)
        return {"text_encoder": te.init_params(jax.random.fold_in(key, 1)),
                "unet": un.init(jax.random.fold_in(key, 2), *un.dummy_inputs())["params"]}
    return init


@functools.lru_cache(maxsize=4)
def _compiled_init(te_cfg, unet_cfg):
    return compile_cheap(_init_fn(te_cfg, unet_cfg), jax.random.key(0))


def init_params(te_cfg, unet_cfg, seed: int) -> dict:
    """Random ``{"text_encoder": ..., "unet": ...}`` parameters (float32) from the models' own initialisers."""
    return _compiled_init(te_cfg, unet_cfg)(jax.random.key(seed))


def param_shapes(te_cfg, unet_cfg) -> dict:
    """The ``jax.ShapeDtypeStruct`` tree of :func:`init_params` (nothing computed)."""
    return jax.eval_shape(_init_fn(te_cfg, unet_cfg), jax.random.key(0))


def _pretrained_init(init, te_cfg, tokenizer, config: TrainConfig) -> dict:
    """Random parameters whose text encoder has then read ``config.text_encoder_pretrain`` batches of
    caption labels (:mod:`sd_jax.train.text_pretrain`)."""
    from sd_jax.train.text_pretrain import pretrain_text_encoder
    params = jax.device_get(init())
    te, metrics = pretrain_text_encoder(te_cfg, tokenizer, params["text_encoder"], steps=config.text_encoder_pretrain,
                                        seed=config.seed, max_shapes=2)
    worst = min((k for k in metrics if k.startswith("acc_")), key=metrics.get)
    print(f"text encoder pre-trained for {config.text_encoder_pretrain} batches: label accuracy on new captions "
          f"{metrics[worst]:.1%} at worst ({worst[4:]})", flush=True)
    return {**params, "text_encoder": jax.device_get(te)}


def build_diffusion_task(config: TrainConfig) -> Task:
    """Models, parameters, loss, data and export of a text-encoder + UNet run."""
    dt = config.compute_dtype
    notes = []
    init = None
    family = families.TINY
    tokenizer = None
    generation_defaults = {}   # a fine-tuned model keeps its base's recommended settings
    if config.model is not None:
        model = loader.load(config.model, dtype=jnp.float32)
        if model.family.name.startswith("sdxl"):    # two text encoders, text-time conditioning
            vae = vae_lib.load(resolve_vae(config.vae), dtype=jnp.float32) if config.vae is not None else None
            return build_sdxl_task(config, model, vae)
        family, tokenizer, sched = model.family, model.tokenizer, model.scheduler
        generation_defaults = dict(model.generation_defaults)
        p = jax.device_get(model.params)
        te_cfg, unet_cfg, vae_cfg = (model.configs[k] for k in ("text_encoder", "unet", "vae"))
        params, vae_params = {"text_encoder": p["text_encoder"], "unet": p["unet"]}, p["vae"]
        del model, p
        schedule = NoiseSchedule.from_dict(sched)
        if config.zero_terminal_snr is not None:
            schedule = dataclasses.replace(schedule, rescale_betas_zero_snr=config.zero_terminal_snr)
        prediction_type = config.prediction_type or sched.get("prediction_type", "epsilon")
        trainable = config.train or ("unet",)
        if config.text_encoder_config is not None or config.unet_config is not None:
            raise ValueError("model configs cannot be given when fine-tuning a model (--model)")
    else:
        schedule = NoiseSchedule(rescale_betas_zero_snr=bool(config.zero_terminal_snr))
        prediction_type = config.prediction_type or "epsilon"
        trainable = config.train or ("text_encoder", "unet")
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer)
    if tokenizer is None:   # from scratch: the shapes tokenizer, written into the run folder
        tok_dir = os.path.join(config.out, "tokenizer")
        if jax.process_index() == 0:
            os.makedirs(config.out, exist_ok=True)
            write_tokenizer(tok_dir)
        tokenizer = load_tokenizer(tok_dir)

    if config.vae is not None:
        vae_model, vae_params = vae_lib.load(resolve_vae(config.vae), dtype=jnp.float32)
        vae_cfg = vae_model.config
    factor = vae_cfg.downscale_factor

    if config.model is None:
        te_cfg = config.text_encoder_config or families.shapes_text_encoder_config(len(tokenizer))
        unet_cfg = config.unet_config or _shapes_unet(config, vae_cfg, te_cfg)
        if te_cfg.vocab_size < len(tokenizer):
            raise ValueError(f"the text encoder's vocabulary ({te_cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({len(tokenizer)})")
        params = param_shapes(te_cfg, unet_cfg)
        init = functools.partial(init_params, te_cfg, unet_cfg, config.seed)
        if config.text_encoder_pretrain:
            init = functools.partial(_pretrained_init, init, te_cfg, tokenizer, config)
    if unet_cfg.in_channels != vae_cfg.latent_channels or unet_cfg.out_channels != vae_cfg.latent_channels:
        raise ValueError(f"the UNet takes {unet_cfg.in_channels} channels but the VAE makes "
                         f"{vae_cfg.latent_channels}-channel latents")
    cross = unet_cfg.cross_dims[0]
    if cross != te_cfg.hidden_size:
        raise ValueError(f"the UNet's cross_attention_dim {cross} differs from the text encoder's width "
                         f"{te_cfg.hidden_size}")
    need = factor * 2 ** (len(unet_cfg.block_out_channels) - 1)
    if config.size % need:
        raise ValueError(f"size {config.size} must be a multiple of {need} for this VAE and UNet")

    policy = Policy(dt, param_dtype=jnp.float32)     # float32 master weights
    te = clip_lib.CLIPTextModel(te_cfg, policy=policy)
    un = unet_lib.UNet2DConditionModel(unet_cfg, policy=policy)
    va = vae_lib.AutoencoderKL(vae_cfg, policy=policy)
    max_len = te_cfg.max_position_embeddings
    empty = tuple(int(i) for i in tokenize(tokenizer, [""], max_len)[0])
    loss = DiffusionLoss(te, un, va, schedule=schedule, prediction_type=prediction_type,
                         snr_gamma=config.snr_gamma, caption_dropout=config.caption_dropout, empty_ids=empty,
                         consistency_weight=config.low_noise_consistency, consistency_below=config.consistency_below,
                         guided_weight=config.guided_loss, guided_scale=config.guided_scale,
                         guided_below=config.guided_below, text_blind_below=config.text_blind_below,
                         remat=config.remat)
    source = data_lib.data_source(config, notes)

    def export(folder, p):
        export_diffusers(folder, models=families.Models(te, un, va), params={**p, "vae": vae_params},
                         tokenizer=tokenizer, schedule=schedule, prediction_type=prediction_type, family=family,
                         generation_defaults=generation_defaults)

    return Task(name="diffusion", params=params, trainable=tuple(trainable), frozen={"vae": vae_params},
                loss=loss, source=source, batch_keys=("pixels", "input_ids"), export=export,
                tokenize=lambda captions: tokenize(tokenizer, captions, max_len), init=init, notes=tuple(notes))


def resolve_configs(config: TrainConfig) -> TrainConfig:
    """``config`` with the default (preset) model configs of a from-scratch run filled in,
    so that ``run.json`` records the architecture and a resumed run cannot silently get
    another one."""
    if config.model is not None or (config.text_encoder_config and config.unet_config):
        return config
    vocab = len(load_tokenizer(config.tokenizer)) if config.tokenizer is not None else vocab_size()
    try:
        vae_cfg = vae_lib.VAEConfig.from_dict(read_config(resolve_vae(config.vae)))
    except ValueError as e:
        raise ValueError(f"cannot use the VAE in {config.vae!r}: {str(e).splitlines()[0]}") from None
    te = config.text_encoder_config or families.shapes_text_encoder_config(vocab)
    un = config.unet_config or _shapes_unet(config, vae_cfg, te)
    return dataclasses.replace(config, text_encoder_config=te, unet_config=un, unet_widths=None, unet_layers=None)


def _shapes_unet(config: TrainConfig, vae_cfg, te_cfg):
    """The shapes UNet for this run's image size, VAE and text encoder, with ``--unet-widths`` /
    ``--unet-layers`` applied."""
    shape = {}
    if config.unet_widths is not None:
        shape["block_out_channels"] = tuple(config.unet_widths)
    if config.unet_layers is not None:
        shape["layers_per_block"] = config.unet_layers
    return families.shapes_unet_config(config.size // vae_cfg.downscale_factor, vae_cfg.latent_channels,
                                       te_cfg.hidden_size, **shape)
