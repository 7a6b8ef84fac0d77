"""A key missing from a checkpoint's scheduler_config.json takes the chosen sampler's own diffusers default.

``EulerDiscreteScheduler.from_config(pipe.scheduler.config)`` fills a key the config lacks with
Euler's default, not with what the config's own class would use: with SD 1.5's PNDM config (no
``timestep_spacing``) Euler samples at ``linspace`` timesteps (999, 666, 333, 0 for 4 steps) while
PNDM keeps ``leading`` (751, 501, 251, 1). sd-jax's ``make_sampler(name, config_dict)`` must build the
same schedule as ``<diffusers class>.from_config(config_dict)`` for every sampler name and for the
configs Stable Diffusion 1.5, 2.1 and XL ship (written out verbatim below), the shipped tiny model's
and a bare one; keys present are kept.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sd_jax.diffusion import SCHEDULERS, SchedulerConfig, make_sampler  # noqa: E402
from sd_jax.diffusion.samplers import diffusers_class_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json
SD21 = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
        "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
        "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
        "trained_betas": None, "use_karras_sigmas": False}
with open(os.path.join(ROOT, "checkpoints", "sd-jax-shapes", "scheduler", "scheduler_config.json")) as _f:
    SHIPPED = json.load(_f)
# Nothing but the noise schedule: DDIM takes clip_sample=True, set_alpha_to_one=True, steps_offset=0 from its class.
BARE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "shipped": SHIPPED, "bare": BARE}

NAMES = sorted(SCHEDULERS) + sorted(f"{k}_karras" for k, c in SCHEDULERS.items() if c.supports_karras)
SHAPE = (1, 4, 4, 4)


def diffusers_from_config(name: str, config: dict, steps: int):
    """``<class>.from_config(config)`` for a sampler name, with what the name itself says (Karras, SDE)."""
    extra = {}
    if name.endswith("_karras"):
        extra["use_karras_sigmas"] = True
    if name.startswith("dpmpp_2m_sde"):
        extra["algorithm_type"] = "sde-dpmsolver++"
    if name == "pndm" and "skip_prk_steps" not in config:  # the one deviation: PLMS, as _DEVIATIONS says
        extra["skip_prk_steps"] = True
    sched = getattr(diffusers, diffusers_class_name(name)).from_config(dict(config), **extra)
    sched.set_timesteps(steps)
    return sched


def fake_model(x: np.ndarray, t) -> np.ndarray:
    t = float(t)
    return (0.5 * x.astype(np.float64) * np.cos(t / 300) + 0.1 * np.sin(t / 100)).astype(np.float32)


def test_issue_example_sd15_euler_and_dpmpp_2m_use_their_own_spacing():
    assert make_sampler("euler", SD15, 4).timesteps.tolist() == [999, 666, 333, 0]
    assert make_sampler("dpmpp_2m", SD15, 4).timesteps.tolist() == diffusers_from_config(
        "dpmpp_2m", SD15, 4).timesteps.tolist()
    # the config's own class keeps its (PNDM) default, leading with the config's steps_offset
    assert make_sampler("pndm", SD15, 4).timesteps.tolist() == [751, 501, 501, 251, 1]
    assert make_sampler("ddim", SD15, 4).timesteps.tolist() == [751, 501, 251, 1]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_schedule_and_trajectory_equal_diffusers_from_config(name, config, monkeypatch):
    cfg, steps = CONFIGS[config], 6
    sampler = make_sampler(name, cfg, steps)
    sched = diffusers_from_config(name, cfg, steps)
    ref_ts = sched.timesteps.numpy()
    assert sampler.timesteps.dtype == ref_ts.dtype
    if sampler.config.use_karras_sigmas and ref_ts.dtype.kind == "f":  # 1-ulp pow differences (as test_schedulers)
        np.testing.assert_allclose(sampler.timesteps, ref_ts, rtol=1e-6)
    else:
        np.testing.assert_array_equal(sampler.timesteps, ref_ts)
    if hasattr(sched, "sigmas"):
        np.testing.assert_allclose(sampler.sigmas, sched.sigmas.numpy(), rtol=1e-6)
    np.testing.assert_allclose(sampler.init_noise_sigma, float(sched.init_noise_sigma), rtol=1e-6)
    np.testing.assert_array_equal(sampler.alphas_cumprod[:5], sched.alphas_cumprod.numpy()[:5])
    assert sampler.config.prediction_type == sched.config.prediction_type

    # a trajectory under a fake model (and the same noise): catches every config value that matters
    rng = np.random.default_rng(0)
    x0 = (rng.standard_normal(SHAPE) * sampler.init_noise_sigma).astype(np.float32)
    noise = rng.standard_normal((len(ref_ts), *SHAPE)).astype(np.float32)
    cur = {"i": 0}
    module = sys.modules[type(sched).__module__]
    if hasattr(module, "randn_tensor"):
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: torch.from_numpy(noise[cur["i"]]))
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(0)
    xt, xj, state = torch.from_numpy(x0), jnp.asarray(x0), sampler.init_state(SHAPE)
    for i, t in enumerate(sched.timesteps):
        cur["i"] = i
        xt = sched.step(torch.from_numpy(fake_model(sched.scale_model_input(xt, t).numpy(), t)), t, xt).prev_sample
        out = fake_model(np.asarray(sampler.scale_model_input(xj, i)), sampler.timesteps[i])
        xj, state = sampler.step(state, jnp.asarray(out), xj, i, jnp.asarray(noise[i]) if sampler.needs_noise else None)
        scale = max(1.0, float(np.abs(x0).max()), float(xt.abs().max()))
        assert np.abs(np.asarray(xj) - xt.numpy()).max() <= 1e-5 * scale, f"{name} step {i}"


def test_ddim_fills_its_own_defaults():
    """DDIM's clip_sample, set_alpha_to_one and steps_offset default to True, True and 0 (diffusers' class)."""
    c = make_sampler("ddim", BARE, 10).config
    assert (c.clip_sample, c.set_alpha_to_one, c.steps_offset, c.timestep_spacing) == (True, True, 0, "leading")
    # ...but never override what a config says
    c = make_sampler("ddim", SD15, 10).config
    assert (c.clip_sample, c.set_alpha_to_one, c.steps_offset) == (False, False, 1)
    c = make_sampler("euler", SDXL, 10).config
    assert (c.timestep_spacing, c.steps_offset) == ("leading", 1)
    # overrides count as given
    assert make_sampler("euler", SD15, 4, timestep_spacing="trailing").config.timestep_spacing == "trailing"
    # a config built by hand sets every field (SD 1.x's values), as before
    assert make_sampler("euler", SchedulerConfig(), 4).config.timestep_spacing == "leading"


_DEVIATIONS = {("pndm", "skip_prk_steps")}  # PNDM's Runge-Kutta warm-up is not implemented: PLMS instead


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_defaults_table_is_diffusers_signature(name):
    """Every SchedulerConfig field the diffusers class takes has its default in the sampler's table, equal to
    the class's ``__init__`` default (so the table cannot drift from diffusers unnoticed)."""
    cls = SCHEDULERS[name]
    ref = getattr(diffusers, diffusers_class_name(name))
    assert cls.order == ref.order  # model evaluations per step (img2img's strength counts steps in them)
    params = inspect.signature(ref.__init__).parameters
    fields = set(SchedulerConfig.field_names())
    expected = {k: p.default for k, p in params.items() if k in fields}
    table = cls.diffusers_defaults
    assert set(table) == set(expected), (set(table) ^ set(expected))
    norm = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
    for k, v in expected.items():
        if (name, k) in _DEVIATIONS:
            continue
        got = table[k]
        assert norm(got) == norm(v) or (isinstance(v, float) and math.isinf(v) and got == v), (name, k, got, v)


def test_config_dict_round_trip_keeps_missing_keys_missing():
    cfg = SchedulerConfig.from_dict(SD15)
    d = cfg.to_dict()
    assert "timestep_spacing" not in d and "prediction_type" not in d
    assert d == {k: v for k, v in SD15.items() if not k.startswith("_")}
    assert SchedulerConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # a hand-built config writes every field
    assert SchedulerConfig.from_dict(SchedulerConfig().to_dict()).replace(given=None) == SchedulerConfig()


def test_saved_model_keeps_missing_keys_missing(tmp_path):
    """A diffusers folder with SD 1.5's scheduler config, saved as an sd-jax checkpoint, loaded, saved as a
    diffusers folder again: still no timestep_spacing, so euler keeps Euler's linspace timesteps (in diffusers too)."""
    import shutil

    import jax

    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.sharding import make_mesh

    mesh = make_mesh(jax.devices()[:1])  # one device: saving the params replicated 8 times only costs time here
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "checkpoints", "sd-jax-shapes"), src)
    (src / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15))
    pipe = StableDiffusionPipeline.from_pretrained(str(src), mesh=mesh)
    assert pipe.sampler("euler", 4).timesteps.tolist() == [999, 666, 333, 0]
    pipe.save_pretrained(str(tmp_path / "orbax"), format="orbax")
    assert "timestep_spacing" not in json.loads((tmp_path / "orbax" / "sd_jax.json").read_text())["scheduler_config"]
    back = StableDiffusionPipeline.from_pretrained(str(tmp_path / "orbax"), mesh=mesh)
    assert back.scheduler_config == pipe.scheduler_config
    assert back.sampler("euler", 4).timesteps.tolist() == [999, 666, 333, 0]
    assert back.sampler(None, 4).timesteps.tolist() == [751, 501, 501, 251, 1]  # the checkpoint's own: pndm
    back.save_pretrained(str(tmp_path / "diffusers"), format="diffusers")
    saved = json.loads((tmp_path / "diffusers" / "scheduler" / "scheduler_config.json").read_text())
    assert saved == {k: v for k, v in SD15.items() if k != "_diffusers_version"}  # the same keys, no more
    assert diffusers_from_config("euler", saved, 4).timesteps.tolist() == [999, 666, 333, 0]
    assert SchedulerConfig.from_dict(saved) == pipe.scheduler_config


@pytest.mark.parametrize("prediction_type,hub_config", [("epsilon", SD15), ("v_prediction", SD21)])
def test_single_file_scheduler_config_is_the_hub_one(prediction_type, hub_config):
    """A single-file checkpoint gets the scheduler config diffusers' from_single_file takes from the hub
    (SD 1.5's / SD 2.1's): no timestep_spacing either, so every sampler's schedule is the same."""
    from sd_jax.weights import single_file

    cfg = single_file.scheduler_config(prediction_type)
    assert "timestep_spacing" not in cfg
    for name in ("euler", "dpmpp_2m", "unipc", "ddim", "pndm"):
        ref = diffusers_from_config(name, hub_config, 4).timesteps.numpy()
        np.testing.assert_array_equal(make_sampler(name, cfg, 4).timesteps, ref)
