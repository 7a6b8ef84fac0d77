"""Single-file Stable Diffusion 1.x / 2.x / XL checkpoints (CompVis / SGM / AUTOMATIC1111 layout).

A single-file checkpoint is one ``.safetensors`` holding the whole pipeline under the
original latent-diffusion (SD 1.x/2.x) or generative-models (SGM, SDXL) names::

    model.diffusion_model.*                 UNet        (input_blocks / middle_block / output_blocks;
                                                         SDXL: label_emb = add_embedding)
    first_stage_model.*                     VAE         (encoder.down / decoder.up / mid.attn_1)
    cond_stage_model.transformer.*          SD 1.x text encoder (transformers' CLIPTextModel)
    cond_stage_model.model.*                SD 2.x text encoder (OpenCLIP ViT-H/14)
    conditioner.embedders.0.transformer.*   SDXL base text_encoder (CLIP ViT-L, transformers' names)
    conditioner.embedders.1.model.*         SDXL base text_encoder_2 (OpenCLIP bigG/14 with projection)
    conditioner.embedders.0.model.*         SDXL refiner text_encoder_2 (OpenCLIP bigG/14; no CLIP ViT-L)

:func:`convert` turns one into diffusers-layout state dicts and configs (numpy only, so
arrays stay memory-mapped and nothing is copied that need not be) and :func:`to_single_file`
goes back; :func:`sd_jax.weights.loader.load` loads a file as a model.  Which prefix holds
which network, per family, is in the family registry (:class:`sd_jax.families.SingleFileLayout`);
the key tables below rename what is under the prefixes.  A single file has no tokenizer,
so :func:`tokenizer_for` builds the family's real one (:func:`sd_jax.tokenizer.clip_tokenizer`).

What is read from the weights (so scaled-down checkpoints convert too):

* family: SD 1.x when the text encoder is transformers' CLIP, SD 2.x when it is OpenCLIP,
  SDXL base when there are ``conditioner.embedders.0.transformer`` and ``.1.model``, the
  SDXL refiner (``"sdxl-refiner"``) when ``conditioner.embedders.0`` is OpenCLIP;
* UNet: input/output channels, block widths, layers per block, which levels have
  attention, transformer depth, cross-attention width, conv vs linear ``proj_in``;
  attention heads cannot be seen in the weights, so they follow the original configs
  (SD 1.x: 8 heads everywhere; SD 2.x and SDXL: 64-channel heads, i.e. 5/10/20/20 at full size);
  SDXL's ``addition_time_embed_dim`` is ``label_emb``'s input width less the pooled text
  width, over the number of time ids (6: sizes and crop; the refiner's 5: sizes, crop and
  aesthetic score);
* inpainting: 9 UNet input channels;
* VAE: widths, layers per block, latent channels, mid attention, quant convs;
* text encoder: widths, layers, vocabulary, positions (heads: 64-channel, as CLIP).

SD 2.x text encoders: SD 2 conditions on OpenCLIP's penultimate layer, so the last
residual block is dropped (23 of ViT-H's 24 layers, as diffusers' conversion does), and
``text_projection`` / ``logit_scale`` are unused.  :func:`to_single_file` writes one
zero-filled block back in its place so a round trip is exact and the file has the real
layout.  SDXL's OpenCLIP keeps every block (its pooled output runs them all), its fused
``in_proj_weight`` is split into q/k/v and its ``text_projection`` (``x @ P``) is the
transposed ``text_projection.weight`` of ``CLIPTextModelWithProjection``.

Prediction type is not in the weights: diffusers' rule is used (SD 2.x non-inpainting ->
``v_prediction`` unless the file's ``global_step`` is 875000, everything else ->
``epsilon``); pass ``prediction_type="epsilon"`` for SD 2.x *base* (512 px) models.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np

from sd_jax import families
from sd_jax import tokenizer as tokenizer_lib
from sd_jax.tokenizer import BPE_FILE, clip_tokenizer_folder  # noqa: F401  (part of this module's API)
from sd_jax.weights import checkpoint
from sd_jax.weights.safetensors_io import CheckpointError, load_file

__all__ = ["SingleFile", "convert", "to_single_file", "load_pipeline", "clip_tokenizer_folder",
           "tokenizer_for", "tokenizers_for", "detect_family", "REFINER"]

UNET = families.SD1.single_file.prefixes["unet"]
VAE = families.SD1.single_file.prefixes["vae"]
CLIP = families.SD1.single_file.prefixes["text_encoder"]
OPENCLIP = families.SD2.single_file.prefixes["text_encoder"]
_DIFFUSERS_VERSION = families.DIFFUSERS_VERSION

CLIP_XL = families.SDXL.single_file.prefixes["text_encoder"]
OPENCLIP_XL = families.SDXL.single_file.prefixes["text_encoder_2"]
# The SDXL refiner has no family entry of its own here (the pipeline's refiner work adds it);
# its single-file layout is this one (also once an "sdxl-refiner" family is registered).
REFINER = "sdxl-refiner"
OPENCLIP_REFINER = "conditioner.embedders.0.model."
REFINER_LAYOUT = families.SingleFileLayout(prefixes={"unet": UNET, "vae": VAE, "text_encoder_2": OPENCLIP_REFINER},
                                           text_layout="openclip", marker=OPENCLIP_REFINER, unet_heads="64ch")
_XL = ("sdxl", REFINER)
_TIME_IDS = {"sdxl": 6, REFINER: 5}   # original + crop + target sizes; the refiner: aesthetic score for target
_XL_VAE_SCALING = 0.13025

_NOT_SD = "is not a Stable Diffusion 1.x/2.x/XL single-file checkpoint"


@dataclasses.dataclass
class SingleFile:
    """A converted single-file checkpoint.

    ``configs``: ``"text_encoder"`` (transformers ``config.json``), ``"unet"``, ``"vae"``
    (diffusers ``config.json``) and ``"scheduler"`` (``scheduler_config.json``, with
    ``_class_name``).  ``state_dicts``: ``"text_encoder"`` (``text_model.``-prefixed keys),
    ``"unet"``, ``"vae"`` -> ``{key: np.ndarray}`` in the diffusers / transformers names.
    ``ignored``: the checkpoint's keys that were not needed (EMA copies, training buffers,
    OpenCLIP's unused last block, ...).
    """
    configs: dict
    state_dicts: dict
    family: str = "sd1"            # "sd1" | "sd2" | "sdxl" | "sdxl-refiner" (these two add "text_encoder_2")
    inpainting: bool = False
    prediction_type: str = "epsilon"
    ignored: list = dataclasses.field(default_factory=list)


# =========================================================================== key tables
# A table maps module prefixes between the layouts: {ldm_prefix: (diffusers_prefix, kind)}.
# ``kind`` names how the rest of the key is renamed (identical for transformer internals).

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2",
                "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# diffusers < 0.14 names of the VAE attention (accepted by to_single_file)
_VAE_ATTN_OLD = {"query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_SUBMAPS = {"unet_resnet": _UNET_RESNET, "vae_resnet": _VAE_RESNET, "vae_attn": _VAE_ATTN}


def _unet_table(n_levels: int, layers: int, down_attn: list[bool], up_attn: list[bool]) -> dict:
    t = {"time_embed.0": ("time_embedding.linear_1", "same"), "time_embed.2": ("time_embedding.linear_2", "same"),
         "input_blocks.0.0": ("conv_in", "same"), "out.0": ("conv_norm_out", "same"), "out.2": ("conv_out", "same"),
         "middle_block.0": ("mid_block.resnets.0", "unet_resnet"),
         "middle_block.1": ("mid_block.attentions.0", "same"),
         "middle_block.2": ("mid_block.resnets.1", "unet_resnet"),
         # SDXL's text-time embedding (absent, so unused, in SD 1.x/2.x files)
         "label_emb.0.0": ("add_embedding.linear_1", "same"), "label_emb.0.2": ("add_embedding.linear_2", "same")}
    for b in range(n_levels):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            t[f"input_blocks.{i}.0"] = (f"down_blocks.{b}.resnets.{j}", "unet_resnet")
            if down_attn[b]:
                t[f"input_blocks.{i}.1"] = (f"down_blocks.{b}.attentions.{j}", "same")
        if b < n_levels - 1:
            t[f"input_blocks.{(b + 1) * (layers + 1)}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", "same")
    for b in range(n_levels):
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            t[f"output_blocks.{i}.0"] = (f"up_blocks.{b}.resnets.{j}", "unet_resnet")
            if up_attn[b]:
                t[f"output_blocks.{i}.1"] = (f"up_blocks.{b}.attentions.{j}", "same")
        if b < n_levels - 1:
            i = b * (layers + 1) + layers
            t[f"output_blocks.{i}.{2 if up_attn[b] else 1}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", "same")
    return t


def _vae_table(n_levels: int, layers: int, mid_attn: bool = True) -> dict:
    t = {}
    for part in ("encoder", "decoder"):
        t[f"{part}.conv_in"] = (f"{part}.conv_in", "same")
        t[f"{part}.conv_out"] = (f"{part}.conv_out", "same")
        t[f"{part}.norm_out"] = (f"{part}.conv_norm_out", "same")
        t[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", "vae_resnet")
        t[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", "vae_resnet")
        if mid_attn:
            t[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", "vae_attn")
    for i in range(n_levels):
        for j in range(layers):
            t[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", "vae_resnet")
        if i < n_levels - 1:
            t[f"encoder.down.{i}.downsample.conv"] = (f"encoder.down_blocks.{i}.downsamplers.0.conv", "same")
        up = n_levels - 1 - i           # decoder.up is numbered from the lowest resolution
        for j in range(layers + 1):
            t[f"decoder.up.{up}.block.{j}"] = (f"decoder.up_blocks.{i}.resnets.{j}", "vae_resnet")
        if i < n_levels - 1:
            t[f"decoder.up.{up}.upsample.conv"] = (f"decoder.up_blocks.{i}.upsamplers.0.conv", "same")
    t["quant_conv"] = ("quant_conv", "same")
    t["post_quant_conv"] = ("post_quant_conv", "same")
    return t


def rename_all(sd: dict, table: dict, prefix: str) -> tuple[dict, list[str]]:
    """``sd``'s keys renamed by ``table`` (original -> diffusers layout): (renamed, the keys not
    understood, with ``prefix`` for messages)."""
    out, bad = {}, []
    for k, v in sd.items():
        hit = _rename(k, table, _SUBMAPS)
        if hit is None:
            bad.append(prefix + k)
        else:
            out[hit[0]] = v
    return out, bad


def _rename(key: str, table: dict, submaps: dict) -> tuple[str, str] | None:
    """(new key, kind) for ``key`` by its longest matching prefix in ``table``, or None."""
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        hit = table.get(".".join(parts[:n]))
        if hit is None:
            continue
        new_prefix, kind = hit
        rest = parts[n:]
        if kind != "same":
            mid, leaf = ".".join(rest[:-1]), rest[-1]
            sub = submaps[kind].get(mid)
            if sub is None or leaf not in ("weight", "bias"):
                return None
            rest = [sub, leaf]
        return new_prefix + "." + ".".join(rest), kind
    return None


def _invert(table: dict) -> dict:
    return {new: (old, kind) for old, (new, kind) in table.items()}


_INV_SUBMAPS = {k: {v: kk for kk, v in m.items()} for k, m in _SUBMAPS.items()}


# =========================================================================== helpers
def _as_numpy(v) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            import ml_dtypes
            return v.view(__import__("torch").int16).numpy().view(ml_dtypes.bfloat16)
        return v.numpy()
    return np.asarray(v)


def _indices(keys, prefix: str) -> list[int]:
    """Sorted distinct integers N of keys ``prefix + "N." ...``."""
    out = set()
    n = len(prefix)
    for k in keys:
        if k.startswith(prefix):
            head = k[n:].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def _strip(sd: Mapping, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in sd.items() if k.startswith(prefix)}


def _few(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _one(x: list):
    """An int when all entries are equal (diffusers' compact form), else the list."""
    return x[0] if all(v == x[0] for v in x) else list(x)


def _heads(width: int, head_dim: int = 64) -> int:
    """Heads of ``head_dim`` channels; 1 for widths below/not a multiple of it (scaled-down models)."""
    return width // head_dim if width >= head_dim and width % head_dim == 0 else 1


# =========================================================================== detection
def detect_family(sd: Mapping[str, Any], where: str = "checkpoint") -> str:
    """``"sd1"``, ``"sd2"``, ``"sdxl"`` or ``"sdxl-refiner"`` from the keys; CheckpointError
    (one line) for anything else."""
    keys = sd.keys()
    if UNET + "input_blocks.0.0.weight" not in sd:
        if any(k.startswith(("down_blocks.", "unet.down_blocks.", "encoder.down_blocks.", "text_model."))
               or k == "conv_in.weight" for k in keys):
            raise CheckpointError(f"{where} {_NOT_SD} (its keys are in the diffusers layout: load the diffusers "
                                  f"model folder instead)")
        raise CheckpointError(f"{where} {_NOT_SD} (no {UNET}* UNet weights)")
    if any(k.startswith(OPENCLIP_REFINER) for k in keys):
        name = REFINER
    elif any(k.startswith("conditioner.embedders.") for k in keys):
        if not (any(k.startswith(CLIP_XL) for k in keys) and any(k.startswith(OPENCLIP_XL) for k in keys)):
            raise CheckpointError(f"{where} {_NOT_SD} (an SDXL base file needs both text encoders, {CLIP_XL}* and "
                                  f"{OPENCLIP_XL}*)")
        name = "sdxl"
    else:
        family = families.detect_single_file(keys)
        if family is None:
            raise CheckpointError(f"{where} {_NOT_SD} (it has a UNet but no cond_stage_model.* text encoder)")
        name = family.name
    if VAE + "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{where} {_NOT_SD} (it has a UNet but no {VAE}* VAE)")
    return name


# =========================================================================== LDM -> diffusers
def _convert_unet(u: dict, family: str, where: str) -> tuple[dict, dict]:
    keys = list(u)
    conv_in = u["input_blocks.0.0.weight"]
    n_in = len(_indices(keys, "input_blocks."))
    n_out = len(_indices(keys, "output_blocks."))
    ops = [i for i in _indices(keys, "input_blocks.") if f"input_blocks.{i}.0.op.weight" in u]
    layers = ops[0] - 1 if ops else n_in - 1
    n_levels = len(ops) + 1
    if layers < 1 or n_in != 1 + n_levels * layers + (n_levels - 1) or n_out != n_levels * (layers + 1) \
            or ops != [(b + 1) * (layers + 1) for b in range(n_levels - 1)]:
        raise CheckpointError(f"{where}: unsupported UNet layout ({n_in} input and {n_out} output blocks, "
                              f"downsamplers at {ops}); {where} {_NOT_SD}")
    first = [1 + b * (layers + 1) for b in range(n_levels)]
    widths = [int(u[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in first]
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in u for i in first]
    up_attn = [f"output_blocks.{b * (layers + 1)}.1.proj_in.weight" in u for b in range(n_levels)]
    if "middle_block.1.proj_in.weight" not in u:
        raise CheckpointError(f"{where}: UNet without mid-block attention; {where} {_NOT_SD}")
    attn_prefixes = [f"input_blocks.{i}.1" for i, a in zip(first, down_attn) if a] + ["middle_block.1"]
    depth = [len(_indices(keys, f"input_blocks.{i}.1.transformer_blocks.")) if a else None
             for i, a in zip(first, down_attn)]
    mid_depth = len(_indices(keys, "middle_block.1.transformer_blocks."))
    real = [d for d in depth if d is not None] + [mid_depth]
    tl = real[0] if all(d == real[0] for d in real) else [d if d is not None else 1 for d in depth]
    ref = attn_prefixes[0]
    cross = int(u[f"{ref}.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    linear = u[f"{ref}.proj_in.weight"].ndim == 2
    # Heads are not in the weights: the family says (8 per level, or 64-channel heads).
    rule = _layout(family).unet_heads
    heads = [8] * n_levels if rule == "8" else [_heads(w) for w in widths]
    inpaint = int(conv_in.shape[1]) == 9
    config = {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": _DIFFUSERS_VERSION,
        "act_fn": "silu", "attention_head_dim": _one(heads), "block_out_channels": widths,
        "center_input_sample": False, "cross_attention_dim": cross,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": int(conv_in.shape[1]), "layers_per_block": layers, "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 32,
        "out_channels": int(u["out.2.weight"].shape[0]), "sample_size": 64,
        "transformer_layers_per_block": tl,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        # diffusers' configs: stabilityai/stable-diffusion-2-1 upcasts, 2-inpainting does not.
        "upcast_attention": family == "sd2" and not inpaint, "use_linear_projection": bool(linear),
    }
    if "label_emb.0.0.weight" in u:   # SDXL; addition_time_embed_dim is set by convert() (it needs the text width)
        config.update(addition_embed_type="text_time", sample_size=128,
                      projection_class_embeddings_input_dim=int(u["label_emb.0.0.weight"].shape[1]))
    elif family in _XL:
        raise CheckpointError(f"{where}: SDXL UNet without label_emb.* (text-time embedding); {where} {_NOT_SD}")
    table = _unet_table(n_levels, layers, down_attn, up_attn)
    out, bad = rename_all(u, table, UNET)
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} UNet keys not understood ({_few(bad)}); {where} {_NOT_SD}")
    return config, out


def unet_state_dict(sd: Mapping, family: str, where: str = "checkpoint") -> dict:
    """The diffusers-layout UNet state dict of the ``model.diffusion_model.*`` keys of ``sd`` (a
    UNet-only file in the original layout); other keys are ignored."""
    return _convert_unet(_strip(sd, UNET), family, where)[1]


def _convert_vae(v: dict, where: str) -> tuple[dict, dict]:
    keys = list(v)
    levels = _indices(keys, "encoder.down.")
    if not levels or levels != list(range(len(levels))) or _indices(keys, "decoder.up.") != levels:
        raise CheckpointError(f"{where}: unsupported VAE layout; {where} {_NOT_SD}")
    n = len(levels)
    layers = len(_indices(keys, "encoder.down.0.block."))
    widths = [int(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(n)]
    mid_attn = "encoder.mid.attn_1.q.weight" in v
    config = {
        "_class_name": "AutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION, "act_fn": "silu",
        "block_out_channels": widths, "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": True, "in_channels": int(v["encoder.conv_in.weight"].shape[1]),
        "latent_channels": int(v["decoder.conv_in.weight"].shape[1]), "latents_mean": None, "latents_std": None,
        "layers_per_block": layers, "mid_block_add_attention": mid_attn, "norm_num_groups": 32,
        "out_channels": int(v["decoder.conv_out.weight"].shape[0]), "sample_size": 512,
        "scaling_factor": 0.18215, "shift_factor": None, "up_block_types": ["UpDecoderBlock2D"] * n,
        "use_post_quant_conv": "post_quant_conv.weight" in v, "use_quant_conv": "quant_conv.weight" in v,
    }
    table = _vae_table(n, layers, mid_attn)
    out, bad = {}, []
    for k, a in v.items():
        hit = _rename(k, table, _SUBMAPS)
        if hit is None:
            bad.append(VAE + k)
            continue
        new, kind = hit
        if kind == "vae_attn" and new.endswith(".weight") and a.ndim > 2:   # 1x1 conv -> linear
            a = a.reshape(a.shape[:2])
        out[new] = a
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} VAE keys not understood ({_few(bad)}); {where} {_NOT_SD}")
    return config, out


def _text_config(hidden: int, inter: int, layers: int, vocab: int, positions: int, act: str, proj: int) -> dict:
    # As the text_encoder/config.json of the SD 1.5 / 2.1 repositories (bos/eos/pad as they carry them).
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 2, "hidden_act": act, "hidden_size": hidden, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": inter, "layer_norm_eps": 1e-5,
            "max_position_embeddings": positions, "model_type": "clip_text_model",
            "num_attention_heads": _heads(hidden), "num_hidden_layers": layers, "pad_token_id": 1,
            "projection_dim": proj, "vocab_size": vocab}


def _convert_clip(t: dict, where: str, prefix: str = CLIP) -> tuple[dict, dict, list]:
    out, ignored = {}, []
    for k, a in t.items():
        if k.endswith("position_ids"):
            ignored.append(prefix + k)
            continue
        out[k if k.startswith("text_model.") else "text_model." + k] = a
    emb = out.get("text_model.embeddings.token_embedding.weight")
    pos = out.get("text_model.embeddings.position_embedding.weight")
    fc1 = out.get("text_model.encoder.layers.0.mlp.fc1.weight")
    if emb is None or pos is None or fc1 is None:
        raise CheckpointError(f"{where}: incomplete CLIP text encoder under {prefix}; {where} {_NOT_SD}")
    layers = len(_indices(out, "text_model.encoder.layers."))
    hidden = int(emb.shape[1])
    cfg = _text_config(hidden, int(fc1.shape[0]), layers, int(emb.shape[0]), int(pos.shape[0]),
                       "quick_gelu", hidden)
    return cfg, out, ignored


_OC_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _convert_openclip(o: dict, where: str, prefix: str = OPENCLIP,
                      projection: bool = False) -> tuple[dict, dict, list]:
    """SD 2.x (``projection=False``): the last block and the projection dropped; SDXL
    (``projection=True``): every block, and ``text_projection`` as ``text_projection.weight``."""
    n = len(_indices(o, "transformer.resblocks."))
    if n < 2 or "positional_embedding" not in o or (projection and "text_projection" not in o):
        raise CheckpointError(f"{where}: incomplete OpenCLIP text encoder under {prefix}; {where} {_NOT_SD}")
    # SD 2 uses the penultimate layer: the last block is never run.  SDXL's pooled output runs it.
    keep = n if projection else n - 1
    emb = o["token_embedding.weight"]
    hidden = int(emb.shape[1])
    out, ignored, bad = {}, [], []
    p = "text_model."
    for k, a in o.items():
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", k) or \
            re.match(r"transformer\.resblocks\.(\d+)\.(attn)\.in_proj_(weight|bias)$", k)
        if k == "token_embedding.weight":
            out[p + "embeddings.token_embedding.weight"] = a
        elif k == "positional_embedding":
            out[p + "embeddings.position_embedding.weight"] = a
        elif k in ("ln_final.weight", "ln_final.bias"):
            out[p + "final_layer_norm." + k.split(".")[1]] = a
        elif k == "text_projection" and projection:   # x @ P  ->  Linear weight P.T
            out["text_projection.weight"] = a.T
        elif k in ("text_projection", "logit_scale", "attn_mask"):
            ignored.append(prefix + k)
        elif m and int(m.group(1)) >= keep:
            ignored.append(prefix + k)
        elif m and k.endswith(("in_proj_weight", "in_proj_bias")):
            base = f"{p}encoder.layers.{m.group(1)}.self_attn."
            for name, part in zip("qkv", np.split(a, 3, axis=0)):
                out[f"{base}{name}_proj.{m.group(3)}"] = part
        elif m and m.group(2) in _OC_LAYER:
            out[f"{p}encoder.layers.{m.group(1)}.{_OC_LAYER[m.group(2)]}.{m.group(3)}"] = a
        else:
            bad.append(prefix + k)
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} OpenCLIP keys not understood ({_few(bad)}); {where} {_NOT_SD}")
    inter = int(o["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    proj = int(o["text_projection"].shape[1]) if projection else hidden // 2
    cfg = _text_config(hidden, inter, keep, int(emb.shape[0]), int(o["positional_embedding"].shape[0]),
                       "gelu", proj)
    if projection:
        cfg["architectures"] = ["CLIPTextModelWithProjection"]
    return cfg, out, ignored


scheduler_config = families.sd_scheduler_config


def _global_step(sd: Mapping) -> int | None:
    g = sd.get("global_step")
    try:
        return int(np.asarray(g).reshape(-1)[0]) if g is not None else None
    except (ValueError, IndexError, TypeError):
        return None


def _load(path_or_state_dict) -> tuple[dict, str]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise CheckpointError(f"single-file checkpoint {path!r} not found")
        if not path.endswith(".safetensors"):
            raise CheckpointError(f"{path}: single-file checkpoints are read from .safetensors files only "
                                  f"(pickle .ckpt files can run code when loaded; re-save it as .safetensors)")
        return load_file(path), path
    sd = path_or_state_dict
    if not isinstance(sd, Mapping):
        raise TypeError(f"convert() takes a path or a state dict, not {type(sd).__name__}")
    if isinstance(sd.get("state_dict"), Mapping):
        sd = sd["state_dict"]
    return {k: _as_numpy(v) for k, v in sd.items()}, "checkpoint"


def convert(path_or_state_dict, *, prediction_type: str | None = None) -> SingleFile:
    """A single-file SD 1.x/2.x/XL checkpoint (path to a ``.safetensors`` or ``{key: array}``)
    -> diffusers-layout configs + state dicts (arrays are views of the input where possible).

    ``prediction_type``: ``"epsilon"`` or ``"v_prediction"``; None = diffusers' rule (module
    docstring; SDXL: ``"epsilon"``).
    Raises CheckpointError (one line) for a file that is not an SD 1.x/2.x/XL checkpoint.
    """
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or None, not {prediction_type!r}")
    sd, where = _load(path_or_state_dict)
    family = detect_family(sd, where)
    unet_cfg, unet_sd = _convert_unet(_strip(sd, UNET), family, where)
    vae_sd_in = {k: a for k, a in _strip(sd, VAE).items() if not k.startswith("loss.")}
    vae_cfg, vae_sd = _convert_vae(vae_sd_in, where)
    layout = _layout(family)
    configs, state_dicts, ignored = {}, {}, []
    for name, prefix in layout.prefixes.items():
        if name == "text_encoder_2":
            cfg, tsd, ign = _convert_openclip(_strip(sd, prefix), where, prefix, projection=True)
        elif name == "text_encoder":
            convert_text = {"clip": _convert_clip, "openclip": _convert_openclip}[layout.text_layout]
            cfg, tsd, ign = convert_text(_strip(sd, prefix), where, prefix)
        else:
            continue
        configs[name], state_dicts[name] = cfg, tsd
        ignored += ign
    text_width = sum(c["hidden_size"] for c in configs.values())
    if unet_cfg["cross_attention_dim"] != text_width:
        raise CheckpointError(f"{where}: the UNet cross-attends to {unet_cfg['cross_attention_dim']}-wide text "
                              f"features but the text encoder{'s are' if len(configs) > 1 else ' is'} {text_width} "
                              f"wide; {where} {_NOT_SD}")
    inpainting = unet_cfg["in_channels"] == 9
    if family in _XL:
        _xl_configs(unet_cfg, vae_cfg, configs["text_encoder_2"]["projection_dim"], family, where)
        prediction_type = prediction_type or "epsilon"
        sched = {**families.sdxl_scheduler_config(), "prediction_type": prediction_type}
    else:
        if prediction_type is None:   # diffusers' rule (single_file_utils._legacy_load_scheduler)
            if family == "sd2" and not inpainting:
                prediction_type = "epsilon" if _global_step(sd) == 875000 else "v_prediction"
            else:
                prediction_type = "epsilon"
        if prediction_type == "v_prediction":    # the 768 px models
            unet_cfg["sample_size"], vae_cfg["sample_size"] = 96, 768
        sched = scheduler_config(prediction_type)
    used = tuple(p for c, p in layout.prefixes.items() if c != "vae")
    ignored += [k for k in sd if not k.startswith(used) and not (k.startswith(VAE) and k[len(VAE):] in vae_sd_in)]
    return SingleFile(
        configs={**configs, "unet": unet_cfg, "vae": vae_cfg, "scheduler": sched},
        state_dicts={**state_dicts, "unet": unet_sd, "vae": vae_sd},
        family=family, inpainting=inpainting, prediction_type=prediction_type, ignored=sorted(ignored))


def _xl_configs(unet_cfg: dict, vae_cfg: dict, pooled: int, family: str, where: str) -> None:
    """SDXL's settings that are not in the weights (stabilityai's configs): 64-channel heads
    (already), the text-time embedding width, the VAE's scaling factor and 1024 px."""
    n_ids = _TIME_IDS[family]
    rest = unet_cfg["projection_class_embeddings_input_dim"] - pooled
    if rest <= 0 or rest % n_ids:
        raise CheckpointError(f"{where}: label_emb takes {unet_cfg['projection_class_embeddings_input_dim']} features, "
                              f"not the {pooled}-wide pooled text embedding + {n_ids} time-id embeddings; "
                              f"{where} {_NOT_SD}")
    unet_cfg.update(addition_time_embed_dim=rest // n_ids, upcast_attention=False)
    vae_cfg.update(scaling_factor=_XL_VAE_SCALING, sample_size=1024)


# =========================================================================== diffusers -> LDM
def _unet_structure(cfg: dict) -> tuple:
    n = len(cfg["block_out_channels"])
    layers = cfg.get("layers_per_block", 2)
    if isinstance(layers, (list, tuple)):
        if any(x != layers[0] for x in layers):
            raise ValueError("to_single_file: per-block layers_per_block has no single-file layout")
        layers = layers[0]
    down = cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"])
    up = cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1))
    return n, layers, ["CrossAttn" in t for t in down], ["CrossAttn" in t for t in up]


def _export(sd: Mapping, table: dict, what: str, fix=None) -> dict:
    inv = _invert(table)
    out, bad = {}, []
    for k, a in sd.items():
        hit = _rename(k, inv, _INV_SUBMAPS)
        if hit is None:
            bad.append(k)
            continue
        new, kind = hit
        a = _as_numpy(a)
        out[new] = fix(new, kind, a) if fix else a
    if bad:
        raise ValueError(f"to_single_file: {len(bad)} {what} keys have no single-file name ({_few(bad)})")
    return out


def _vae_fix(new: str, kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "vae_attn" and new.endswith(".weight") and a.ndim == 2:   # linear -> 1x1 conv
        return a.reshape(a.shape + (1, 1))
    return a


def _text_keys(sd: Mapping) -> dict:
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): _as_numpy(a)
            for k, a in sd.items() if not k.endswith("position_ids")}


def _export_openclip(t: dict, cfg: dict, prefix: str = OPENCLIP, projection: bool = False) -> dict:
    """SD 2.x (``projection=False``: a zero block and an identity projection added, see below)
    or SDXL (``projection=True``: every block, ``text_projection`` = the Linear weight transposed)."""
    out = {}
    p = "text_model."
    n = cfg.get("num_hidden_layers", len(_indices(t, p + "encoder.layers.")))
    hidden = cfg.get("hidden_size", int(t[p + "embeddings.token_embedding.weight"].shape[1]))
    inv = {v: k for k, v in _OC_LAYER.items()}
    for k, a in t.items():
        m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
        if k == p + "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = a
        elif k == p + "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = a
        elif k.startswith(p + "final_layer_norm."):
            out[prefix + "ln_final." + k.rsplit(".", 1)[1]] = a
        elif m and m.group(2) in inv:
            out[f"{prefix}transformer.resblocks.{m.group(1)}.{inv[m.group(2)]}.{m.group(3)}"] = a
        elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            continue   # joined below
        elif k == "text_projection.weight":
            if projection:
                out[prefix + "text_projection"] = np.ascontiguousarray(a.T)
        else:
            raise ValueError(f"to_single_file: text encoder key {k!r} has no OpenCLIP name")
    for i in range(n):
        for leaf in ("weight", "bias"):
            qkv = [t[f"{p}encoder.layers.{i}.self_attn.{x}_proj.{leaf}"] for x in "qkv"]
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(qkv, axis=0)
    dt = t[p + "embeddings.token_embedding.weight"].dtype
    if projection:
        if prefix + "text_projection" not in out:
            raise ValueError("to_single_file: the SDXL text_encoder_2 has no text_projection.weight")
        out[prefix + "logit_scale"] = np.asarray(np.log(1 / 0.07), dtype=dt)
        return out
    # The block SD 2 never runs (OpenCLIP's last), zero-filled, so the file has the real layout
    # (24 blocks for SD 2's 23-layer encoder) and convert() drops it again; the projection too.
    ref = f"{prefix}transformer.resblocks.{n - 1}."
    for k in [k for k in out if k.startswith(ref)]:
        name = f"{prefix}transformer.resblocks.{n}." + k[len(ref):]
        out[name] = (np.ones if k.endswith(("ln_1.weight", "ln_2.weight")) else np.zeros)(out[k].shape, out[k].dtype)
    out[prefix + "text_projection"] = np.eye(hidden, dtype=dt)
    out[prefix + "logit_scale"] = np.asarray(np.log(1 / 0.07), dtype=dt)
    return out


def to_single_file(configs: Mapping[str, dict], state_dicts: Mapping[str, Mapping], *,
                   family: str | None = None) -> dict[str, np.ndarray]:
    """diffusers-layout configs + state dicts -> one original-layout (CompVis / A1111) state dict.

    ``family``: ``"sd1"`` (transformers CLIP text encoder), ``"sd2"`` (OpenCLIP), ``"sdxl"``
    (SGM layout: both encoders) or ``"sdxl-refiner"`` (``text_encoder_2`` only); None = SDXL
    when there is a ``text_encoder_2`` (the refiner when it is the only one), else from the
    text config's ``hidden_act`` (``gelu``: OpenCLIP, SD 2.x).  Text-encoder keys may have the
    ``text_model.`` prefix or not (transformers >= 5.6 drops it).
    """
    te_cfg = dict(configs.get("text_encoder") or {})
    if family is None and "text_encoder_2" in state_dicts:
        family = "sdxl" if "text_encoder" in state_dicts else REFINER
    elif family is None:
        family = families.detect({"text_encoder": te_cfg}).name
    layout = _layout(family)
    out: dict[str, np.ndarray] = {}
    u = _export(state_dicts["unet"], _unet_table(*_unet_structure(configs["unet"])), "UNet")
    out.update({UNET + k: a for k, a in u.items()})
    vcfg = configs["vae"]
    vae_sd = {}
    for k, a in state_dicts["vae"].items():   # accept diffusers' pre-0.14 attention names too
        parts = k.split(".")
        if len(parts) > 1 and parts[-2] in _VAE_ATTN_OLD and "attentions" in parts:
            k = ".".join(parts[:-2] + [_VAE_ATTN[_VAE_ATTN_OLD[parts[-2]]], parts[-1]])
        vae_sd[k] = a
    has_attn = any(".mid_block.attentions." in k for k in vae_sd)
    table = _vae_table(len(vcfg["block_out_channels"]), vcfg.get("layers_per_block", 1), has_attn)
    out.update({VAE + k: a for k, a in _export(vae_sd, table, "VAE", _vae_fix).items()})
    for name, prefix in layout.prefixes.items():
        if name not in ("text_encoder", "text_encoder_2"):
            continue
        if name not in state_dicts:
            raise ValueError(f"to_single_file: a {family} model needs its {name} weights")
        t = _text_keys(state_dicts[name])
        if name == "text_encoder_2":
            out.update(_export_openclip(t, dict(configs.get(name) or {}), prefix, projection=True))
        elif layout.text_layout == "openclip":
            out.update(_export_openclip(t, te_cfg))
        else:
            out.update({prefix + k: a for k, a in t.items() if not k.startswith("text_projection")})
    return out


def _layout(family: str) -> families.SingleFileLayout:
    if family == REFINER:    # whatever a registered refiner family inherits from SDXL's entry
        return REFINER_LAYOUT
    layout = families.get(family).single_file if family in families.FAMILIES else None
    if layout is None:
        names = [f.name for f in families.FAMILIES.values() if f.single_file is not None] + [REFINER]
        raise ValueError(f"family must be one of {', '.join(map(repr, names))}, not {family!r}")
    return layout


# =========================================================================== tokenizer
def tokenizer_for(family: str):
    """The SD tokenizer (transformers ``CLIPTokenizer``) of a family with single files (``"sd1"``,
    ``"sd2"``, ``"sdxl"``: its first), built from the bundled BPE merges and cached
    (:func:`sd_jax.tokenizer.clip_tokenizer`)."""
    return next(iter(tokenizers_for(family).values()))


def tokenizers_for(family: str) -> dict:
    """``{folder name: tokenizer}`` of a family with single files (SDXL: ``tokenizer`` and
    ``tokenizer_2``, which pads with ``!``), as :func:`tokenizer_for` builds them."""
    _layout(family)
    return {spec.name: tokenizer_lib.clip_tokenizer(spec.pad_token, spec.cache_name)
            for spec in families.get(family).tokenizers}


# =========================================================================== pipeline (old API)
def load_pipeline(cls, path, *, dtype, param_dtype, attention, mesh, prediction_type=None):
    """``cls`` (a pipeline class) built from a single-file checkpoint.  Kept for callers of the
    old API; :func:`sd_jax.weights.loader.load` is the loader."""
    sf = convert(path, prediction_type=prediction_type)
    configs = {k: sf.configs[k] for k in ("text_encoder", "unet", "vae")}
    return checkpoint.pipeline_from_state_dicts(cls, configs, sf.state_dicts, tokenizer_for(sf.family),
                                                sf.configs["scheduler"], dtype=dtype, param_dtype=param_dtype,
                                                attention=attention, mesh=mesh, source=path)
