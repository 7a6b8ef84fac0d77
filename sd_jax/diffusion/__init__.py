"""Diffusion schedules and samplers (pure JAX, numerically equal to diffusers' schedulers)."""

from . import schedules
from .samplers import (
    SCHEDULERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    DPMSolverSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LMSSampler,
    PNDMSampler,
    Sampler,
    SchedulerConfig,
    UniPCSampler,
    default_scheduler_name,
    make_sampler,
)

__all__ = [
    "schedules",
    "SCHEDULERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "DPMSolverSDESampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "HeunSampler",
    "LMSSampler",
    "PNDMSampler",
    "Sampler",
    "SchedulerConfig",
    "UniPCSampler",
    "default_scheduler_name",
    "make_sampler",
]
