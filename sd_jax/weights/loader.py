"""One loader for every model format: :func:`load` -> :class:`LoadedModel` -> :func:`save`.

Formats (:func:`sd_jax.weights.checkpoint.detect_format`):

* a diffusers folder (``model_index.json`` + one folder per component, tokenizer and
  scheduler);
* a single-file ``.safetensors`` (CompVis / SGM / A1111 layout, :mod:`sd_jax.weights.single_file`;
  SD 1.x, 2.x and SDXL);
* an sd-jax checkpoint (``sd_jax.json`` + orbax ``params/``, :mod:`sd_jax.weights.checkpoint`).

What a model is made of comes from its family (:mod:`sd_jax.families`).  A
:class:`LoadedModel` is plain data; the pipeline, the command line and training build on
it, and :func:`save` writes it back as a diffusers folder or an sd-jax checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp

from sd_jax import families, sharding
from sd_jax.diffusion.samplers import SchedulerConfig, default_scheduler_name, diffusers_class_name
from sd_jax.models import controlnet as controlnet_model
from sd_jax.models.policy import Policy
from sd_jax.tokenizer import load_tokenizer, save_tokenizer
from sd_jax.weights import checkpoint, single_file
from sd_jax.weights.convert import params_to_state_dict, state_dict_to_params
from sd_jax.weights.diffusers import read_config
from sd_jax.weights.safetensors_io import CheckpointError, load_file, save_file

__all__ = ["LoadedModel", "load", "save", "read_configs", "with_unet", "FORMATS"]

FORMATS = ("diffusers", "sd-jax", "single-file")


@dataclasses.dataclass
class LoadedModel:
    """A model as plain data.

    ``family``: its :class:`sd_jax.families.Family`; ``models``: the Flax modules
    (:class:`sd_jax.families.Models`); ``params``: ``{component: params}``; ``tokenizers``:
    ``{folder name: transformers tokenizer}``; ``scheduler``: the ``scheduler_config.json``
    dict (keys the checkpoint leaves out stay out); ``scheduler_name``: the sampler it
    names (:func:`sd_jax.diffusion.samplers.default_scheduler_name`); ``source``: the path;
    ``options``: the pipeline options of ``model_index.json`` (SDXL's
    ``force_zeros_for_empty_prompt``; :meth:`sd_jax.families.Family.pipeline_options`);
    ``controlnets``: ``[(name, ControlNetConfig, params)]``, the ControlNets saved with it
    (a diffusers ControlNet pipeline's ``controlnet/``, ``controlnet_1/``, ...);
    ``generation_defaults``: the settings its author recommends for what a request leaves
    unset (:data:`GENERATION_DEFAULTS`; a diffusers folder's ``generation_defaults.json``).
    """
    family: families.Family
    models: families.Models
    params: dict
    tokenizers: dict
    scheduler: dict
    scheduler_name: str
    source: str | None = None
    options: dict = dataclasses.field(default_factory=dict)
    controlnets: list = dataclasses.field(default_factory=list)
    generation_defaults: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.options = self.family.pipeline_options(self.options)

    @property
    def tokenizer(self):
        """The (first) tokenizer."""
        return self.tokenizers[self.family.tokenizers[0].name]

    @property
    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig.from_dict(self.scheduler)

    @property
    def inpainting(self) -> bool:
        """An inpainting model: its UNet takes latents + mask + masked-image latents (9 channels)."""
        return self.models.unet.config.in_channels == 9

    @property
    def configs(self) -> dict:
        """``{component: config dataclass}``."""
        return {c.name: getattr(self.models, c.name).config for c in self.family.components}


def _scheduler_name(cfg: dict) -> str:
    return default_scheduler_name(cfg.get("_class_name", "PNDMScheduler"), cfg)


# =========================================================================== load
def load(path: str, *, dtype=jnp.float32, param_dtype=None, attention: str = "xla", policy: Policy | None = None,
         variant: str | None = None, allow_pickle: bool = False, mesh=None) -> LoadedModel:
    """Load a diffusers folder, a single-file ``.safetensors`` or an sd-jax checkpoint.

    Args:
      dtype: computation dtype (the VAE stays float32 when this is float16: it overflows).
      param_dtype: dtype of the parameters; None = ``dtype``.
      attention: attention implementation name (:mod:`sd_jax.models.attention`).
      policy: the models' :class:`~sd_jax.models.policy.Policy` (in place of the three above;
        None: ``Policy(dtype, param_dtype, attention)``).
      variant: diffusers weights variant (``"fp16"``: ``*.fp16.safetensors``).
      allow_pickle: read ``.bin`` weights of a diffusers folder (``torch.load(weights_only=True)``).
      mesh: an sd-jax checkpoint is restored straight onto this mesh, replicated
        (default: :func:`sd_jax.sharding.make_mesh`); other formats load onto the default device.
    Raises:
      CheckpointError (one line) for a path that is not a model sd-jax can load.
    """
    policy = policy or Policy(dtype, param_dtype, attention)
    fmt = checkpoint.detect_format(path)
    if fmt == "single-file":
        return _load_single_file(path, policy)
    if fmt == "sd-jax":
        return _load_sd_jax(path, policy, mesh=mesh)
    return _load_diffusers(path, policy, variant=variant, allow_pickle=allow_pickle)


def _diffusers_family(path: str) -> families.Family:
    return _diffusers_index_family(path)[1]


# A model's recommended generation settings, applied where a request leaves them unset: the
# guidance window (sd_jax.request.GenerationRequest.guidance_start / guidance_end).  A diffusers
# folder keeps them in generation_defaults.json at its root, which diffusers does not read.
GENERATION_DEFAULTS_FILE = "generation_defaults.json"
GENERATION_DEFAULTS = ("guidance_start", "guidance_end")


def check_generation_defaults(d: Any, where: str = "generation defaults") -> dict:
    """``d`` as a checked dict of :data:`GENERATION_DEFAULTS` (a CheckpointError, one line, otherwise)."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where} must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(GENERATION_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(GENERATION_DEFAULTS)}")
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise CheckpointError(f"{where}: {k} must be a number in [0, 1] (a fraction of the steps), got {v!r}")
    if not d.get("guidance_start", 0.0) < d.get("guidance_end", 1.0):
        raise CheckpointError(f"{where}: guidance_start must be below guidance_end, got {d}")
    return {k: float(d[k]) for k in GENERATION_DEFAULTS if k in d}


def _read_generation_defaults(path: str) -> dict:
    if not os.path.isfile(os.path.join(path, GENERATION_DEFAULTS_FILE)):
        return {}
    return check_generation_defaults(read_config(path, GENERATION_DEFAULTS_FILE),
                                     os.path.join(path, GENERATION_DEFAULTS_FILE))


def _diffusers_index_family(path: str) -> tuple[dict, families.Family]:
    index = read_config(path, "model_index.json")
    configs = {}
    if os.path.isfile(os.path.join(path, "text_encoder", "config.json")):
        configs["text_encoder"] = read_config(os.path.join(path, "text_encoder"))
    return index, families.detect(configs, index, where=path)


def _sd_jax_family(meta: dict) -> families.Family:
    return families.get(meta["family"]) if "family" in meta else families.detect(meta)


def _load_diffusers(path, policy: Policy, *, variant, allow_pickle) -> LoadedModel:
    index, family = _diffusers_index_family(path)
    for c in family.folders():
        if not os.path.isdir(os.path.join(path, c)):
            raise CheckpointError(f"{path} is missing its {c}/ folder; the diffusers model is incomplete")
    models, params = {}, {}
    for c in family.components:
        models[c.name], params[c.name] = c.load(os.path.join(path, c.name), policy=c.policy_for(policy),
                                                variant=variant, allow_pickle=allow_pickle)
    sched = read_config(os.path.join(path, "scheduler"), "scheduler_config.json")
    tokenizers = {t.name: load_tokenizer(os.path.join(path, t.name)) for t in family.tokenizers}
    nets = controlnet_model.load_all(path, index, policy=models["unet"].policy, base=models["unet"].config,
                                     variant=variant, allow_pickle=allow_pickle)
    return LoadedModel(family, families.Models(**models), params, tokenizers, sched, _scheduler_name(sched),
                       source=path, options=family.pipeline_options(index), controlnets=nets,
                       generation_defaults=_read_generation_defaults(path))


def _load_single_file(path, policy: Policy, prediction_type=None) -> LoadedModel:
    sf = single_file.convert(path, prediction_type=prediction_type)
    if sf.family not in families.FAMILIES:   # the SDXL refiner, until its family is registered
        raise CheckpointError(f"{path} is an {sf.family} single file; sd-jax reads its weights "
                              f"(sd_jax.weights.single_file.convert) but cannot run {sf.family} models yet")
    family = families.get(sf.family)
    models = families.build_models(family, sf.configs, policy=policy)
    params = families.params_from_state_dicts(family, models, sf.state_dicts, policy.param_dtype)
    sched = sf.configs["scheduler"]
    tokenizers = single_file.tokenizers_for(family.name)
    return LoadedModel(family, models, params, tokenizers, sched, _scheduler_name(sched), source=path)


def _load_sd_jax(path, policy: Policy, *, mesh) -> LoadedModel:
    rep = sharding.replicated(mesh if mesh is not None else sharding.make_mesh())
    meta, params = checkpoint.read(path, param_dtype=policy.param_dtype, sharding=rep)
    path = os.path.abspath(path)
    family = _sd_jax_family(meta)
    models = families.build_models(family, meta, policy=policy)
    tokenizers = {t.name: load_tokenizer(os.path.join(path, t.name)) for t in family.tokenizers}
    saved = params.pop("controlnets", {})
    nets = [(c["name"], controlnet_model.ControlNetConfig.from_dict(c["config"]), saved[controlnet_model.folder_name(i)])
            for i, c in enumerate(meta.get("controlnets", ()))]
    return LoadedModel(family, models, params, tokenizers, dict(meta["scheduler_config"]), meta["scheduler_name"],
                       source=path, options=family.pipeline_options(meta.get("pipeline_options")), controlnets=nets,
                       generation_defaults=check_generation_defaults(meta.get("generation_defaults", {}), path))


def with_unet(loaded: LoadedModel, path: str) -> LoadedModel:
    """``loaded`` with its UNet's weights replaced by a UNet-only ``.safetensors`` (SDXL-Lightning's
    ``*_unet.safetensors``, a fine-tuned UNet): diffusers key names, or the original layout's
    ``model.diffusion_model.*``.  The file must fit the model's UNet config, key for key and
    shape for shape; CheckpointError (one line) otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"--unet {path!r} not found")
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"--unet {path}: UNet weights are read from .safetensors files only (pickle files "
                              f"can run code when loaded)")
    sd = load_file(path)
    if any(k.startswith(single_file.UNET) for k in sd):
        family = loaded.family.name if loaded.family.single_file is not None else "sd1"
        sd = single_file.unet_state_dict(sd, family, path)
    unet = loaded.models.unet
    proj = sd.get("time_embedding.cond_proj.weight")
    proj = None if proj is None else int(proj.shape[1])
    if proj != getattr(unet.config, "time_cond_proj_dim", proj):
        # an LCM-distilled UNet (latent-consistency/lcm-sdxl) is the base's architecture plus the
        # guidance embedding's cond_proj (time_cond_proj_dim): the pipeline then runs it once per step
        unet = unet.clone(config=dataclasses.replace(unet.config, time_cond_proj_dim=proj))
        loaded = dataclasses.replace(loaded, models=dataclasses.replace(loaded.models, unet=unet))
    try:
        params = state_dict_to_params(sd, loaded.family.component("unet").param_shapes(unet), what="unet",
                                      dtype=unet.param_dtype)
    except CheckpointError as e:
        detail = str(e).split(" (", 1)[-1].rsplit("); check", 1)[0]
        raise CheckpointError(f"--unet {path} does not fit the {loaded.family.name} model's UNet ({detail}); "
                              f"give a UNet of the same architecture (e.g. SDXL-Lightning's UNet for SDXL base)") from None
    return dataclasses.replace(loaded, params={**loaded.params, "unet": jax.device_put(params)})


def read_configs(path: str) -> dict:
    """``{component: config dict}`` of a model in any format, without loading its weights into
    models (a single file's configs are inferred from its keys and shapes)."""
    fmt = checkpoint.detect_format(path)
    if fmt == "single-file":
        return {k: v for k, v in single_file.convert(path).configs.items() if k != "scheduler"}
    if fmt == "sd-jax":
        meta = read_config(path, "sd_jax.json")
        return {c: meta[c] for c in _sd_jax_family(meta).component_names}
    return {c: read_config(os.path.join(path, c)) for c in _diffusers_family(path).component_names}


# =========================================================================== save
def save(loaded: LoadedModel, path: str, format: str = "diffusers") -> None:
    """Write ``loaded`` as a diffusers folder (``format="diffusers"``, safetensors, loadable by
    diffusers PyTorch), an sd-jax checkpoint (``"sd-jax"``, also spelled ``"orbax"``) or one
    original-layout ``.safetensors`` file (``"single-file"``: CompVis for SD 1.x/2.x, SGM for
    SDXL; :func:`sd_jax.weights.single_file.to_single_file`)."""
    if format == "orbax":
        format = "sd-jax"
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use 'diffusers', 'sd-jax' ('orbax') or 'single-file'")
    if format == "sd-jax":
        _save_sd_jax(loaded, path)
    elif format == "single-file":
        _save_single_file(loaded, path)
    else:
        _save_diffusers(loaded, path)


def _save_sd_jax(loaded: LoadedModel, path: str) -> None:
    meta: dict[str, Any] = {"family": loaded.family.name,
                            **{name: cfg.to_dict() for name, cfg in loaded.configs.items()},
                            "scheduler_config": loaded.scheduler, "scheduler_name": loaded.scheduler_name}
    if loaded.options:
        meta["pipeline_options"] = dict(loaded.options)
    if loaded.generation_defaults:  # (absent otherwise: checkpoints stay as they were)
        meta["generation_defaults"] = dict(loaded.generation_defaults)
    params = loaded.params
    if loaded.controlnets:  # (absent otherwise: checkpoints without ControlNets stay as they were)
        meta["controlnets"] = [{"name": n, "config": cfg.to_dict()} for n, cfg, _ in loaded.controlnets]
        params = {**params, "controlnets": {controlnet_model.folder_name(i): p
                                            for i, (_, _, p) in enumerate(loaded.controlnets)}}
    checkpoint.write(path, meta, params, loaded.tokenizers, sources=[loaded.source])


def _save_single_file(loaded: LoadedModel, path: str) -> None:
    """One ``.safetensors`` in the family's original layout, written atomically (a temporary
    file renamed into place).  Its tokenizers and scheduler are not in it (the format has
    none): loading it back builds the family's standard ones."""
    if not str(path).endswith(".safetensors"):
        raise CheckpointError(f"{path}: a single file is written as a .safetensors file; give a path ending "
                              f"in .safetensors")
    if loaded.family.single_file is None:
        raise CheckpointError(f"{loaded.family.name} models have no single-file layout; write a diffusers "
                              f"folder or an sd-jax checkpoint instead")
    if loaded.controlnets:
        raise CheckpointError("a single-file checkpoint holds no ControlNets; write a diffusers folder or an "
                              "sd-jax checkpoint to keep them with the model")
    params = jax.device_get(loaded.params)
    if jax.process_index() != 0:
        return
    configs = {name: cfg.to_dict() for name, cfg in loaded.configs.items()}
    state_dicts = {name: params_to_state_dict(params[name]) for name in configs}
    tensors = single_file.to_single_file(configs, state_dicts, family=loaded.family.name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        save_file(tensors, str(path))
    finally:   # an interrupted write leaves no partial file (save_file renames only a complete one)
        if os.path.exists(str(path) + ".tmp"):
            os.remove(str(path) + ".tmp")


def _save_diffusers(loaded: LoadedModel, path: str) -> None:
    params = jax.device_get(loaded.params)
    if jax.process_index() != 0:  # every host holds the same weights; one writes them
        checkpoint.check_destination(path, [loaded.source])
        return
    with checkpoint.writing_model(path, [loaded.source]) as staged:
        _write_diffusers(loaded, params, staged)


def _write_diffusers(loaded: LoadedModel, params, path: str) -> None:
    for c in loaded.family.components:
        c.save(os.path.join(path, c.name), getattr(loaded.models, c.name).config, params[c.name])
    for name, tok in loaded.tokenizers.items():
        save_tokenizer(tok, os.path.join(path, name))
    scheduler_class = diffusers_class_name(loaded.scheduler_name)
    sched = {"_class_name": scheduler_class, **{k: v for k, v in loaded.scheduler.items() if k != "_class_name"}}
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(sched, f, indent=2)
    index = loaded.family.model_index(scheduler_class, loaded.inpainting, loaded.options)
    if loaded.controlnets:  # diffusers' StableDiffusion(XL)ControlNet*Pipeline layout
        for i, (name, cfg, p) in enumerate(loaded.controlnets):
            controlnet_model.save(os.path.join(path, controlnet_model.folder_name(i)), cfg, p, name)
        index["_class_name"] = controlnet_model.pipeline_class(index["_class_name"])
        index["controlnet"] = controlnet_model.index_entry(len(loaded.controlnets))
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    if loaded.generation_defaults:
        with open(os.path.join(path, GENERATION_DEFAULTS_FILE), "w", encoding="utf-8") as f:
            json.dump(loaded.generation_defaults, f, indent=2)
