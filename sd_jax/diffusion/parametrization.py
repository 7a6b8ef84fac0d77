"""What a denoising network predicts, in one table: epsilon, v or x0 (``prediction_type``).

A noisy sample is ``x = alpha x0 + sigma eps``. The samplers use two scalings of it:

* variance preserving (DDPM, DDIM, PNDM, DPM-Solver, UniPC): ``alpha = sqrt(abar_t)``,
  ``sigma = sqrt(1 - abar_t)``, so ``alpha^2 + sigma^2 = 1``;
* variance exploding (Euler, Heun, LMS; Karras et al. 2022): ``alpha = 1``, ``sigma = sigma_t``.

The network itself always sees the variance-normalised sample ``x / c``, ``c = sqrt(alpha^2 + sigma^2)``,
and predicts

* ``"epsilon"``: the noise ``eps`` (Ho et al. 2020);
* ``"v_prediction"``: ``v = (alpha eps - sigma x0) / c`` (Salimans & Ho 2022, sec. 4 and appendix D,
  written for the normalised sample);
* ``"sample"``: ``x0`` itself.

:func:`x0_eps` turns an output into ``(x0, eps)`` (what samplers need, k-diffusion's denoiser
``D(x; sigma)`` being the ``x0``), :func:`target` is the output a perfect network gives (what the
training loss regresses on). The expressions are arranged so that each sampler's float32 arithmetic
is the one its diffusers scheduler does (e.g. ``x - sigma * eps`` for Euler, ``alpha x - sigma v`` for
DDIM when ``c == 1``). Both take NumPy or JAX arrays and broadcast scalars or per-example arrays.
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["PREDICTION_TYPES", "check", "x0_eps", "target"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES, what: str = "prediction_type") -> str:
    """``prediction_type`` if it is one of ``allowed``, else a ``ValueError`` naming the choices."""
    if prediction_type not in allowed:
        raise ValueError(f"{what}={prediction_type!r} is not supported; use one of {', '.join(allowed)}")
    return prediction_type


def _c(alpha, sigma):
    """``(c^2, c)`` with ``c = sqrt(alpha^2 + sigma^2)`` (a correctly rounded sqrt; ``x ** 0.5`` is not, op by op)."""
    c2 = alpha * alpha + sigma * sigma
    return c2, jnp.sqrt(c2)


def x0_eps(model_output, x, alpha, sigma, prediction_type: str):
    """``(x0, eps)`` implied by ``model_output`` at ``x = alpha x0 + sigma eps``.

    ``alpha``/``sigma``: scalars or arrays broadcasting against ``x`` (VP: ``alpha^2 + sigma^2 = 1``;
    VE: ``alpha = 1``). ``"sample"`` divides by ``sigma`` for ``eps`` (infinite at ``sigma = 0``).
    """
    m = model_output
    if prediction_type == "epsilon":
        return (x - sigma * m) / alpha, m
    if prediction_type == "v_prediction":
        c2, c = _c(alpha, sigma)
        return alpha * x / c2 - sigma / c * m, sigma * x / c2 + alpha / c * m
    if prediction_type == "sample":
        return m, (x - alpha * m) / sigma
    check(prediction_type)


def target(x0, eps, alpha, sigma, prediction_type: str):
    """The output of a perfect network for ``x = alpha x0 + sigma eps`` (the training target).

    ``"epsilon"`` returns ``eps`` itself (same object).
    """
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        _, c = _c(alpha, sigma)
        return (alpha * eps - sigma * x0) / c
    if prediction_type == "sample":
        return x0
    check(prediction_type)
