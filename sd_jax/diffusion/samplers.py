"""Diffusion samplers as pure JAX functions, numerically equal to the diffusers 0.42 schedulers.

A sampler is built once on the host from a :class:`SchedulerConfig` and ``num_inference_steps``.
Everything that depends only on the step index (timesteps, sigmas, solver coefficients, which
order a multistep solver uses...) is precomputed into small NumPy tables, the way diffusers
computes it (float32). The JAX methods are then just table look-ups with a (possibly traced)
step index ``i`` and a few fused multiply-adds in float32, so they run inside ``jax.lax.scan``
under ``jax.jit``; the sampler itself is hashable and can be a static argument::

    s = make_sampler("dpmpp_2m_karras", unet_scheduler_config, 25)
    x = noise * s.init_noise_sigma
    def body(carry, i):
        x, state = carry
        eps = unet(s.scale_model_input(x, i), jnp.asarray(s.timesteps)[i])
        x, state = s.step(state, eps, x, i, None)
        return (x, state), None
    (x, _), _ = jax.lax.scan(body, (x, s.init_state(x.shape)), jnp.arange(len(s.timesteps)))

Multistep solvers count the steps they actually took (``state["count"]``) rather than trusting
``i``, so starting the scan at ``i0 > 0`` (img2img / inpainting after :meth:`Sampler.add_noise`)
warms up with lower orders exactly like diffusers after ``set_begin_index``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from . import parametrization as P
from . import schedules as S

__all__ = [
    "SchedulerConfig",
    "Sampler",
    "DDPMSampler",
    "DDIMSampler",
    "PNDMSampler",
    "LMSSampler",
    "EulerSampler",
    "EulerAncestralSampler",
    "HeunSampler",
    "DPMSolverMultistepSampler",
    "DPMSolverSDESampler",
    "UniPCSampler",
    "LCMSampler",
    "SCHEDULERS",
    "default_scheduler_name",
    "make_sampler",
]

f32 = np.float32
PREDICTION_TYPES = P.PREDICTION_TYPES


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerConfig:
    """Union of the diffusers scheduler config fields the samplers use (names as in ``scheduler_config.json``).

    Each sampler reads only the fields its diffusers class has; e.g. ``eta`` (a ``DDIMScheduler.step``
    argument in diffusers) only affects ``ddim``.

    ``given`` says which fields were set: :meth:`from_dict` records the keys of the checkpoint's
    ``scheduler_config.json``. A sampler fills every other field with the default of its *own* diffusers
    class (``Sampler.diffusers_defaults``), as ``EulerDiscreteScheduler.from_config(pipe.scheduler.config)``
    does: SD 1.5's PNDM config has no ``timestep_spacing``, so ``euler`` uses Euler's ``linspace`` and
    ``pndm`` PNDM's ``leading``. ``given=None`` (a config built by hand) means every field is set, and the
    dataclass defaults are Stable Diffusion 1.x/2.x's.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # ddim, pndm
    clip_sample: bool = False  # ddpm, ddim, heun
    clip_sample_range: float = 1.0
    rescale_betas_zero_snr: bool = False  # ddpm, ddim, euler, euler_a, dpmpp_*, unipc
    use_karras_sigmas: bool = False  # lms, euler, heun, dpmpp_*, unipc
    sigma_min: float | None = None  # Karras endpoints override (euler, unipc)
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"  # euler, dpmpp_*, unipc: "zero" | "sigma_min"
    eta: float = 0.0  # ddim
    variance_type: str | None = None  # ddpm: None/"fixed_small", "fixed_small_log", "fixed_large"
    skip_prk_steps: bool = True  # pndm (only PLMS is implemented)
    solver_order: int = 2  # dpmpp_*, unipc
    algorithm_type: str = "dpmsolver++"  # set by the sampler name (dpmpp_2m / dpmpp_2m_sde)
    solver_type: str | None = None  # dpmpp_*: "midpoint" | "heun"; unipc: "bh1" | "bh2"; None = default
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    disable_corrector: tuple[int, ...] = ()  # unipc
    predict_x0: bool = True  # unipc
    thresholding: bool = False  # not implemented (must be False)
    interpolation_type: str = "linear"  # euler (only "linear")
    timestep_type: str = "discrete"  # euler (only "discrete")
    original_inference_steps: int = 50  # lcm: the distillation schedule its steps are taken from
    timestep_scaling: float = 10.0  # lcm: boundary-condition scalings c_skip, c_out of t * timestep_scaling
    given: frozenset[str] | None = None  # fields the config set; None: all of them


    def __post_init__(self):  # keep the config hashable (it is part of the samplers' static key)
        for k in ("trained_betas", "disable_corrector"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, k, tuple(np.asarray(v).reshape(-1).tolist()))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The scheduler config keys (every field but ``given``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "given")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
        """Build from a ``scheduler_config.json`` dict (or ``scheduler.config``); unknown keys are ignored.

        The keys present are remembered (``given``): a missing key later takes the chosen sampler's default.
        """
        names = set(cls.field_names())
        kw = {}
        for k, v in dict(d).items():
            if k not in names:
                continue
            if k in ("trained_betas", "disable_corrector") and v is not None:
                v = tuple(float(x) if k == "trained_betas" else int(x) for x in np.asarray(v).reshape(-1))
            if k == "lambda_min_clipped" and v is None:
                v = -math.inf
            kw[k] = v
        return cls(**kw, given=frozenset(kw))

    def replace(self, **changes) -> "SchedulerConfig":
        """A copy with ``changes``, which count as set (``given``) unless ``given`` itself is changed."""
        if self.given is not None and "given" not in changes:
            changes["given"] = self.given | set(changes)
        return dataclasses.replace(self, **changes)

    def resolve(self, defaults: dict[str, Any]) -> "SchedulerConfig":
        """Every field set: those not ``given`` take ``defaults`` (a sampler's diffusers class defaults)."""
        if self.given is None:
            return self
        fill = {k: defaults[k] for k in defaults if k not in self.given}
        return dataclasses.replace(self, **fill, given=None)

    def to_dict(self) -> dict[str, Any]:
        """The set fields as a ``scheduler_config.json`` dict (JSON types): missing keys stay missing."""
        out = {}
        for k in self.field_names():
            if self.given is None or k in self.given:
                v = getattr(self, k)
                out[k] = list(v) if isinstance(v, tuple) else v
        return out


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _f(x):
    return jnp.asarray(x, jnp.float32)


def _push(buf, x):
    """Shift a history buffer (most recent first) and insert ``x`` at position 0."""
    return jnp.concatenate([x[None].astype(buf.dtype), buf[:-1]], axis=0)


def _lincomb(coeffs, buf):
    """sum_k coeffs[k] * buf[k] (explicit FMAs: no dot_general, so no reduced-precision matmul)."""
    out = coeffs[0] * _f(buf[0])
    for k in range(1, buf.shape[0]):
        out = out + coeffs[k] * _f(buf[k])
    return out


# The ``__init__`` defaults of each diffusers 0.42 scheduler class, for the SchedulerConfig fields it has
# (tests/test_scheduler_defaults.py checks them against diffusers' signatures).
_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None,
              prediction_type="epsilon", steps_offset=0)
_CLIP = dict(clip_sample=True, clip_sample_range=1.0, thresholding=False)
_MULTISTEP = dict(_BETAS, solver_order=2, thresholding=False, lower_order_final=True, use_karras_sigmas=False,
                  final_sigmas_type="zero", timestep_spacing="linspace", rescale_betas_zero_snr=False)


class Sampler:
    """Base class. Subclasses fill ``timesteps``, ``init_noise_sigma`` and the step tables in ``_setup``.

    Tables (``self._tab``, NumPy, leading axis = step index ``i``) that the shared methods use:
    ``noise_a``/``noise_s`` (``add_noise``: ``a * x0 + s * noise``) and optionally ``in_div``
    (``scale_model_input``: ``x / in_div``).
    """

    name: ClassVar[str] = "base"
    # What a scheduler_config.json key the config lacks means for this sampler: its diffusers class's default.
    diffusers_defaults: ClassVar[dict[str, Any]] = {}
    # Model evaluations per inference step (diffusers' ``scheduler.order``): 2 for Heun, whose
    # ``n`` steps take ``2n - 1`` evaluations; img2img's strength counts steps in these units.
    order: ClassVar[int] = 1
    supports_karras: ClassVar[bool] = False
    supports_zero_snr: ClassVar[bool] = True  # diffusers class has rescale_betas_zero_snr (else it is ignored)
    zero_snr_clamp: ClassVar[bool] = True  # ... and then sets alphas_cumprod[-1] = 2**-24
    prediction_types: ClassVar[tuple[str, ...]] = PREDICTION_TYPES
    needs_noise: bool = False

    def __init__(self, config: SchedulerConfig | dict | None = None, num_inference_steps: int = 50):
        if config is None:
            config = SchedulerConfig()
        elif isinstance(config, dict):
            config = SchedulerConfig.from_dict(config)
        config = self._normalize_config(config.resolve(self.diffusers_defaults))
        n = num_inference_steps
        if isinstance(n, (bool, np.bool_)) or not float(n).is_integer():
            raise ValueError(f"num_inference_steps must be an integer, got {n!r}")
        n = int(n)
        if not 1 <= n <= config.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, {config.num_train_timesteps}] (num_train_timesteps), got {n}"
            )
        if config.prediction_type not in self.prediction_types:
            raise ValueError(
                f"{self.name}: prediction_type={config.prediction_type!r} not supported; use one of {self.prediction_types}"
            )
        if config.use_karras_sigmas and not self.supports_karras:
            raise ValueError(f"{self.name} does not support Karras sigmas (neither does its diffusers class)")
        if config.timestep_spacing not in S.TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={config.timestep_spacing!r} not supported; use one of {S.TIMESTEP_SPACINGS}")
        if config.thresholding:
            raise NotImplementedError("dynamic thresholding (thresholding=True) is not implemented")
        self.config = config
        self.num_inference_steps = n
        ac = S.get_alphas_cumprod(
            config.beta_schedule,
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            config.trained_betas,
            config.rescale_betas_zero_snr and self.supports_zero_snr,
        )
        if config.rescale_betas_zero_snr and self.supports_zero_snr and self.zero_snr_clamp:
            ac[-1] = f32(2**-24)  # as diffusers' sigma-based schedulers: keeps sigma_max finite
        self.alphas_cumprod = ac
        self._tab: dict[str, np.ndarray] = {}
        self.timesteps: np.ndarray
        self.init_noise_sigma: float = 1.0
        self._setup()
        self._frozen = True

    # -- immutability / hashing (the sampler is a static argument of jitted functions) --
    def _normalize_config(self, config: SchedulerConfig) -> SchedulerConfig:
        return config

    def _setup(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __setattr__(self, key, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable")
        object.__setattr__(self, key, value)

    def _key(self):
        return (type(self).__name__, self.name, self.config, self.num_inference_steps)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Sampler) and self._key() == other._key()

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, num_inference_steps={self.num_inference_steps}, config={self.config})"

    # -- helpers --
    def _t(self, key, *idx):
        """Table look-up: a NumPy scalar for concrete Python/NumPy indices (cheap eager loops), else a gather."""
        tab = self._tab[key]
        if all(isinstance(j, (int, np.integer)) for j in idx):
            return tab[idx]
        return jnp.asarray(tab)[idx]

    @property
    def num_steps(self) -> int:
        """Number of scan steps / model evaluations (``len(timesteps)``; ``2n - 1`` for Heun, ``n + 1`` for PNDM)."""
        return len(self.timesteps)

    def _clip(self, x0):
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            return jnp.clip(x0, -r, r)
        return x0

    def _noise(self, noise, like):
        if noise is None:
            raise ValueError(f"{self.name} is stochastic (needs_noise=True): pass a standard-normal `noise` to step()")
        return _f(noise).reshape(like.shape)

    # -- public API --
    def init_state(self, sample_shape, dtype=jnp.float32) -> dict:
        """History buffers (fixed shapes) carried between steps; ``{}`` for one-step samplers."""
        return {}

    def scale_model_input(self, sample, i):
        """The UNet input at step ``i`` (``x / sqrt(sigma^2 + 1)`` for the sigma-parametrised samplers)."""
        if "in_div" not in self._tab:
            return sample
        return (_f(sample) / self._t("in_div", i)).astype(sample.dtype)

    def add_noise(self, original, noise, i):
        """Forward-diffuse ``original`` to the noise level of ``timesteps[i]`` (img2img / inpainting)."""
        out = self._t("noise_a", i) * _f(original) + self._t("noise_s", i) * _f(noise)
        return out.astype(jnp.result_type(original))

    def step(self, state, model_output, sample, i, noise=None):
        """One solver step ``timesteps[i] -> next``: returns ``(prev_sample, new_state)``."""
        raise NotImplementedError

    # -- table builders shared by subclasses --
    def _discrete_noise_tables(self, ts: np.ndarray) -> None:
        ac = self.alphas_cumprod[np.asarray(ts, np.int64)]
        self._tab["noise_a"] = (ac**f32(0.5)).astype(f32)
        self._tab["noise_s"] = ((f32(1.0) - ac) ** f32(0.5)).astype(f32)


# --------------------------------------------------------------------------------------------
# Discrete-time (alphas_cumprod) samplers: DDPM, DDIM, PNDM
# --------------------------------------------------------------------------------------------


class DDPMSampler(Sampler):
    """Ancestral DDPM sampling (Ho et al. 2020, eqs. 6-7: posterior q(x_{t-1} | x_t, x0)), as ``DDPMScheduler``.

    ``x_prev = c0 * x0 + c1 * x_t + std * z`` with the "fixed_small" (posterior, default) or
    "fixed_large" (beta_t) variance; no noise when ``t == 0``.
    """

    name = "ddpm"
    diffusers_defaults = dict(_BETAS, **_CLIP, variance_type="fixed_small", timestep_spacing="leading",
                              rescale_betas_zero_snr=False)
    needs_noise = True
    zero_snr_clamp = False

    def _setup(self):
        cfg, ac = self.config, self.alphas_cumprod
        vt = cfg.variance_type or "fixed_small"
        if vt not in ("fixed_small", "fixed_small_log", "fixed_large"):
            raise NotImplementedError(f"ddpm: variance_type={vt!r} is not implemented")
        ts = S.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, self.num_inference_steps, cfg.steps_offset)
        prev = np.append(ts[1:], -1)
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], f32(1.0)).astype(f32)
        beta_t, beta_prev = f32(1) - a_t, f32(1) - a_prev
        cur_alpha = a_t / a_prev
        cur_beta = f32(1) - cur_alpha
        var = np.maximum(beta_prev / beta_t * cur_beta, f32(1e-20))
        std = (cur_beta if vt == "fixed_large" else var) ** f32(0.5)
        self.timesteps = ts
        self._tab.update(
            alpha=a_t ** f32(0.5),
            sigma=beta_t ** f32(0.5),
            c_x0=(a_prev ** f32(0.5) * cur_beta) / beta_t,
            c_x=cur_alpha ** f32(0.5) * beta_prev / beta_t,
            std=np.where(ts > 0, std, f32(0)).astype(f32),
        )
        self._discrete_noise_tables(ts)

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        x0, _ = P.x0_eps(m, x, self._t("alpha", i), self._t("sigma", i), self.config.prediction_type)
        x0 = self._clip(x0)
        prev = self._t("c_x0", i) * x0 + self._t("c_x", i) * x + self._t("std", i) * self._noise(noise, x)
        return prev.astype(sample.dtype), state


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2020, eq. 12; eq. 16 for sigma_t(eta)), as ``DDIMScheduler`` with ``step(eta=config.eta)``.

    ``x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z``, ``s = eta * sigma_t``.
    Like diffusers, the previous timestep is ``t - num_train_timesteps // n`` for every spacing.
    """

    name = "ddim"
    diffusers_defaults = dict(_BETAS, **_CLIP, set_alpha_to_one=True, timestep_spacing="leading",
                              rescale_betas_zero_snr=False)
    zero_snr_clamp = False

    def _setup(self):
        cfg, ac = self.config, self.alphas_cumprod
        n = self.num_inference_steps
        ts = S.spaced_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset)
        prev = ts - cfg.num_train_timesteps // n
        final = f32(1.0) if cfg.set_alpha_to_one else ac[0]
        a_t = ac[ts]
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(f32)
        beta_t = f32(1) - a_t
        var = (f32(1) - a_prev) / beta_t * (f32(1) - a_t / a_prev)
        std = f32(cfg.eta) * var ** f32(0.5)
        self.needs_noise = cfg.eta > 0
        self.timesteps = ts
        self._tab.update(
            alpha=a_t ** f32(0.5),
            sigma=beta_t ** f32(0.5),
            c_x0=a_prev ** f32(0.5),
            c_eps=(f32(1) - a_prev - std**2) ** f32(0.5),
            std=std.astype(f32),
        )
        self._discrete_noise_tables(ts)

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        x0, eps = P.x0_eps(m, x, self._t("alpha", i), self._t("sigma", i), self.config.prediction_type)
        x0 = self._clip(x0)
        prev = self._t("c_x0", i) * x0 + self._t("c_eps", i) * eps
        if self.needs_noise:
            prev = prev + self._t("std", i) * self._noise(noise, x)
        return prev.astype(sample.dtype), state


class PNDMSampler(Sampler):
    """PLMS, the pseudo linear multistep method of Liu et al. 2022 ("Pseudo Numerical Methods for Diffusion
    Models on Manifolds"), as ``PNDMScheduler(skip_prk_steps=True)`` (what Stable Diffusion ships).

    4th-order Adams-Bashforth on eps, fed to the DDIM-like transfer function phi(x_t, eps, t, t - delta),
    with a 2-evaluation (Heun-like) first step: ``n + 1`` timesteps, the second one repeated.
    """

    name = "pndm"
    # diffusers' default is skip_prk_steps=False (Runge-Kutta warm-up steps), which is not implemented:
    # a config without the key gets PLMS, the form every Stable Diffusion config asks for.
    diffusers_defaults = dict(_BETAS, skip_prk_steps=True, set_alpha_to_one=False, timestep_spacing="leading")
    supports_zero_snr = False
    prediction_types = ("epsilon", "v_prediction")
    # Rows: phase = min(count, 4); columns: weights on eps history [0..3] (most recent first), raw output.
    _W = np.array(
        [
            [1, 0, 0, 0, 0],
            [0.5, 0, 0, 0, 0.5],
            [1.5, -0.5, 0, 0, 0],
            [23 / 12, -16 / 12, 5 / 12, 0, 0],
            [55 / 24, -59 / 24, 37 / 24, -9 / 24, 0],
        ],
        dtype=np.float32,
    )

    def _setup(self):
        cfg, ac = self.config, self.alphas_cumprod
        if not cfg.skip_prk_steps:
            raise NotImplementedError("pndm: only skip_prk_steps=True (PLMS, as used by Stable Diffusion) is implemented")
        N, n = cfg.num_train_timesteps, self.num_inference_steps
        asc = S.spaced_timesteps(cfg.timestep_spacing, N, n, cfg.steps_offset)[::-1]
        ts = np.concatenate([asc[:-1], asc[-2:-1], asc[-1:]])[::-1].astype(np.int64)
        ratio = N // n
        # column 0: ordinary step t -> t - ratio; column 1: the repeated step (count == 1): t + ratio -> t
        t_cur = np.stack([ts, np.minimum(ts + ratio, N - 1)], axis=1)
        t_prev = np.stack([ts - ratio, ts], axis=1)
        final = f32(1.0) if cfg.set_alpha_to_one else ac[0]
        a_t = ac[t_cur]
        a_prev = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], final).astype(f32)
        denom = a_t * (f32(1) - a_prev) ** f32(0.5) + (a_t * (f32(1) - a_t) * a_prev) ** f32(0.5)
        self.timesteps = ts
        self._tab.update(
            alpha=a_t ** f32(0.5),
            sigma=(f32(1) - a_t) ** f32(0.5),
            c_x=(a_prev / a_t) ** f32(0.5),
            c_e=(a_prev - a_t) / denom,
        )
        self._discrete_noise_tables(ts)

    def init_state(self, sample_shape, dtype=jnp.float32):
        return {
            "ets": jnp.zeros((4, *sample_shape), dtype),
            "cur": jnp.zeros(sample_shape, dtype),
            "count": jnp.zeros((), jnp.int32),
        }

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        count = state["count"]
        second = count == 1
        col = second.astype(jnp.int32)
        ets = jnp.where(second, state["ets"], _push(state["ets"], m))
        w = jnp.asarray(self._W)[jnp.minimum(count, 4)]
        e = _lincomb(w[:4], ets) + w[4] * m
        x_in = jnp.where(second, _f(state["cur"]), x)
        _, e = P.x0_eps(e, x_in, self._t("alpha", i, col), self._t("sigma", i, col), self.config.prediction_type)
        prev = self._t("c_x", i, col) * x_in - self._t("c_e", i, col) * e
        cur = jnp.where(count == 0, x.astype(state["cur"].dtype), state["cur"])
        return prev.astype(sample.dtype), {"ets": ets, "cur": cur, "count": count + 1}


# --------------------------------------------------------------------------------------------
# Sigma-parametrised (variance exploding, Karras et al. 2022) samplers: LMS, Euler, Euler a, Heun
# --------------------------------------------------------------------------------------------


class _SigmaSampler(Sampler):
    """Shared by the k-diffusion-style samplers: ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al.
    2022, eq. 4 with sigma(t) = t), model input ``x / sqrt(sigma^2 + 1)``, ``init_noise_sigma`` as diffusers."""

    karras_config_endpoints: ClassVar[bool] = False  # config.sigma_min / sigma_max override the Karras range

    def _sigma_schedule(self, final_sigma: float = 0.0):
        cfg = self.config
        ts = S.spaced_timesteps(
            cfg.timestep_spacing, cfg.num_train_timesteps, self.num_inference_steps, cfg.steps_offset, dtype=np.float32
        )
        train_sigmas = S.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        sigmas = S.interp_sigmas(ts, train_sigmas)
        if cfg.use_karras_sigmas:
            use_cfg = self.karras_config_endpoints
            smin = cfg.sigma_min if use_cfg and cfg.sigma_min is not None else sigmas[-1].item()
            smax = cfg.sigma_max if use_cfg and cfg.sigma_max is not None else sigmas[0].item()
            sigmas = S.get_sigmas_karras(self.num_inference_steps, smin, smax)
            ts = S.sigma_to_t(sigmas, log_sigmas)
        sigmas = np.concatenate([sigmas, [final_sigma]]).astype(f32)
        return ts.astype(f32), sigmas

    def _set_sigma_tables(self, ts, sigmas, step_sigmas=None):
        """``sigmas`` has one entry per model evaluation plus the final one."""
        self.timesteps = ts
        smax = sigmas.max()
        self.init_noise_sigma = float(
            smax if self.config.timestep_spacing in ("linspace", "trailing") else (smax**2 + f32(1)) ** f32(0.5)
        )
        s = sigmas[:-1]
        self.sigmas = sigmas
        self._tab.update(
            sigma=s,
            in_div=(s**2 + f32(1)) ** f32(0.5),
            noise_a=np.ones_like(s),
            noise_s=s,
        )

    def _denoised(self, m, x, i):
        """D(x; sigma_i): the x0 prediction from the (unscaled-input) model output (``x = x0 + sigma eps``)."""
        x0, _ = P.x0_eps(m, x, f32(1), self._t("sigma", i), self.config.prediction_type)
        return x0

    def _derivative(self, m, x, i):
        return (x - self._denoised(m, x, i)) / self._t("sigma", i)


class EulerSampler(_SigmaSampler):
    """Euler method on the probability-flow ODE (Karras et al. 2022, eq. 4; Alg. 1 without the 2nd-order
    correction), as ``EulerDiscreteScheduler`` (s_churn=0): ``x_next = x + (sigma_next - sigma) (x - D(x)) / sigma``."""

    name = "euler"
    diffusers_defaults = dict(_BETAS, interpolation_type="linear", use_karras_sigmas=False, sigma_min=None,
                              sigma_max=None, timestep_spacing="linspace", timestep_type="discrete",
                              rescale_betas_zero_snr=False, final_sigmas_type="zero")
    supports_karras = True
    karras_config_endpoints = True

    def _setup(self):
        cfg = self.config
        if cfg.interpolation_type != "linear" or cfg.timestep_type != "discrete":
            raise NotImplementedError("euler: only interpolation_type='linear', timestep_type='discrete' are implemented")
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {cfg.final_sigmas_type!r}")
        last = S.sigmas_from_alphas_cumprod(self.alphas_cumprod)[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        ts, sigmas = self._sigma_schedule(last)
        self._set_sigma_tables(ts, sigmas)
        self._tab["dt"] = sigmas[1:] - sigmas[:-1]

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        prev = x + self._derivative(m, x, i) * self._t("dt", i)
        return prev.astype(sample.dtype), state


class EulerAncestralSampler(_SigmaSampler):
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``, eta=1), as ``EulerAncestralDiscreteScheduler``:
    an Euler step to ``sigma_down`` then fresh noise of std ``sigma_up`` (``sigma_up^2 + sigma_down^2 =
    sigma_next^2``, the DDPM ancestral variance of Ho et al. 2020). diffusers 0.42 has no Karras option for it."""

    name = "euler_a"
    diffusers_defaults = dict(_BETAS, timestep_spacing="linspace", rescale_betas_zero_snr=False)
    needs_noise = True
    prediction_types = ("epsilon", "v_prediction")

    def _setup(self):
        ts, sigmas = self._sigma_schedule(0.0)
        self._set_sigma_tables(ts, sigmas)
        s_from, s_to = sigmas[:-1], sigmas[1:]
        s_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** f32(0.5)
        s_down = (s_to**2 - s_up**2) ** f32(0.5)
        self._tab.update(dt=s_down - s_from, sigma_up=s_up)

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        prev = x + self._derivative(m, x, i) * self._t("dt", i)
        prev = prev + self._noise(noise, x) * self._t("sigma_up", i)
        return prev.astype(sample.dtype), state


class HeunSampler(_SigmaSampler):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1), as ``HeunDiscreteScheduler``.

    As in diffusers, the sigmas are doubled (``[s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]``) and
    timesteps are ``[t0, t1, t1, ..., t_{n-1}, t_{n-1}]`` (``2n - 1`` evaluations): even steps are
    the Euler predictor, odd steps the trapezoidal corrector; the last step is a plain Euler step.
    """

    name = "heun"
    diffusers_defaults = dict(_BETAS, beta_start=0.00085, beta_end=0.012, use_karras_sigmas=False, clip_sample=False,
                              clip_sample_range=1.0, timestep_spacing="linspace")
    order = 2
    supports_karras = True
    supports_zero_snr = False

    def _setup(self):
        ts, sigmas = self._sigma_schedule(0.0)
        sig2 = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]]).astype(f32)
        ts2 = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(f32)
        self._set_sigma_tables(ts2, sig2)
        j = np.arange(len(ts2))
        dt_first = sig2[1:] - sig2[:-1]  # sigma_next - sigma
        dt_second = np.concatenate([[f32(0)], dt_first[:-1]]).astype(f32)  # the predictor's dt
        self._tab["dt"] = np.where(j % 2 == 0, dt_first, dt_second).astype(f32)

    def init_state(self, sample_shape, dtype=jnp.float32):
        return {"d": jnp.zeros(sample_shape, dtype), "x": jnp.zeros(sample_shape, dtype)}

    def _derivative(self, m, x, i):
        x0 = self._clip(self._denoised(m, x, i))
        return (x - x0) / self._t("sigma", i)

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        d = self._derivative(m, x, i)
        dt = self._t("dt", i)
        first = (jnp.asarray(i) % 2) == 0
        euler = x + d * dt
        trapezoid = _f(state["x"]) + (_f(state["d"]) + d) / 2 * dt
        prev = jnp.where(first, euler, trapezoid)
        new_state = {"d": d.astype(state["d"].dtype), "x": x.astype(state["x"].dtype)}
        return prev.astype(sample.dtype), new_state


def _lms_coefficients(sigmas: np.ndarray, max_order: int = 4) -> np.ndarray:
    """Integrals of the Lagrange basis polynomials over [sigma_i, sigma_{i+1}] (exact; diffusers uses quad)."""
    n = len(sigmas) - 1
    out = np.zeros((n, max_order), np.float64)
    s = sigmas.astype(np.float64)
    for i in range(n):
        order = min(i + 1, max_order)
        for k in range(order):
            p = np.polynomial.Polynomial([1.0])
            for j in range(order):
                if j != k:
                    p = p * np.polynomial.Polynomial([-s[i - j], 1.0]) / (s[i - k] - s[i - j])
            P = p.integ()
            out[i, k] = P(s[i + 1]) - P(s[i])
    return out.astype(f32)


class LMSSampler(_SigmaSampler):
    """Linear multistep (order-4 Adams-Bashforth in sigma on the Karras et al. 2022 ODE; k-diffusion
    ``sample_lms``), as ``LMSDiscreteScheduler``: ``x_next = x + sum_k c_{i,k} d_{i-k}``, with ``c`` the
    integrals of the Lagrange basis over [sigma_i, sigma_{i+1}] (exact here, scipy ``quad`` in diffusers)."""

    name = "lms"
    diffusers_defaults = dict(_BETAS, use_karras_sigmas=False, timestep_spacing="linspace")
    supports_karras = True
    supports_zero_snr = False
    lms_order: ClassVar[int] = 4  # past derivatives combined (diffusers' ``step(order=4)``)

    def _setup(self):
        ts, sigmas = self._sigma_schedule(0.0)
        self._set_sigma_tables(ts, sigmas)
        self._tab["coef"] = _lms_coefficients(sigmas, self.lms_order)

    def init_state(self, sample_shape, dtype=jnp.float32):
        return {"d": jnp.zeros((self.lms_order, *sample_shape), dtype)}

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        hist = _push(state["d"], self._derivative(m, x, i))
        prev = x + _lincomb(self._t("coef", i), hist)
        return prev.astype(sample.dtype), {"d": hist}


# --------------------------------------------------------------------------------------------
# Multistep exponential integrators in data prediction: DPM-Solver++(2M)/(2M SDE), UniPC
# --------------------------------------------------------------------------------------------


class _VPMultistepSampler(Sampler):
    """Shared by DPM-Solver++ and UniPC: VP parametrisation ``alpha_t = 1/sqrt(sigma^2+1)``,
    ``sigma_t = sigma alpha_t``, ``lambda = log(alpha_t / sigma_t)``; identity model-input scaling;
    a history of x0 predictions; per-step coefficient tables indexed by (step, order)."""

    supports_karras = True
    karras_config_endpoints: ClassVar[bool] = False

    def _vp_schedule(self, last_timestep=None, round_karras_timesteps=True):
        cfg = self.config
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {cfg.final_sigmas_type!r}")
        n = self.num_inference_steps
        ts = S.multistep_timesteps(cfg.timestep_spacing, cfg.num_train_timesteps, n, cfg.steps_offset, last_timestep)
        train_sigmas = S.sigmas_from_alphas_cumprod(self.alphas_cumprod)
        last = train_sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        if cfg.use_karras_sigmas:
            use_cfg = self.karras_config_endpoints
            smin = cfg.sigma_min if use_cfg and cfg.sigma_min is not None else train_sigmas[0].item()
            smax = cfg.sigma_max if use_cfg and cfg.sigma_max is not None else train_sigmas[-1].item()
            sigmas = S.get_sigmas_karras(n, smin, smax)
            ts = S.sigma_to_t(sigmas, np.log(train_sigmas))
            if round_karras_timesteps:
                ts = ts.round()
            last = self._karras_last_sigma(sigmas, last)
        else:
            sigmas = S.interp_sigmas(ts, train_sigmas)
        sigmas = np.concatenate([sigmas, [last]]).astype(f32)
        self.timesteps = ts.astype(np.int64)
        self.sigmas = sigmas
        with np.errstate(divide="ignore"):
            alpha = f32(1) / (sigmas**2 + f32(1)) ** f32(0.5)
            sig = sigmas * alpha
            lam = np.log(alpha) - np.log(sig)
        self._tab.update(alpha=alpha[:-1], sigma_t=sig[:-1], noise_a=alpha[:-1], noise_s=sig[:-1])
        return alpha, sig, lam

    def _karras_last_sigma(self, karras_sigmas, default):
        return default

    def _x0(self, m, x, i):
        x0, _ = P.x0_eps(m, x, self._t("alpha", i), self._t("sigma_t", i), self.config.prediction_type)
        return x0


class DPMSolverMultistepSampler(_VPMultistepSampler):
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Alg. 2; 2M = order 2, midpoint form),
    as ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``; ``solver_order`` 1-3 and
    ``solver_type`` "midpoint"/"heun" as diffusers, including ``lower_order_final`` / ``euler_at_final``.

    Each step is ``x_next = A_i x + sum_k B_{i,k} x0_{i-k} (+ C_i z)``: the scalars are computed on the
    host with diffusers' float32 formulas, the order is ``min(cap_i, steps_taken + 1)``.
    """

    name = "dpmpp_2m"
    diffusers_defaults = dict(_MULTISTEP, algorithm_type="dpmsolver++", solver_type="midpoint", euler_at_final=False,
                              lambda_min_clipped=-math.inf, variance_type=None)
    algorithm_type: ClassVar[str] = "dpmsolver++"

    def _normalize_config(self, config):
        st = config.solver_type
        st = "midpoint" if st in (None, "bh1", "bh2", "logrho") else st
        return config.replace(algorithm_type=self.algorithm_type, solver_type=st)

    def _setup(self):
        cfg = self.config
        p = cfg.solver_order
        if p not in (1, 2, 3):
            raise NotImplementedError(f"{self.name}: solver_order must be 1, 2 or 3, got {p}")
        if cfg.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"{self.name}: solver_type must be 'midpoint' or 'heun', got {cfg.solver_type!r}")
        self.needs_noise = self.algorithm_type == "sde-dpmsolver++"
        # lambda_min_clipped: drop the noisiest timesteps whose lambda is below it (as diffusers)
        lam_train = np.log(self.alphas_cumprod ** f32(0.5)) - np.log((f32(1) - self.alphas_cumprod) ** f32(0.5))
        clipped = int(np.searchsorted(lam_train[::-1], cfg.lambda_min_clipped, side="left"))
        alpha, sig, lam = self._vp_schedule(cfg.num_train_timesteps - clipped, cfg.beta_schedule != "squaredcos_cap_v2")
        n = len(self.timesteps)
        sde = self.needs_noise
        A = np.zeros((n, p), f32)
        B = np.zeros((n, p, p), f32)
        C = np.zeros((n, p), f32)
        cap = np.full(n, p)
        for i in range(n):
            lof = i == n - 1 and (
                cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
            )
            los = i == n - 2 and cfg.lower_order_final and n < 15
            cap[i] = 1 if lof else (min(2, p) if los else p)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                for o in range(1, min(cap[i], i + 1) + 1):
                    A[i, o - 1], B[i, o - 1], C[i, o - 1] = self._coeffs(i, o, alpha, sig, lam, p, sde)
        self._tab.update(A=A, B=B, C=C, cap=cap.astype(np.int32))

    def _coeffs(self, i, o, alpha, sig, lam, p, sde):
        a_t, s_t, s_s0 = alpha[i + 1], sig[i + 1], sig[i]
        h = lam[i + 1] - lam[i]
        e = np.eye(p, dtype=f32)  # e[k]: coefficient vector selecting x0_{i-k}
        D0, D1, D2 = e[0], None, None
        if o == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            D1 = f32(1.0) / r0 * (e[0] - e[1])
        elif o == 3:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            D1_0, D1_1 = f32(1.0) / r0 * (e[0] - e[1]), f32(1.0) / r1 * (e[1] - e[2])
            D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
            D2 = f32(1.0) / (r0 + r1) * (D1_0 - D1_1)
        heun = self.config.solver_type == "heun" or o == 3
        if not sde:
            phi = a_t * (np.exp(-h) - f32(1.0))
            B = -phi * D0
            if o >= 2:
                B = B + (a_t * ((np.exp(-h) - f32(1.0)) / h + f32(1.0)) if heun else f32(-0.5) * phi) * D1
            if o == 3:
                B = B - a_t * ((np.exp(-h) - f32(1.0) + h) / h**2 - f32(0.5)) * D2
            return s_t / s_s0, B, f32(0)
        em2h = np.exp(f32(-2.0) * h)
        c0 = a_t * (f32(1) - em2h)
        B = c0 * D0
        if o >= 2:
            B = B + (a_t * ((f32(1.0) - em2h) / (f32(-2.0) * h) + f32(1.0)) if heun else f32(0.5) * c0) * D1
        if o == 3:
            B = B + a_t * ((f32(1.0) - em2h - f32(2.0) * h) / (f32(2.0) * h) ** 2 - f32(0.5)) * D2
        return s_t / s_s0 * np.exp(-h), B, s_t * np.sqrt(f32(1.0) - em2h)

    def init_state(self, sample_shape, dtype=jnp.float32):
        return {"x0": jnp.zeros((self.config.solver_order, *sample_shape), dtype), "count": jnp.zeros((), jnp.int32)}

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        hist = _push(state["x0"], self._x0(m, x, i))
        o = jnp.minimum(self._t("cap", i), state["count"] + 1) - 1
        prev = self._t("A", i, o) * x + _lincomb(self._t("B", i, o), hist)
        if self.needs_noise:
            prev = prev + self._t("C", i, o) * self._noise(noise, x)
        return prev.astype(sample.dtype), {"x0": hist, "count": state["count"] + 1}


class DPMSolverSDESampler(DPMSolverMultistepSampler):
    """SDE-DPM-Solver++(2M): the stochastic (SDE) variant of DPM-Solver++ (Lu et al. 2022), i.e. k-diffusion's
    ``sample_dpmpp_2m_sde`` (eta=1), as ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``:
    ``x_t = (s_t/s_s) e^-h x + a_t (1 - e^-2h) D + s_t sqrt(1 - e^-2h) z``."""

    name = "dpmpp_2m_sde"
    algorithm_type = "sde-dpmsolver++"
    needs_noise = True


class UniPCSampler(_VPMultistepSampler):
    """UniPC (Zhao et al. 2023, Algs. 2-3): UniP-p predictor + UniC-p corrector, B(h) = bh2 (default) or bh1,
    data prediction, as ``UniPCMultistepScheduler``.

    At step ``i`` the corrector first refines the incoming sample with the new x0 prediction
    (skipped on the first step taken and for ``disable_corrector``), then the predictor steps on.
    Both are linear in (sample, x0 history): coefficients are tabulated on the host per (step, order).
    """

    name = "unipc"
    diffusers_defaults = dict(_MULTISTEP, predict_x0=True, solver_type="bh2", disable_corrector=(), sigma_min=None,
                              sigma_max=None)
    karras_config_endpoints = True

    def _normalize_config(self, config):
        st = config.solver_type
        return config.replace(solver_type="bh2" if st in (None, "midpoint", "heun", "logrho") else st)

    def _karras_last_sigma(self, karras_sigmas, default):
        return karras_sigmas[-1] if self.config.final_sigmas_type == "sigma_min" else 0.0

    def _setup(self):
        cfg = self.config
        p = cfg.solver_order
        if p < 1:
            raise ValueError(f"unipc: solver_order must be >= 1, got {p}")
        if cfg.solver_type not in ("bh1", "bh2"):
            raise ValueError(f"unipc: solver_type must be 'bh1' or 'bh2', got {cfg.solver_type!r}")
        if not cfg.predict_x0:
            raise NotImplementedError("unipc: only predict_x0=True is implemented")
        alpha, sig, lam = self._vp_schedule()
        n = len(self.timesteps)
        PA, PB = np.zeros((n, p), f32), np.zeros((n, p, p), f32)
        CA, CB, CN = np.zeros((n, p), f32), np.zeros((n, p, p), f32), np.zeros((n, p), f32)
        cap = np.array([min(p, n - i) if cfg.lower_order_final else p for i in range(n)], np.int32)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for i in range(n):
                for o in range(1, min(cap[i], i + 1) + 1):  # predictor x_i -> x_{i+1}, history x0_{i..i-o+1}
                    a, b, _ = self._update(i + 1, i, [i - k for k in range(1, o)], o, alpha, sig, lam, p, False)
                    PA[i, o - 1], PB[i, o - 1] = a, b
                for o in range(1, min(i, p) + 1 if i > 0 else 0):  # corrector for x_i, history x0_{i-1..}
                    a, b, c = self._update(i, i - 1, [i - 1 - k for k in range(1, o)], o, alpha, sig, lam, p, True)
                    CA[i, o - 1], CB[i, o - 1], CN[i, o - 1] = a, b, c
        use_c = np.array([i > 0 and (i - 1) not in cfg.disable_corrector for i in range(n)])
        self._tab.update(PA=PA, PB=PB, CA=CA, CB=CB, CN=CN, cap=cap, use_c=use_c)

    def _update(self, t, s0, s_prev, order, alpha, sig, lam, p, corrector):
        """Coefficients of UniP (``corrector=False``) / UniC on (x_s0, x0 history[, x0 at t])."""
        a_t, s_t, s_s0 = alpha[t], sig[t], sig[s0]
        h = lam[t] - lam[s0]
        rks = [(lam[si] - lam[s0]) / h for si in s_prev] + [f32(1.0)]
        hh = -h
        h_phi_1 = np.expm1(hh)
        h_phi_k = h_phi_1 / hh - f32(1)
        B_h = hh if self.config.solver_type == "bh1" else np.expm1(hh)
        fact = 1
        R, b = [], []
        for j in range(1, order + 1):
            R.append(np.asarray(rks, f32) ** (j - 1))
            b.append(h_phi_k * fact / B_h)
            fact *= j + 1
            h_phi_k = h_phi_k / hh - f32(1.0 / fact)
        R, b = np.stack(R).astype(np.float64), np.asarray(b, np.float64)
        coef = np.zeros(p, f32)
        coef[0] = -a_t * h_phi_1
        if not corrector:
            if order == 1:
                return s_t / s_s0, coef, f32(0)
            rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        else:
            rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
        rhos = rhos.astype(f32)
        for k in range(1, order):  # D1_k = (x0_k - x0_0) / r_k
            w = -a_t * B_h * rhos[k - 1] / rks[k - 1]
            coef[k] += w
            coef[0] -= w
        c_new = f32(0)
        if corrector:  # + rho_last * (x0_t - x0_0)
            c_new = -a_t * B_h * rhos[-1]
            coef[0] -= c_new
        return s_t / s_s0, coef, c_new

    def init_state(self, sample_shape, dtype=jnp.float32):
        p = self.config.solver_order
        return {
            "x0": jnp.zeros((p, *sample_shape), dtype),
            "last": jnp.zeros(sample_shape, dtype),
            "order": jnp.ones((), jnp.int32),
            "count": jnp.zeros((), jnp.int32),
        }

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        x0 = self._x0(m, x, i)
        count = state["count"]
        # UniC: correct the incoming sample using the new model evaluation (order of the previous predictor)
        oc = state["order"] - 1
        corrected = (
            self._t("CA", i, oc) * _f(state["last"])
            + _lincomb(self._t("CB", i, oc), state["x0"])
            + self._t("CN", i, oc) * x0
        )
        x = jnp.where(jnp.logical_and(count > 0, self._t("use_c", i)), corrected, x)
        hist = _push(state["x0"], x0)
        # UniP: predictor x_i -> x_{i+1}
        order = jnp.minimum(self._t("cap", i), jnp.minimum(count, self.config.solver_order) + 1)
        prev = self._t("PA", i, order - 1) * x + _lincomb(self._t("PB", i, order - 1), hist)
        new_state = {"x0": hist, "last": x.astype(state["last"].dtype), "order": order, "count": count + 1}
        return prev.astype(sample.dtype), new_state


# --------------------------------------------------------------------------------------------
# Consistency models: LCM
# --------------------------------------------------------------------------------------------


class LCMSampler(Sampler):
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", Alg. 3;
    boundary condition of Song et al. 2023, "Consistency Models", eq. 7), as ``LCMScheduler``.

    Timesteps: ``n`` of the ``original_inference_steps`` distillation steps ``k - 1, 2k - 1, ...``
    (``k = num_train_timesteps // original_inference_steps``), evenly spaced in index from the
    noisiest.  Each step predicts ``x0`` (clipped as configured), applies the consistency
    function ``f = c_out(t) x0 + c_skip(t) x`` (``s = t * timestep_scaling``, ``sigma_data = 0.5``:
    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s / sqrt(s^2 + sd^2)``), then re-noises ``f`` to the
    next timestep with fresh noise; the last step returns ``f`` itself (diffusers' ``denoised``).
    ``timestep_spacing`` is not used (as in diffusers).
    """

    name = "lcm"
    diffusers_defaults = dict(_BETAS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
                              set_alpha_to_one=True, thresholding=False, timestep_spacing="leading",
                              timestep_scaling=10.0, rescale_betas_zero_snr=False)
    needs_noise = True
    zero_snr_clamp = False

    def _setup(self):
        cfg, ac, n = self.config, self.alphas_cumprod, self.num_inference_steps
        orig = int(cfg.original_inference_steps)
        if not 1 <= orig <= cfg.num_train_timesteps:
            raise ValueError(f"lcm: original_inference_steps must be in [1, {cfg.num_train_timesteps}], got {orig}")
        if n > orig:
            raise ValueError(f"lcm: num_inference_steps ({n}) cannot be larger than original_inference_steps "
                             f"({orig}): the schedule is a subset of the distillation steps")
        k = cfg.num_train_timesteps // orig
        origin = (np.arange(1, orig + 1) * k - 1)[::-1]
        ts = origin[np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)].astype(np.int64)
        a_t = ac[ts]
        a_next = np.append(ac[ts[1:]], f32(1.0)).astype(f32)  # last step: no re-noising (denoised itself)
        s = ts.astype(f32) * f32(cfg.timestep_scaling)  # float32 as torch's long tensor * float
        sd2 = f32(0.25)  # sigma_data = 0.5
        self.timesteps = ts
        self._tab.update(
            alpha=a_t ** f32(0.5),
            sigma=(f32(1) - a_t) ** f32(0.5),
            c_skip=(sd2 / (s**2 + sd2)).astype(f32),
            c_out=(s / (s**2 + sd2) ** f32(0.5)).astype(f32),
            c_f=(a_next ** f32(0.5)).astype(f32),
            c_z=((f32(1) - a_next) ** f32(0.5)).astype(f32),
        )
        self._discrete_noise_tables(ts)

    def step(self, state, model_output, sample, i, noise=None):
        m, x = _f(model_output), _f(sample)
        x0, _ = P.x0_eps(m, x, self._t("alpha", i), self._t("sigma", i), self.config.prediction_type)
        denoised = self._t("c_out", i) * self._clip(x0) + self._t("c_skip", i) * x
        prev = self._t("c_f", i) * denoised + self._t("c_z", i) * self._noise(noise, x)
        return prev.astype(sample.dtype), state


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SCHEDULERS: dict[str, type[Sampler]] = {
    cls.name: cls
    for cls in (
        DDPMSampler,
        DDIMSampler,
        PNDMSampler,
        LMSSampler,
        EulerSampler,
        EulerAncestralSampler,
        HeunSampler,
        DPMSolverMultistepSampler,
        DPMSolverSDESampler,
        UniPCSampler,
        LCMSampler,
    )
}

_DIFFUSERS_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "pndm",
    "LMSDiscreteScheduler": "lms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}


def _valid_names() -> str:
    karras = [k for k, c in SCHEDULERS.items() if c.supports_karras]
    return f"{', '.join(sorted(SCHEDULERS))} (add '_karras' to: {', '.join(karras)})"


def default_scheduler_name(class_name: str, config: dict | SchedulerConfig | None = None) -> str:
    """Sampler name for a diffusers scheduler class name (``scheduler_config.json["_class_name"]``).

    ``DPMSolverMultistepScheduler`` maps to ``dpmpp_2m_sde`` when ``config["algorithm_type"]`` is an SDE variant.
    """
    if class_name not in _DIFFUSERS_CLASSES:
        raise ValueError(f"Unsupported scheduler class {class_name!r}; supported: {', '.join(_DIFFUSERS_CLASSES)}")
    name = _DIFFUSERS_CLASSES[class_name]
    if name == "dpmpp_2m" and config is not None:
        algo = config.algorithm_type if isinstance(config, SchedulerConfig) else dict(config).get("algorithm_type")
        if algo in ("sde-dpmsolver++", "sde-dpmsolver"):
            name = "dpmpp_2m_sde"
    return name


def make_sampler(
    name: str, config: SchedulerConfig | dict | None = None, num_inference_steps: int = 50, **overrides
) -> Sampler:
    """Build a sampler by short name (``SCHEDULERS`` keys, optional ``_karras`` suffix).

    ``config`` is a :class:`SchedulerConfig` or a ``scheduler_config.json`` dict; ``overrides`` replace
    config fields (e.g. ``eta=0.5``, ``prediction_type="v_prediction"``, ``timestep_spacing="trailing"``).
    """
    key = str(name).strip().lower().replace("-", "_")
    karras = key.endswith("_karras")
    base = key[: -len("_karras")] if karras else key
    if base not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; valid names: {_valid_names()}")
    cls = SCHEDULERS[base]
    if config is None:
        config = SchedulerConfig()
    elif not isinstance(config, SchedulerConfig):
        config = SchedulerConfig.from_dict(config)
    fields = set(SchedulerConfig.field_names())
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"Unknown scheduler config override(s) {bad}; valid fields: {', '.join(sorted(fields))}")
    if karras:
        if not cls.supports_karras:
            raise ValueError(f"Unknown scheduler {name!r}: {base} has no Karras variant; valid names: {_valid_names()}")
        overrides["use_karras_sigmas"] = True
    if overrides:
        config = config.replace(**overrides)
    return cls(config, num_inference_steps)


def diffusers_class_name(name: str) -> str:
    """The diffusers scheduler class for a sampler name (``"dpmpp_2m_karras"`` -> ``"DPMSolverMultistepScheduler"``)."""
    base = str(name).strip().lower().replace("-", "_").removesuffix("_karras")
    if base == "dpmpp_2m_sde":
        base = "dpmpp_2m"
    for cls, short in _DIFFUSERS_CLASSES.items():
        if short == base:
            return cls
    raise ValueError(f"Unknown scheduler {name!r}; valid names: {_valid_names()}")
