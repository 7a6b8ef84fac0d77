"""Layer names of LoRA files -> sd-jax parameter paths.

sd-jax's parameter paths mirror diffusers' module names with ``_N`` for list items
(:mod:`sd_jax.weights.convert`), so a diffusers module ``down_blocks.1.attentions.0.proj_in``
is the path ``("down_blocks_1", "attentions_0", "proj_in")`` and kohya's spelling of it,
``down_blocks_1_attentions_0_proj_in``, is the path joined with ``_``.  Every name is
therefore looked up in one table per component: ``"_".join(path) -> path`` for every layer
with a ``kernel``, plus, for the UNet, the same layers in the original Stable Diffusion
(SGM / LDM) names that kohya uses for SDXL (``input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``middle_block_0_in_layers_2``, ``output_blocks_2_2_conv``, ...), derived from the model's
own block structure as diffusers' ``_maybe_map_sgm_blocks_to_diffusers`` does.
"""
from __future__ import annotations

import re

from sd_jax.weights.convert import flatten

_RESNET_SGM = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
               "conv_shortcut": "skip_connection"}
# diffusers' attention-processor names inside an attention / text-encoder attention layer.
_PROC_UNET = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
_PROC_TE = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
_NUM = re.compile(r"^(.*)_(\d+)$")


def _index(name: str) -> int:
    return int(_NUM.match(name).group(2))


def _sgm_names(paths: list[tuple]) -> dict[str, tuple]:
    """SGM (original SD) names of the UNet's layers: ``{name: path}``."""
    blocks: dict[tuple, set] = {}
    for p in paths:
        if p[0].startswith(("down_blocks_", "up_blocks_")) and len(p) > 1:
            blocks.setdefault((p[0].split("_")[0], _index(p[0])), set()).add(p[1])
    n_res = {k: len({s for s in v if s.startswith("resnets_")}) for k, v in blocks.items()}
    n_down = 1 + max((i for (kind, i) in blocks if kind == "down"), default=-1)
    n_up = 1 + max((i for (kind, i) in blocks if kind == "up"), default=-1)
    down_start, start = {}, 1
    for i in range(n_down):
        down_start[i] = start
        start += n_res.get(("down", i), 0) + 1
    up_start, start = {}, 0
    for i in range(n_up):
        up_start[i] = start
        start += n_res.get(("up", i), 0)
    out = {}
    for p in paths:
        head, sub, rest = p[0], p[1] if len(p) > 1 else None, list(p[2:])
        name = None
        if head == "conv_in":
            name = ["input_blocks_0_0"]
        elif head == "conv_out":
            name = ["out_2"]
        elif head in ("time_embedding", "add_embedding") and sub in ("linear_1", "linear_2"):
            base = "time_embed" if head == "time_embedding" else "label_emb_0"
            name = [f"{base}_{0 if sub == 'linear_1' else 2}"]
        elif head == "mid_block" and sub in ("resnets_0", "attentions_0", "resnets_1"):
            name = [f"middle_block_{ {'resnets_0': 0, 'attentions_0': 1, 'resnets_1': 2}[sub] }"] + rest
        elif head.startswith("down_blocks_") and sub:
            i = _index(head)
            if sub.startswith("downsamplers_") and rest == ["conv"]:
                name = [f"input_blocks_{down_start[i] + n_res[('down', i)]}_0_op"]
                rest = []
            elif sub.startswith(("resnets_", "attentions_")):
                name = [f"input_blocks_{down_start[i] + _index(sub)}_{0 if sub.startswith('res') else 1}"] + rest
        elif head.startswith("up_blocks_") and sub:
            i = _index(head)
            if sub.startswith("upsamplers_") and rest == ["conv"]:
                has_attn = any(s.startswith("attentions_") for s in blocks[("up", i)])
                name = [f"output_blocks_{up_start[i] + n_res[('up', i)] - 1}_{2 if has_attn else 1}_conv"]
            elif sub.startswith(("resnets_", "attentions_")):
                name = [f"output_blocks_{up_start[i] + _index(sub)}_{0 if sub.startswith('res') else 1}"] + rest
        if name is None:
            continue
        if (head.startswith(("down_blocks_", "up_blocks_")) and sub and sub.startswith("resnets_")) or \
                (head == "mid_block" and sub.startswith("resnets_")):
            name = name[:1] + [_RESNET_SGM.get(x, x) for x in name[1:]]
        out["_".join(name)] = p
    return out


class TargetTable:
    """Every layer a LoRA can adapt in a model, by every name files use for it.

    ``shapes``: ``{component: parameter tree}`` (arrays or ``ShapeDtypeStruct``); only
    ``unet``, ``text_encoder`` and ``text_encoder_2`` are looked at."""

    def __init__(self, shapes: dict):
        self.kernels: dict[str, dict[tuple, object]] = {}
        self.names: dict[str, dict[str, tuple]] = {}
        for comp in ("unet", "text_encoder", "text_encoder_2"):
            if comp not in shapes:
                continue
            flat = flatten(shapes[comp])
            kernels = {p[:-1]: v for p, v in flat.items() if p[-1] == "kernel"}
            self.kernels[comp] = kernels
            names = {"_".join(p): p for p in kernels}
            if comp == "unet":
                for k, v in _sgm_names(list(kernels)).items():
                    names.setdefault(k, v)
            else:  # transformers 5's CLIPTextModel has no ``text_model`` level: PEFT files saved with it
                for k, v in list(names.items()):
                    if k.startswith("text_model_"):
                        names.setdefault(k[len("text_model_"):], v)
            self.names[comp] = names

    def lookup(self, component: str | None, module: str, dotted: bool):
        """``(component, module path)`` of a layer name, or None."""
        comp = component or "unet"
        if comp not in self.names:
            return None
        if dotted:
            parts = [x for x in module.split(".") if x != "processor"]
            if parts and parts[-1] in ("lora", "lora_linear_layer"):
                parts = parts[:-1]
            if parts and parts[-1] in _PROC_UNET:
                parts[-1] = (_PROC_UNET if comp == "unet" else _PROC_TE)[parts[-1]]
            module = "_".join(".".join(parts).split("."))
        path = self.names[comp].get(module)
        return None if path is None else (comp, path)
