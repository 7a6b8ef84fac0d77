"""Diffusion schedules, samplers (pure JAX, numerically equal to diffusers' schedulers) and the eps/v/x0 table."""

from . import parametrization, schedules
from .samplers import (
    SCHEDULERS,
    DDIMSampler,
    DDPMSampler,
    DPMSolverMultistepSampler,
    DPMSolverSDESampler,
    EulerAncestralSampler,
    EulerSampler,
    HeunSampler,
    LCMSampler,
    LMSSampler,
    PNDMSampler,
    Sampler,
    SchedulerConfig,
    UniPCSampler,
    default_scheduler_name,
    make_sampler,
)

__all__ = [
    "parametrization",
    "schedules",
    "SCHEDULERS",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverMultistepSampler",
    "DPMSolverSDESampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "HeunSampler",
    "LCMSampler",
    "LMSSampler",
    "PNDMSampler",
    "Sampler",
    "SchedulerConfig",
    "UniPCSampler",
    "default_scheduler_name",
    "make_sampler",
]
