"""Writing LoRAs: sd-jax layers -> the names of diffusers/PEFT and kohya files.

The inverse of :mod:`sd_jax.lora.targets`: every name written is looked up again in the same
:class:`~sd_jax.lora.targets.TargetTable` the loader uses, and must come back to the layer it
was written for, so a file sd-jax writes is a file sd-jax (and the tools that share these
names) reads back onto the same layers.

* diffusers / PEFT (what ``pipe.load_lora_weights`` reads): ``unet.<module>.lora_A.weight``
  (down, ``(r, in[, kh, kw])``) and ``.lora_B.weight`` (up, ``(out, r[, 1, 1])``),
  ``text_encoder.`` / ``text_encoder_2.`` likewise; the PEFT ``LoraConfig`` (``r``,
  ``lora_alpha``, ``target_modules``) in the ``lora_adapter_metadata`` field, as diffusers'
  ``save_lora_weights`` writes it, since these files carry no alpha tensors.
* kohya / A1111: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; text encoders ``lora_te_`` (SD 1.x/2.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL);
  an SDXL UNet in the original (SGM) block names, as kohya's scripts write them.
"""
from __future__ import annotations

import json

import numpy as np

from sd_jax.lora.formats import DOTTED_PREFIXES, KOHYA_PREFIXES
from sd_jax.lora.targets import TargetTable
from sd_jax.weights.convert import path_to_torch_key
from sd_jax.weights.safetensors_io import save_file

__all__ = ["PEFT_FILE", "peft_name", "kohya_name", "peft_state_dict", "kohya_state_dict", "save_peft", "save_kohya"]

PEFT_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' load_lora_weights looks for


def _prefix(prefixes: dict, component: str, sdxl: bool) -> str:
    """The file prefix of ``component`` (the loader's own table, read backwards)."""
    found = [p for p, c in prefixes.items() if c == component]
    if component == "text_encoder" and len(found) > 1:  # kohya: lora_te_ (SD 1/2) or lora_te1_ (SDXL)
        return "lora_te1_" if sdxl else "lora_te_"
    return found[0]


def _is_sdxl(table: TargetTable) -> bool:
    return "text_encoder_2" in table.names


def _check(table: TargetTable, prefixes: dict, name: str, dotted: bool, component: str, path: tuple) -> str:
    prefix = next(p for p in sorted(prefixes, key=len, reverse=True) if name.startswith(p))
    hit = table.lookup(prefixes[prefix], name[len(prefix):], dotted)
    if hit != (component, tuple(path)):
        raise ValueError(f"internal: the LoRA name {name} reads back as {hit}, not {component}/{'/'.join(path)}")
    return name


def peft_name(table: TargetTable, component: str, path: tuple) -> str:
    """``unet.down_blocks.0.attentions.0.proj_in`` for the sd-jax layer ``path`` of ``component``."""
    name = _prefix(DOTTED_PREFIXES, component, _is_sdxl(table)) + path_to_torch_key(path)
    return _check(table, DOTTED_PREFIXES, name, True, component, path)


def kohya_name(table: TargetTable, component: str, path: tuple) -> str:
    """``lora_unet_down_blocks_0_attentions_0_proj_in`` (an SDXL UNet: its SGM name)."""
    sdxl = _is_sdxl(table)
    module = "_".join(path)
    if sdxl and component == "unet":
        sgm = [k for k, p in table.names["unet"].items() if p == tuple(path) and k != module]
        module = sgm[0] if sgm else module
    return _check(table, KOHYA_PREFIXES, _prefix(KOHYA_PREFIXES, component, sdxl) + module, False, component, path)


def _layers(factors: dict):
    """``{(component, path): {"down", "up"}}`` from a nested ``{component: {...path...: {"down", "up"}}}``."""
    out = {}

    def walk(node, comp, path):
        if "down" in node and "up" in node and not isinstance(node["down"], dict):
            out[(comp, path)] = node
            return
        for k, v in node.items():
            walk(v, comp, path + (k,))
    for comp, tree in factors.items():
        walk(tree, comp, ())
    return out


def peft_state_dict(table: TargetTable, factors: dict, rank: int, alpha: float) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of the diffusers/PEFT file for nested ``factors`` (PyTorch layout)."""
    sd, modules = {}, {}
    for (comp, path), f in sorted(_layers(factors).items()):
        name = peft_name(table, comp, path)
        sd[f"{name}.lora_A.weight"] = np.asarray(f["down"], np.float32)
        sd[f"{name}.lora_B.weight"] = np.asarray(f["up"], np.float32)
        prefix = _prefix(DOTTED_PREFIXES, comp, False)
        # PEFT matches a target module by the end of its name: without transformers 4's
        # ``text_model.`` level, the names fit the text encoders of transformers 4 and 5 alike.
        modules.setdefault(prefix[:-1], []).append(name[len(prefix):].removeprefix("text_model."))
    meta = {}
    for comp, names in modules.items():
        meta.update({f"{comp}.r": int(rank), f"{comp}.lora_alpha": float(alpha),
                     f"{comp}.target_modules": sorted(names)})
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}


def kohya_state_dict(table: TargetTable, factors: dict, rank: int, alpha: float) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of the kohya / A1111 file (``ss_*`` fields as kohya's scripts write)."""
    sd, conv = {}, False
    for (comp, path), f in sorted(_layers(factors).items()):
        name = kohya_name(table, comp, path)
        sd[f"{name}.lora_down.weight"] = np.asarray(f["down"], np.float32)
        sd[f"{name}.lora_up.weight"] = np.asarray(f["up"], np.float32)
        sd[f"{name}.alpha"] = np.asarray(alpha, np.float32)
        conv = conv or (np.ndim(f["down"]) == 4 and np.shape(f["down"])[2:] != (1, 1))
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": f"{alpha:g}",
            "ss_network_args": json.dumps({"conv_dim": rank, "conv_alpha": alpha} if conv else {})}
    return sd, meta


def save_peft(path: str, table: TargetTable, factors: dict, rank: int, alpha: float) -> None:
    """Write the diffusers/PEFT file (atomically)."""
    tensors, meta = peft_state_dict(table, factors, rank, alpha)
    save_file(tensors, path, meta)


def save_kohya(path: str, table: TargetTable, factors: dict, rank: int, alpha: float) -> None:
    """Write the kohya / A1111 file (atomically)."""
    tensors, meta = kohya_state_dict(table, factors, rank, alpha)
    save_file(tensors, path, meta)
