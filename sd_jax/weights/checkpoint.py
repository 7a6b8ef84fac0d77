"""sd-jax's own checkpoint format, and which format a model path is.

sd-jax's own format is a folder with ``sd_jax.json`` (the family, every component's
config, the scheduler), one folder per tokenizer (``tokenizer/``) and ``params/``, an
orbax checkpoint of ``{"text_encoder": ..., "unet": ..., "vae": ...}``.  It loads straight
onto the devices (no PyTorch-layout conversion), which makes it the fast way to start.
This module reads and writes the folder; :mod:`sd_jax.weights.loader` turns it into a model.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping

import jax

from sd_jax import families
from sd_jax.diffusion.samplers import SchedulerConfig, default_scheduler_name
from sd_jax.tokenizer import save_tokenizer
from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["FORMAT", "detect_format", "read", "write", "pipeline_from_state_dicts"]

FORMAT = "sd-jax"
VERSION = 1


def detect_format(path: str) -> str:
    """``"diffusers"``, ``"sd-jax"`` or ``"single-file"``; a clear error for anything else."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "single-file"
        if path.endswith((".ckpt", ".bin", ".pt", ".pth")):
            raise CheckpointError(
                f"{path} is a pickle checkpoint, which can run code when loaded; re-save it as .safetensors "
                f"(or convert it to a diffusers folder) and load that")
        raise CheckpointError(f"{path} is not a model: expected a diffusers folder, an sd-jax checkpoint folder "
                              f"or a .safetensors single-file checkpoint")
    if not os.path.isdir(path):
        raise CheckpointError(f"model {path!r} not found")
    if os.path.isfile(os.path.join(path, "sd_jax.json")):
        return "sd-jax"
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "diffusers"
    raise CheckpointError(f"{path} has neither model_index.json (diffusers) nor sd_jax.json (sd-jax checkpoint); "
                          f"point --model at the model's top folder")


def read(path: str, *, param_dtype, sharding) -> tuple[dict, dict]:
    """``(sd_jax.json, params)`` of an sd-jax checkpoint; the parameters are restored as
    ``param_dtype`` with ``sharding`` (a ``jax.sharding.Sharding`` for every leaf)."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    with open(os.path.join(path, "sd_jax.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/sd_jax.json is not an sd-jax checkpoint description")
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path} has no params/ folder; the sd-jax checkpoint is incomplete")
    ckptr = ocp.StandardCheckpointer()
    try:
        structure = ckptr.metadata(params_dir)
        tree = getattr(structure, "item_metadata", structure)
        tree = getattr(tree, "tree", tree)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), param_dtype, sharding=sharding), tree)
        params = ckptr.restore(params_dir, target)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot read the sd-jax checkpoint {path}: {str(e).splitlines()[0]}") from None
    return meta, params


def write(path: str, meta: dict, params, tokenizers: Mapping[str, object]) -> None:
    """Write an sd-jax checkpoint: ``meta`` (without ``format``/``version``) as ``sd_jax.json``,
    ``params`` with orbax, each tokenizer into its folder.  Written beside the destination and
    swapped in, so an interrupted save never leaves half a checkpoint."""
    import orbax.checkpoint as ocp
    final = os.path.abspath(path)
    if os.path.exists(final) and os.listdir(final) and not os.path.isfile(os.path.join(final, "sd_jax.json")):
        raise CheckpointError(f"{final} exists and is not an sd-jax checkpoint; save to a new or empty folder")
    path = final + ".tmp-save"
    if os.path.exists(path):
        shutil.rmtree(path)
    os.makedirs(path)
    for name, tok in tokenizers.items():
        save_tokenizer(tok, os.path.join(path, name))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), params)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        with open(os.path.join(path, "sd_jax.json"), "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "version": VERSION, **meta}, f, indent=2)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(path, final)


def pipeline_from_state_dicts(cls, configs: dict, state_dicts: dict, tokenizer, scheduler_config: dict, *,
                              dtype, param_dtype, attention, mesh, source=None):
    """``cls`` (a pipeline class) built from diffusers-layout configs and state dicts.  Kept for
    callers of the old API; :func:`sd_jax.weights.loader.load` is the loader."""
    family = families.detect(configs)
    models = families.build_models(family, configs, dtype=dtype, param_dtype=param_dtype, attention=attention)
    params = families.params_from_state_dicts(family, models, state_dicts, param_dtype or dtype)
    name = default_scheduler_name(scheduler_config.get("_class_name", "PNDMScheduler"), scheduler_config)
    return cls(models, params, tokenizer, SchedulerConfig.from_dict(scheduler_config), name, mesh=mesh, source=source)
