"""Noise schedules and timestep grids, as pure NumPy functions of a few numbers.

Everything here runs once on the host when a sampler is built, and reproduces the numbers of
``diffusers`` 0.42 (``diffusers/schedulers/scheduling_*.py``) including their float32/float64
mix, so the timesteps fed to the UNet are identical to diffusers' ``scheduler.timesteps``:

* ``torch.linspace`` (float32) and ``torch.cumprod`` (float32 with a float64 accumulator on CPU)
  are emulated bit-exactly;
* the timestep grids, ``np.interp`` of sigmas, Karras sigmas and the sigma -> t inversion are the
  same NumPy expressions diffusers uses.

Notation: ``alphas_cumprod[t]`` is the DDPM \\bar\\alpha_t, and ``sigma_t = sqrt((1 - \\bar\\alpha_t) /
\\bar\\alpha_t)`` is the variance-exploding noise level of Karras et al. 2022 (``x_VE = x_VP / sqrt(\\bar\\alpha_t)``).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "betas_for_alpha_bar",
    "rescale_zero_terminal_snr",
    "get_betas",
    "get_alphas_cumprod",
    "alphas_cumprod_from_betas",
    "sigmas_from_alphas_cumprod",
    "spaced_timesteps",
    "multistep_timesteps",
    "interp_sigmas",
    "get_sigmas_karras",
    "sigma_to_t",
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    torch fills the first half as ``start + step * i`` and the second half as
    ``end - step * (steps - 1 - i)``, in float32 with fused multiply-add (emulated in float64).
    """
    start32, end32 = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start32], np.float32)
    step = np.float32((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps, dtype=np.float64)
    lo = (np.float64(start32) + np.float64(step) * idx).astype(np.float32)
    hi = (np.float64(end32) - np.float64(step) * (steps - 1 - idx)).astype(np.float32)
    return np.where(idx < steps // 2, lo, hi)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule of Nichol & Dhariwal 2021 (eq. 17), discretised as in diffusers."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_diffusion_timesteps
    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Alg. 1."""
    abar_sqrt = np.sqrt(alphas_cumprod_from_betas(betas))
    a0, aT = abar_sqrt[0].copy(), abar_sqrt[-1].copy()
    abar_sqrt = abar_sqrt - aT
    abar_sqrt = abar_sqrt * (a0 / (a0 - aT))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def get_betas(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """float32 betas: ``linear``, ``scaled_linear`` (SD: linear in sqrt(beta)) or ``squaredcos_cap_v2``."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
    elif beta_schedule == "linear":
        betas = _linspace_f32(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not supported; use one of {BETA_SCHEDULES}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """``torch.cumprod(1 - betas)`` in float32 (torch's CPU kernel accumulates in float64)."""
    alphas = np.float32(1.0) - np.asarray(betas, np.float32)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def get_alphas_cumprod(
    beta_schedule: str = "scaled_linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    trained_betas: Sequence[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """float32 \\bar\\alpha_t, t = 0..num_train_timesteps-1."""
    betas = get_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, trained_betas, rescale_betas_zero_snr)
    return alphas_cumprod_from_betas(betas)


def sigmas_from_alphas_cumprod(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 VE noise levels ``sqrt((1 - abar) / abar)``, ascending in t (index = train timestep)."""
    ac = np.asarray(alphas_cumprod, np.float32)
    return (((np.float32(1.0) - ac) / ac) ** np.float32(0.5)).astype(np.float32)


def _check(spacing: str, num_train_timesteps: int, num_inference_steps: int) -> None:
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing={spacing!r} is not supported; use one of {TIMESTEP_SPACINGS}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, {num_train_timesteps}] (num_train_timesteps), got {num_inference_steps}"
        )


def spaced_timesteps(
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int = 0,
    dtype=np.int64,
) -> np.ndarray:
    """Descending inference timesteps (Lin et al. 2023, Table 2) as DDPM/DDIM/PNDM/Euler/LMS/Heun build them.

    ``dtype=np.int64`` (DDPM, DDIM, PNDM-style) rounds the ``linspace`` grid; a float dtype
    (Euler, LMS, Heun) keeps it fractional. ``steps_offset`` only applies to ``leading``.
    """
    _check(spacing, num_train_timesteps, num_inference_steps)
    N, n = num_train_timesteps, num_inference_steps
    is_int = np.issubdtype(np.dtype(dtype), np.integer)
    if spacing == "linspace":
        if is_int:
            ts = np.linspace(0, N - 1, n).round()[::-1].astype(np.int64)
        else:
            ts = np.linspace(0, N - 1, n, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (N // n)).round()[::-1].astype(dtype) + steps_offset
    else:  # trailing
        ts = np.round(np.arange(N, 0, -N / n)).astype(dtype) - 1
    return np.ascontiguousarray(ts).astype(dtype)


def multistep_timesteps(
    spacing: str,
    num_train_timesteps: int,
    num_inference_steps: int,
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """int64 timesteps of DPMSolverMultistep/UniPC: ``n + 1`` points with t = 0 dropped.

    ``last_timestep`` (default ``num_train_timesteps``) implements DPM-Solver's ``lambda_min_clipped``.
    """
    _check(spacing, num_train_timesteps, num_inference_steps)
    N, n = num_train_timesteps, num_inference_steps
    last = N if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
    else:  # trailing
        ts = np.arange(last, 0, -N / n).round().astype(np.int64) - 1
    return np.ascontiguousarray(ts)


def interp_sigmas(timesteps: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Noise level at (possibly fractional) timesteps by linear interpolation (float64, as diffusers)."""
    return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)


def get_sigmas_karras(num_inference_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.

    Returns the ``n`` descending float64 sigmas (no trailing zero, unlike k-diffusion).
    """
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep whose (log-linearly interpolated) sigma equals each of ``sigmas``.

    Evaluated one sigma at a time like diffusers (NumPy's SIMD ``log`` on arrays can differ by an ulp).
    """
    sigmas = np.asarray(sigmas)
    out = np.empty(sigmas.shape, np.float64)
    for idx, sigma in np.ndenumerate(sigmas):
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        out[idx] = ((1 - w) * low_idx + w * high_idx).item()
    return out
