"""Fine-tuning SDXL base models (``sd-jax train finetune --model SDXL_FOLDER``).

The loss is what diffusers' ``examples/text_to_image/train_text_to_image_sdxl.py``
computes (0.42), with the text encoders run inside the step so that they can be trained
(``--train unet,text_encoder,text_encoder_2``; the script precomputes them frozen):

* prompt embeddings: both encoders' ``hidden_states[-2]`` concatenated on the feature axis
  (768 + 1280 = 2048 wide on the real model); pooled: ``text_encoder_2``'s projected pooled
  output (``text_embeds``) -- :meth:`sd_jax.families.PromptEncoding.encode`, as generation;
* ``add_time_ids``: original size (h, w) + crop top-left (y, x) + target size (``size``,
  ``size``) of each image, from the data loader (:func:`sd_jax.train.data.batches` with
  ``time_ids``), fed to the UNet's ``text_time`` embedding with the pooled embedding;
* caption dropout (``--caption-dropout p``): a caption becomes ``""`` and is *encoded*
  (both tokenizers' ids of the empty prompt, one draw per example for both), as the script's
  ``proportion_empty_prompts`` does -- not the zeros ``force_zeros_for_empty_prompt`` gives
  an empty *negative* prompt at generation;
* epsilon or v-prediction targets and min-SNR-gamma weighting: :class:`~sd_jax.train.losses.DiffusionLoss`.

Not supported (one-line errors): the refiner (its UNet is conditioned on an aesthetic
score no caption folder has), SDXL inpainting UNets, ``--tokenizer``.  The export keeps
the model's scheduler config (``prediction_type`` set to the trained one) and its pipeline
options (``force_zeros_for_empty_prompt``), so it loads in sd-jax and in diffusers'
``StableDiffusionXLPipeline``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from sd_jax import families
from sd_jax.models.policy import Policy
from sd_jax.tokenizer import tokenize
from sd_jax.train import data as data_lib
from sd_jax.train.export import export_diffusers
from sd_jax.train.losses import DiffusionLoss, NoiseSchedule, drop_captions
from sd_jax.train.task import Task

__all__ = ["SDXLLoss", "build_sdxl_task"]


@dataclasses.dataclass(frozen=True)
class SDXLLoss(DiffusionLoss):
    """:class:`~sd_jax.train.losses.DiffusionLoss` conditioned as SDXL: ``batch["input_ids"]``
    is int [B, 2, L] (the two tokenizers' ids), ``batch["time_ids"]`` float32 [B, 6];
    ``params`` also has ``"text_encoder_2"``; ``empty_ids``: one tuple per tokenizer."""
    text_encoder_2: Any = None

    def condition(self, params, batch, key, p=None):
        ids = drop_captions(batch["input_ids"], self.empty_ids, self.caption_dropout if p is None else p, key)
        models = families.Models(text_encoder=self.text_encoder, unet=self.unet, vae=self.vae,
                                 text_encoder_2=self.text_encoder_2)
        context, pooled = families.SDXL.prompt.encode(models, params, (ids[:, 0], ids[:, 1]))
        return context, {"text_embeds": pooled, "time_ids": batch["time_ids"]}


def build_sdxl_task(config, model, vae=None) -> Task:
    """The fine-tuning task of a loaded SDXL base ``model`` (:class:`sd_jax.weights.loader.LoadedModel`,
    float32); ``vae``: ``(module, params)`` replacing its VAE (``--vae``), or None."""
    if model.family is not families.SDXL:
        raise ValueError(f"{config.model} is an SDXL refiner, which sd-jax does not fine-tune (only SDXL base "
                         f"models); fine-tune the base model instead (--model SDXL_BASE_FOLDER)")
    if model.inpainting:
        raise ValueError(f"{config.model} is an SDXL inpainting model, which sd-jax does not fine-tune; "
                         f"fine-tune an SDXL text-to-image base model")
    if config.tokenizer is not None:
        raise ValueError("--tokenizer does not apply to SDXL models: they are fine-tuned with their own two tokenizers")
    p = dict(jax.device_get(model.params))
    vae_module, vae_params = vae if vae is not None else (model.models.vae, p.pop("vae"))
    p.pop("vae", None)
    te_cfg, te2_cfg, unet_cfg = (model.configs[k] for k in ("text_encoder", "text_encoder_2", "unet"))
    vae_cfg = vae_module.config
    lengths = {te_cfg.max_position_embeddings, te2_cfg.max_position_embeddings}
    if len(lengths) != 1:
        raise ValueError(f"the two text encoders read prompts of different lengths ({sorted(lengths)} tokens)")
    if unet_cfg.in_channels != vae_cfg.latent_channels:
        raise ValueError(f"the UNet takes {unet_cfg.in_channels} channels but the VAE makes "
                         f"{vae_cfg.latent_channels}-channel latents")
    need = vae_cfg.downscale_factor * 2 ** (len(unet_cfg.block_out_channels) - 1)
    if config.size % need:
        raise ValueError(f"size {config.size} must be a multiple of {need} for this VAE and UNet")

    policy = Policy(config.compute_dtype, param_dtype=np.float32)     # float32 master weights
    build = lambda name, cfg: model.family.component(name).make(cfg, policy)  # noqa: E731
    models = families.Models(text_encoder=build("text_encoder", te_cfg), unet=build("unet", unet_cfg),
                             vae=build("vae", vae_cfg), text_encoder_2=build("text_encoder_2", te2_cfg))
    scheduler = dict(model.scheduler)
    if config.zero_terminal_snr is not None:
        scheduler["rescale_betas_zero_snr"] = config.zero_terminal_snr
    schedule = NoiseSchedule.from_dict(scheduler)
    prediction_type = config.prediction_type or scheduler.get("prediction_type", "epsilon")
    names = [t.name for t in model.family.tokenizers]
    tokenizers = {n: model.tokenizers[n] for n in names}
    length = lengths.pop()

    def tok(captions):   # int32 [B, 2, L]: the two tokenizers' ids side by side
        return np.stack([tokenize(tokenizers[n], captions, length) for n in names], axis=1)

    empty = tuple(tuple(int(i) for i in row) for row in tok([""])[0])
    loss = SDXLLoss(models.text_encoder, models.unet, models.vae, schedule=schedule, prediction_type=prediction_type,
                    snr_gamma=config.snr_gamma, caption_dropout=config.caption_dropout, empty_ids=empty,
                    consistency_weight=config.low_noise_consistency, consistency_below=config.consistency_below,
                    guided_weight=config.guided_loss, guided_scale=config.guided_scale,
                    guided_below=config.guided_below, text_blind_below=config.text_blind_below,
                    remat=config.remat, text_encoder_2=models.text_encoder_2)
    notes = []
    source = data_lib.data_source(config, notes)

    def export(folder, trained):
        export_diffusers(folder, models=models, params={**trained, "vae": vae_params}, tokenizer=None,
                         schedule=schedule, prediction_type=prediction_type, family=model.family,
                         scheduler=scheduler, tokenizers=tokenizers, options=model.options,
                         generation_defaults=model.generation_defaults)

    return Task(name="diffusion", params=p, trainable=tuple(config.train or ("unet",)), frozen={"vae": vae_params},
                loss=loss, source=source, batch_keys=("pixels", "input_ids", "time_ids"), export=export,
                tokenize=tok, notes=tuple(notes))
