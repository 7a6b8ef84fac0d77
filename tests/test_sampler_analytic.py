"""Samplers against an analytic denoiser: Gaussian data, where the best denoiser and the ODE have closed forms.

Data ``x0 ~ N(0, s^2)`` (independent scalars). At a noise level ``x = alpha x0 + sigma eps`` (VP form,
``alpha^2 + sigma^2 = 1``) the marginal is ``N(0, alpha^2 s^2 + sigma^2)`` and the optimal denoiser is

    E[x0 | x] = alpha s^2 / (alpha^2 s^2 + sigma^2) x,   E[eps | x] = (x - alpha E[x0 | x]) / sigma,

given to the samplers as an epsilon, v (``alpha eps - sigma x0``) or x0 prediction, written out here
independently of ``sd_jax.diffusion.parametrization``. The probability-flow ODE (Song et al. 2021)
keeps every sample at the same quantile of the marginal, so it maps a sample ``x_T`` at ``(alpha_T,
sigma_T)`` to ``x_0 = x_T s / sqrt(alpha_T^2 s^2 + sigma_T^2)`` exactly (in the VE form ``x = x0 + sigma
eps`` of Euler/Heun/LMS the same with ``alpha_T = 1``). Everything goes through the samplers' public API:
the noise level of model evaluation ``i`` is read off ``add_noise`` (``a x0 + b noise``), the network
sees ``scale_model_input`` (the sample over ``sqrt(a^2 + b^2)``).

The stated tolerances come from the samplers' orders: Euler's first-order error at 50 steps is about
5% for this data, higher-order samplers are held to much less than Euler's error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.diffusion import SCHEDULERS, SchedulerConfig, make_sampler

S = 0.5  # data standard deviation
# Every sampler starts at t = 999 and ends at sigma = 0 (DDIM/PNDM: final alpha 1).
CONFIG = SchedulerConfig(timestep_spacing="linspace", set_alpha_to_one=True)
KARRAS = sorted(f"{k}_karras" for k, c in SCHEDULERS.items() if c.supports_karras)
NAMES = sorted(SCHEDULERS) + KARRAS
DETERMINISTIC = [n for n in NAMES if not make_sampler(n, CONFIG, 2).needs_noise]
# LCM is a consistency sampler for distilled models (at most original_inference_steps = 50 steps, and its
# boundary-condition scalings assume a consistency-distilled network): tests/test_lcm.py covers it.
STOCHASTIC = [n for n in NAMES if n not in DETERMINISTIC and n != "lcm"]


def level(sampler, i):
    """``(a, b)``: model evaluation ``i`` sees ``a x0 + b eps`` in the sampler's own variable."""
    a = float(sampler.add_noise(jnp.ones(()), jnp.zeros(()), i))
    b = float(sampler.add_noise(jnp.zeros(()), jnp.ones(()), i))
    return a, b


def optimal_model(sampler, x, i, prediction_type):
    a, b = level(sampler, i)
    c = np.hypot(a, b)
    alpha, sigma = a / c, b / c  # VP form of the network's input x / c
    x_in = sampler.scale_model_input(x, i)
    x0 = alpha * S**2 / (alpha**2 * S**2 + sigma**2) * x_in
    eps = (x_in - alpha * x0) / sigma
    return {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]


def sample(sampler, x, prediction_type="epsilon", seed=0):
    state, key = sampler.init_state(x.shape), jax.random.PRNGKey(seed)
    for i in range(len(sampler.timesteps)):
        key, k = jax.random.split(key)
        noise = jax.random.normal(k, x.shape) if sampler.needs_noise else None
        x, state = sampler.step(state, optimal_model(sampler, x, i, prediction_type), x, i, noise)
    return x


def exact_flow(sampler, x_start):
    """The probability-flow ODE's solution at sigma = 0 from ``x_start`` at evaluation 0's level."""
    a, b = level(sampler, 0)
    return x_start * S / np.sqrt(a**2 * S**2 + b**2)


def data_at_start(sampler, n, seed=1):
    """``n`` samples of the exact marginal at the first step: noised draws of the data."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return sampler.add_noise(S * jax.random.normal(k1, (n,)), jax.random.normal(k2, (n,)), 0)


def flow_error(name, steps, x_start_seed=1):
    s = make_sampler(name, CONFIG, steps)
    x = data_at_start(s, 4096, x_start_seed)
    exact = exact_flow(s, x)
    return float(jnp.sqrt(jnp.mean((sample(s, x) - exact) ** 2) / jnp.mean(exact**2)))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_ode_samplers_follow_the_exact_flow(name):
    """50 steps from the marginal at t = 999: every sample ends within 6% (rms) of where the exact ODE takes it,
    the samples' std is the data's within 6%, and epsilon, v and x0 prediction give the same trajectory."""
    s0 = make_sampler(name, CONFIG, 50)
    x = data_at_start(s0, 4096)
    exact = exact_flow(s0, x)
    outs = {}
    for pt in s0.prediction_types:
        out = sample(make_sampler(name, CONFIG, 50, prediction_type=pt), x, pt)
        rel = float(jnp.sqrt(jnp.mean((out - exact) ** 2) / jnp.mean(exact**2)))
        assert rel < 0.06, f"{name} ({pt}): {rel:.3g} from the exact flow"
        assert abs(float(jnp.std(out)) / S - 1) < 0.06, f"{name} ({pt}): std {float(jnp.std(out)):.4f}, data {S}"
        outs[pt] = np.asarray(out)
    if name == "pndm":
        # PNDM (as diffusers) combines the raw outputs of past steps (v, for v-prediction) and converts the
        # combination to eps with the current sample: a different (still convergent) method for v.
        return
    for pt, out in outs.items():  # the parametrisation is exact: only rounding differs
        np.testing.assert_allclose(out, outs["epsilon"], rtol=0, atol=2e-4, err_msg=f"{name}: {pt} vs epsilon")


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_reach_the_data_std(name):
    """From the marginal at t = 999 with fresh noise each step: the std of 65,536 samples converges to the
    data's, within 4% at 200 steps, and the error at least halves from 50 to 200 steps (or is within
    4 standard errors of the sample std, 4 * s / sqrt(2 n) = 1.1%)."""
    n = 1 << 16
    se4 = 4 / np.sqrt(2 * n)
    errs = {}
    for steps in (50, 200):
        s = make_sampler(name, CONFIG, steps)
        out = sample(s, data_at_start(s, n), seed=steps)
        assert abs(float(jnp.mean(out))) < 4 * S / np.sqrt(n)
        errs[steps] = float(jnp.std(out)) / S - 1
    assert abs(errs[200]) < 0.04, errs
    assert abs(errs[200]) <= max(abs(errs[50]) / 2, se4), errs


def test_higher_order_samplers_are_closer_to_the_exact_flow_than_euler():
    steps = 50
    euler, euler_k = flow_error("euler", steps), flow_error("euler_karras", steps)
    assert 0.02 < euler < 0.06 and 0.02 < euler_k < 0.06  # first order: a few percent
    # Karras sigmas end at the smallest training sigma: every higher-order method is 10x closer than Euler
    for name in ("heun_karras", "lms_karras", "dpmpp_2m_karras", "unipc_karras"):
        err = flow_error(name, steps)
        assert err < euler_k / 10, (name, err, euler_k)
    # The default grid: Heun and LMS as well. DPM-Solver++, UniPC and PNDM make their last step to sigma = 0
    # (from t = 20, a large step in log-SNR) at first order, which dominates their error: still below Euler's.
    for name in ("heun", "lms"):
        err = flow_error(name, steps)
        assert err < euler / 10, (name, err, euler)
    for name in ("dpmpp_2m", "unipc", "pndm"):
        err = flow_error(name, steps)
        assert err < 0.8 * euler, (name, err, euler)


def test_convergence_orders():
    """Halving the step size halves Euler's error (first order) and divides second-order methods' by 3 or more."""
    ratio = {name: flow_error(name, 25) / flow_error(name, 50)
             for name in ("euler", "euler_karras", "heun", "heun_karras", "lms_karras", "dpmpp_2m_karras")}
    assert 1.6 < ratio["euler"] < 2.4 and 1.6 < ratio["euler_karras"] < 2.4, ratio
    for name in ("heun", "heun_karras", "lms_karras", "dpmpp_2m_karras"):
        assert ratio[name] > 3, ratio


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_parametrization_inverts_its_target(prediction_type):
    """``x0_eps`` undoes ``target`` in the VP (alpha^2 + sigma^2 = 1) and VE (alpha = 1) forms, and v is the
    Salimans & Ho velocity of the variance-normalised sample."""
    from sd_jax.diffusion import parametrization as P

    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 64)).astype(np.float32)
    abar = np.float32(0.3)
    for alpha, sigma in [(np.sqrt(abar), np.sqrt(1 - abar)), (np.float32(1), np.sqrt((1 - abar) / abar))]:
        x = alpha * x0 + sigma * eps
        out = P.target(x0, eps, alpha, sigma, prediction_type)
        got_x0, got_eps = P.x0_eps(out, x, alpha, sigma, prediction_type)
        np.testing.assert_allclose(got_x0, x0, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got_eps, eps, rtol=0, atol=1e-5)
    if prediction_type == "v_prediction":  # VE: v of x / c, c = sqrt(1 + sigma^2), is sqrt(abar) eps - sqrt(1 - abar) x0
        np.testing.assert_allclose(out, np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        P.x0_eps(x0, x0, 1.0, 1.0, "flow")
