"""Parity of sd_jax.diffusion samplers with the diffusers (PyTorch) schedulers.

Every sampler is run next to its diffusers class on a 10-step trajectory driven by the same
deterministic fake "model" ``0.5 x cos(t/300) + 0.1 sin(t/100)`` and, for the stochastic ones, the
same noise (diffusers' ``randn_tensor`` is monkeypatched to return the pre-drawn noise of the step).

Tolerance: at every step ``max|x_jax - x_torch| <= 1e-5 * max(1, max|x_torch| over the trajectory so far,
initial latent included)``, i.e. 1e-5 relative to the magnitude of the computation (rounding made at
sigma_max carries over to later, smaller states). Both sides do float32 math; the observed residual is
1e-7..1.5e-6 (rounding from coefficients folded on the host in a different order).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.diffusion import (  # noqa: E402
    SCHEDULERS,
    SchedulerConfig,
    default_scheduler_name,
    make_sampler,
    schedules,
)

RTOL = 1e-5
SHAPE = (2, 4, 8, 8)
STEPS = 10
TORCH_CLASS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "lcm": "LCMScheduler",
}
KARRAS = sorted(k for k, c in SCHEDULERS.items() if c.supports_karras)


def fake_model(x: np.ndarray, t) -> np.ndarray:
    t = float(t)
    return (0.5 * x.astype(np.float64) * np.cos(t / 300) + 0.1 * np.sin(t / 100)).astype(np.float32)


def fake_model_jnp(x, t):
    t = jnp.asarray(t, jnp.float32)
    return 0.5 * x * jnp.cos(t / 300) + 0.1 * jnp.sin(t / 100)


def torch_scheduler(sampler):
    """The diffusers scheduler for ``sampler`` (same config), with ``set_timesteps`` done."""
    cls = getattr(diffusers, TORCH_CLASS[sampler.name])
    accepted = set(inspect.signature(cls.__init__).parameters)
    d = {k: v for k, v in dataclasses.asdict(sampler.config).items() if v is not None and k in accepted}
    if sampler.name == "pndm":
        d["skip_prk_steps"] = True
    if "disable_corrector" in d:
        d["disable_corrector"] = list(d["disable_corrector"])
    sched = cls.from_config(d)
    sched.set_timesteps(sampler.num_inference_steps)
    return sched


def check_close(a, b, what, b_in=None):
    """``max|a - b| <= RTOL * max(1, max|b|, max|b_in|)`` (``b_in``: earlier reference states of the trajectory)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(b)), f"{what}: torch reference is not finite"
    err = np.max(np.abs(a - b))
    scale = max(1.0, np.max(np.abs(b)), 0.0 if b_in is None else max(np.max(np.abs(v)) for v in b_in))
    assert err <= RTOL * scale, f"{what}: max abs err {err:.3g} > {RTOL} * {scale:.3g}"


def run_torch(sampler, monkeypatch, x_init, noise, start=0):
    sched = torch_scheduler(sampler)
    cur = {"i": 0}

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise[cur["i"]]).to(dtype or torch.float32)

    module = sys.modules[type(sched).__module__]
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    ts = sched.timesteps.numpy()
    if hasattr(sched, "set_begin_index") and (start or np.sum(ts == ts[start]) > 1):
        # img2img start, or a duplicated first timestep (Karras + cosine betas) that diffusers' own
        # timestep -> index lookup would resolve to the wrong (second) occurrence
        sched.set_begin_index(start)
    x = torch.from_numpy(x_init)
    kw = {"eta": sampler.config.eta} if sampler.name == "ddim" else {}
    out = []
    for i in range(start, len(sched.timesteps)):
        t = sched.timesteps[i]
        cur["i"] = i
        inp = sched.scale_model_input(x, t)
        eps = torch.from_numpy(fake_model(inp.numpy(), t))
        x = sched.step(eps, t, x, **kw).prev_sample
        out.append(x.numpy().copy())
    return sched, out


def run_jax(sampler, x_init, noise, start=0):
    x = jnp.asarray(x_init)
    state = sampler.init_state(x.shape)
    out = []
    for i in range(start, len(sampler.timesteps)):
        inp = sampler.scale_model_input(x, i)
        eps = jnp.asarray(fake_model(np.asarray(inp), sampler.timesteps[i]))
        x, state = sampler.step(state, eps, x, i, jnp.asarray(noise[i]) if sampler.needs_noise else None)
        out.append(np.asarray(x))
    return out


def inputs(sampler, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal((len(sampler.timesteps), *SHAPE)).astype(np.float32)
    return x, noise


def assert_parity(sampler, monkeypatch, start=0):
    x, noise = inputs(sampler)
    x_init = (x * np.float32(sampler.init_noise_sigma)).astype(np.float32)
    sched, ref = run_torch(sampler, monkeypatch, x_init, noise, start)
    ref_ts = sched.timesteps.numpy()
    assert sampler.timesteps.dtype == ref_ts.dtype
    if np.issubdtype(ref_ts.dtype, np.integer) or not sampler.config.use_karras_sigmas:
        np.testing.assert_array_equal(sampler.timesteps, ref_ts)
    else:  # Karras timesteps invert float32 train sigmas that torch's pow(x, 0.5) may round 1 ulp differently
        np.testing.assert_allclose(sampler.timesteps, ref_ts, rtol=1e-6, atol=0)
    np.testing.assert_allclose(sampler.init_noise_sigma, float(sched.init_noise_sigma), rtol=1e-6)
    got = run_jax(sampler, x_init, noise, start)
    assert len(got) == len(ref)
    for k, (a, b) in enumerate(zip(got, ref)):
        check_close(a, b, f"{sampler.name} step {start + k}", [x_init, *ref[:k]])


# ---------------------------------------------------------------------------------------------
# Trajectory parity: every scheduler x prediction type x spacing (x Karras where supported)
# ---------------------------------------------------------------------------------------------

CASES = [
    pytest.param(name, pred, spacing, karras, id=f"{name}{'_karras' if karras else ''}-{pred}-{spacing}")
    for name in SCHEDULERS
    for pred in ("epsilon", "v_prediction")
    for spacing in ("leading", "trailing", "linspace")
    for karras in ((False, True) if name in KARRAS else (False,))
]


@pytest.mark.parametrize("name,pred,spacing,karras", CASES)
def test_trajectory_parity(name, pred, spacing, karras, monkeypatch):
    sampler = make_sampler(
        name + ("_karras" if karras else ""), SchedulerConfig(), STEPS, prediction_type=pred, timestep_spacing=spacing
    )
    assert_parity(sampler, monkeypatch)


EXTRA = {
    "ddim-eta0.5": ("ddim", dict(eta=0.5)),
    "ddim-eta1-alpha_one-clip": ("ddim", dict(eta=1.0, set_alpha_to_one=True, clip_sample=True, steps_offset=0)),
    "ddim-sample-pred": ("ddim", dict(prediction_type="sample")),
    "ddim-zero_snr-v": ("ddim", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    "ddpm-fixed_large-linear": ("ddpm", dict(variance_type="fixed_large", beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
    "ddpm-cosine-clip": ("ddpm", dict(beta_schedule="squaredcos_cap_v2", clip_sample=True, timestep_spacing="linspace")),
    "pndm-cosine": ("pndm", dict(beta_schedule="squaredcos_cap_v2")),
    "lms-7steps-sample": ("lms", dict(timestep_spacing="linspace", prediction_type="sample", _steps=7)),
    "euler-7steps-linspace": ("euler", dict(timestep_spacing="linspace", _steps=7)),
    "euler-sigma_min-final": ("euler", dict(final_sigmas_type="sigma_min")),
    "euler-karras-endpoints": ("euler", dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0)),
    "euler-zero_snr-v": ("euler", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    "euler_a-zero_snr-v": ("euler_a", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    "heun-7steps-clip-sample": ("heun", dict(clip_sample=True, prediction_type="sample", _steps=7)),
    "heun-karras-cosine": ("heun", dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")),
    "dpmpp_2m-heun-solver": ("dpmpp_2m", dict(solver_type="heun")),
    "dpmpp_2m-order3": ("dpmpp_2m", dict(solver_order=3)),
    "dpmpp_2m-order3-20steps": ("dpmpp_2m", dict(solver_order=3, use_karras_sigmas=True, _steps=20)),
    "dpmpp_2m-order1": ("dpmpp_2m", dict(solver_order=1)),
    "dpmpp_2m-sigma_min-no_lof": ("dpmpp_2m", dict(final_sigmas_type="sigma_min", lower_order_final=False)),
    "dpmpp_2m-euler_at_final-sigma_min": ("dpmpp_2m", dict(final_sigmas_type="sigma_min", euler_at_final=True)),
    "dpmpp_2m-lambda_clip": ("dpmpp_2m", dict(lambda_min_clipped=-5.1, timestep_spacing="linspace")),
    "dpmpp_2m-karras-cosine": ("dpmpp_2m", dict(use_karras_sigmas=True, beta_schedule="squaredcos_cap_v2")),
    "dpmpp_2m-sample-pred": ("dpmpp_2m", dict(prediction_type="sample")),
    "dpmpp_2m-zero_snr-v": ("dpmpp_2m", dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")),
    "dpmpp_2m_sde-heun-solver": ("dpmpp_2m_sde", dict(solver_type="heun")),
    "dpmpp_2m_sde-order3": ("dpmpp_2m_sde", dict(solver_order=3, _steps=20)),
    # bh1 with a final sigma of 0 gives NaN in diffusers (-inf * 0 in the last UniP step); ours stays finite
    "unipc-bh1": ("unipc", dict(solver_type="bh1", final_sigmas_type="sigma_min")),
    "unipc-order3": ("unipc", dict(solver_order=3)),
    "unipc-order3-20steps-karras": ("unipc", dict(solver_order=3, use_karras_sigmas=True, _steps=20)),
    "unipc-order1": ("unipc", dict(solver_order=1)),
    "unipc-disable_corrector": ("unipc", dict(disable_corrector=(0, 3))),
    "unipc-sigma_min-karras-endpoints": ("unipc", dict(final_sigmas_type="sigma_min", use_karras_sigmas=True, sigma_max=12.0)),
    "unipc-sample-pred": ("unipc", dict(prediction_type="sample")),
    "lcm-4steps": ("lcm", dict(_steps=4)),
    "lcm-1step": ("lcm", dict(_steps=1)),
    "lcm-orig20-7steps-clip-sample": ("lcm", dict(original_inference_steps=20, clip_sample=True,
                                                 prediction_type="sample", _steps=7)),
    "lcm-scaling1-sdxl-betas": ("lcm", dict(timestep_scaling=1.0, beta_end=0.02, _steps=3)),
}


@pytest.mark.parametrize("case", list(EXTRA))
def test_option_parity(case, monkeypatch):
    name, over = EXTRA[case]
    over = dict(over)
    steps = over.pop("_steps", STEPS)
    assert_parity(make_sampler(name, SchedulerConfig(), steps, **over), monkeypatch)


@pytest.mark.parametrize(
    "name,start",
    [("pndm", 3), ("lms", 4), ("euler_a", 5), ("heun", 6), ("dpmpp_2m", 4), ("dpmpp_2m_sde", 3), ("unipc", 4), ("ddpm", 2)],
)
def test_img2img_start_parity(name, start, monkeypatch):
    """Starting mid-schedule (diffusers' set_begin_index): multistep solvers warm up from lower order."""
    assert_parity(make_sampler(name, SchedulerConfig(), STEPS), monkeypatch, start=start)


# ---------------------------------------------------------------------------------------------
# jit + scan with a traced step index
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpmpp_2m_karras", "unipc", "pndm", "heun", "dpmpp_2m_sde"])
def test_scan_jit_matches_eager(name):
    sampler = make_sampler(name, SchedulerConfig(), STEPS)
    x0, noise = inputs(sampler, seed=1)
    x0 = jnp.asarray(x0 * np.float32(sampler.init_noise_sigma))
    noise = jnp.asarray(noise)
    ts = jnp.asarray(sampler.timesteps)

    def one_step(s, carry, i):
        x, state = carry
        eps = fake_model_jnp(s.scale_model_input(x, i), ts[i])
        x, state = s.step(state, eps, x, i, noise[i] if s.needs_noise else None)
        return (x, state), x

    @jax.jit
    def scanned(x):
        steps = jnp.arange(len(sampler.timesteps), dtype=jnp.int32)
        _, xs = jax.lax.scan(lambda c, i: one_step(sampler, c, i), (x, sampler.init_state(x.shape)), steps)
        return xs

    xs = np.asarray(scanned(x0))
    carry = (x0, sampler.init_state(x0.shape))
    for i in range(len(sampler.timesteps)):
        carry, x = one_step(sampler, carry, i)
        check_close(xs[i], x, f"{name} scan vs eager step {i}")

    # the sampler is hashable/static: same config -> same cache entry, usable as a static argument
    again = make_sampler(name, SchedulerConfig(), STEPS)
    assert again == sampler and hash(again) == hash(sampler)
    f = jax.jit(lambda s, x: s.scale_model_input(x, 0), static_argnums=0)
    np.testing.assert_allclose(np.asarray(f(again, x0)), np.asarray(sampler.scale_model_input(x0, 0)))


# ---------------------------------------------------------------------------------------------
# add_noise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ddim", "ddpm", "euler", "lms_karras", "dpmpp_2m", "unipc_karras"])
def test_add_noise(name):
    sampler = make_sampler(name, SchedulerConfig(), STEPS)
    sched = torch_scheduler(sampler)
    rng = np.random.default_rng(2)
    orig = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    for i in (0, 3, STEPS - 1):
        ref = sched.add_noise(torch.from_numpy(orig), torch.from_numpy(noise), sched.timesteps[i : i + 1])
        got = sampler.add_noise(jnp.asarray(orig), jnp.asarray(noise), i)
        check_close(got, ref.numpy(), f"{name} add_noise i={i}")
    # traced index
    got = jax.jit(lambda i: sampler.add_noise(jnp.asarray(orig), jnp.asarray(noise), i))(jnp.int32(3))
    check_close(got, sampler.add_noise(jnp.asarray(orig), jnp.asarray(noise), 3), "traced add_noise")


# ---------------------------------------------------------------------------------------------
# schedules, config, names, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_bit_exact(schedule):
    ref = diffusers.DDIMScheduler(beta_schedule=schedule, beta_start=0.00085, beta_end=0.012).alphas_cumprod.numpy()
    got = schedules.get_alphas_cumprod(schedule, 1000, 0.00085, 0.012)
    np.testing.assert_array_equal(got, ref)


def test_karras_sigmas():
    s = schedules.get_sigmas_karras(5, 0.03, 14.6)
    assert s[0] == pytest.approx(14.6) and s[-1] == pytest.approx(0.03) and np.all(np.diff(s) < 0)


def test_config_from_dict_and_names():
    sd15 = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
        "some_unknown_key": 3,
    }
    cfg = SchedulerConfig.from_dict(sd15)
    # SD's values; the keys present are remembered (a missing one takes the chosen sampler's own default)
    assert cfg.replace(given=None) == SchedulerConfig()
    assert cfg.given == set(sd15) - {"_class_name", "_diffusers_version", "some_unknown_key"}
    assert default_scheduler_name(sd15["_class_name"]) == "pndm"
    assert default_scheduler_name("DPMSolverMultistepScheduler") == "dpmpp_2m"
    assert default_scheduler_name("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}) == "dpmpp_2m_sde"
    assert default_scheduler_name("EulerAncestralDiscreteScheduler") == "euler_a"
    assert default_scheduler_name("LCMScheduler") == "lcm"
    with pytest.raises(ValueError, match="Unsupported scheduler class"):
        default_scheduler_name("TCDScheduler")
    s = make_sampler("DPMPP_2M_KARRAS", sd15, 20)
    assert s.name == "dpmpp_2m" and s.config.use_karras_sigmas and s.config.algorithm_type == "dpmsolver++"
    assert make_sampler("dpmpp_2m_sde", sd15, 20).config.algorithm_type == "sde-dpmsolver++"


def test_errors():
    with pytest.raises(ValueError, match=r"Unknown scheduler 'foo'; valid names: .*ddim.*dpmpp_2m.*euler_a.*unipc"):
        make_sampler("foo", None, 10)
    with pytest.raises(ValueError, match="euler_a"):
        make_sampler("euler_a_karras", None, 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("euler", None, 0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_sampler("ddim", None, 1001)
    with pytest.raises(ValueError, match="override"):
        make_sampler("ddim", None, 10, etaa=0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        make_sampler("pndm", None, 10, prediction_type="sample")
    with pytest.raises(ValueError, match="needs_noise|noise"):
        s = make_sampler("euler_a", None, 10)
        s.step(s.init_state(SHAPE), jnp.zeros(SHAPE), jnp.zeros(SHAPE), 0, None)
    with pytest.raises(AttributeError):
        make_sampler("euler", None, 10).timesteps = None


def test_lcm_steps_beyond_the_distillation_schedule_are_refused():
    """LCM's steps are a subset of its ``original_inference_steps``: more is an error, as in diffusers."""
    from sd_jax.request import canonical_scheduler

    assert canonical_scheduler("LCM") == "lcm"  # --scheduler lcm
    assert len(make_sampler("lcm", SchedulerConfig(), 50).timesteps) == 50
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_sampler("lcm", SchedulerConfig(), 51)
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_sampler("lcm", SchedulerConfig(), 5, original_inference_steps=4)
