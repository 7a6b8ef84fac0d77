"""Exporting a trained text encoder + UNet (+ VAE) as a diffusers model folder."""
from __future__ import annotations

import os
import shutil

import jax
import numpy as np

from sd_jax import families
from sd_jax.diffusion.samplers import default_scheduler_name
from sd_jax.train.losses import NoiseSchedule
from sd_jax.weights import loader

__all__ = ["scheduler_config", "export_diffusers"]

def scheduler_config(schedule: NoiseSchedule, prediction_type: str) -> dict:
    """The ``scheduler/scheduler_config.json`` of an exported model (DPM-Solver++ 2M)."""
    return {
        "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": families.DIFFUSERS_VERSION,
        "num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule, "trained_betas": None,
        "prediction_type": prediction_type, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
        "use_karras_sigmas": False, "final_sigmas_type": "zero", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "variance_type": None,
        # "trailing" starts sampling at t = T - 1 (pure noise), which a small model needs.
        "timestep_spacing": "trailing", "steps_offset": 1,
        "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
    }


def export_diffusers(folder: str, *, models: families.Models, params: dict, tokenizer, schedule: NoiseSchedule,
                     prediction_type: str, family: families.Family = families.TINY,
                     scheduler: dict | None = None, tokenizers: dict | None = None,
                     options: dict | None = None, generation_defaults: dict | None = None) -> None:
    """Write the trained model as a diffusers folder (replacing ``folder``), float32 weights.

    ``params``: ``{"text_encoder": ..., "unet": ..., "vae": ...}``; ``models``: the modules
    (only their configs are used); ``tokenizer``: a transformers tokenizer.  ``scheduler``:
    the ``scheduler_config.json`` to write (its ``prediction_type`` set to ``prediction_type``;
    default: :func:`scheduler_config`); ``tokenizers``: ``{folder: tokenizer}`` in place of
    ``tokenizer`` (SDXL's two); ``options``: the pipeline options of ``model_index.json``;
    ``generation_defaults``: the recommended settings of a model fine-tuned from one that has
    them (its ``generation_defaults.json``), kept for the result.
    """
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    sched = (scheduler_config(schedule, prediction_type) if scheduler is None
             else {**scheduler, "prediction_type": prediction_type})
    model = loader.LoadedModel(family, models, params, tokenizers or {family.tokenizers[0].name: tokenizer}, sched,
                               default_scheduler_name(sched["_class_name"], sched), source=None,
                               options=dict(options or {}), generation_defaults=dict(generation_defaults or {}))
    loader.save(model, folder, "diffusers")
