"""Reading and writing diffusers-format folders.

A pipeline folder holds ``model_index.json`` and one sub-folder per component
(``text_encoder/``, ``tokenizer/``, ``unet/``, ``vae/``, ``scheduler/``); each model
component has ``config.json`` and its weights as ``*.safetensors`` (optionally a
``.fp16`` variant, optionally sharded with an ``*.index.json``).
"""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from sd_jax.weights.safetensors_io import CheckpointError, load_file, save_file

WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


def read_config(folder: str, name: str = "config.json") -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found: {folder!r} is not a diffusers component folder")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix or re-export it") from None


def _find_weights(folder: str, variant: str | None) -> list[str]:
    suffixes = [f".{variant}.safetensors"] if variant else []
    suffixes.append(".safetensors")
    for suffix in suffixes:
        for base in WEIGHT_NAMES:
            single = os.path.join(folder, base + suffix)
            if os.path.isfile(single):
                return [single]
            index = os.path.join(folder, base + suffix + ".index.json")
            if os.path.isfile(index):
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return [os.path.join(folder, s) for s in shards]
    if variant is None:  # a folder holding only an fp16 variant is still usable
        found = sorted(glob.glob(os.path.join(folder, "*.fp16.safetensors")))
        if found:
            return found
    return []


def read_state_dict(folder: str, variant: str | None = None, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The weights of one component folder as ``{torch key: numpy array}``.

    Pickle files (``.bin``/``.ckpt``) can run arbitrary code when loaded, so they are
    refused unless ``allow_pickle`` is set, and then read with
    ``torch.load(weights_only=True)``.
    """
    if not os.path.isdir(folder):
        raise CheckpointError(f"component folder {folder!r} not found; the model folder is incomplete")
    files = _find_weights(folder, variant)
    if files:
        sd: dict[str, np.ndarray] = {}
        for f in files:
            if not os.path.isfile(f):
                raise CheckpointError(f"{f} (listed in the shard index) is missing; re-download the model")
            sd.update(load_file(f))
        return sd
    pickles = [f for f in sorted(os.listdir(folder)) if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        path = os.path.join(folder, pickles[0])
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickle file, which can run code when loaded; convert it with "
                f"`sd-jax convert` after re-saving it as safetensors, or pass allow_pickle=True "
                f"(--allow-pickle) to read it with torch.load(weights_only=True)")
        return load_pickle(path)
    raise CheckpointError(f"no *.safetensors weights in {folder!r}; the model folder is incomplete")


def load_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading the pickle file {path} needs torch (pip install torch)") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in obj.items() if hasattr(v, "numpy")}


def write_component(folder: str, config: dict, state_dict: dict[str, np.ndarray],
                    weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
    os.makedirs(folder, exist_ok=True)
    save_file(state_dict, os.path.join(folder, weights_name), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
