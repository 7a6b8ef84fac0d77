"""Reading a LoRA file and matching it to a model: every check before anything is merged.

:func:`read` gives a :class:`Lora` (its layers matched to the model's parameter paths, the
factors still on the host) or raises :class:`LoraError` with one line saying what is
wrong: a pickle file, a truncated or non-safetensors file, a LoRA made for another base
model, keys that match no layer (unless ``allow_partial``), a layer of the wrong shape.
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np

from sd_jax.lora import formats, merge
from sd_jax.lora.targets import TargetTable
from sd_jax.weights.safetensors_io import CheckpointError, load_file

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
BASES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # by cross-attention width


class LoraError(ValueError):
    """A LoRA that cannot be used with this model; the message (one line) says why."""


@dataclasses.dataclass
class Match:
    """One adapted layer: ``record`` (as in the file) -> ``component`` / ``path`` (sd-jax's)."""
    record: formats.LayerRecord
    component: str
    path: tuple


@dataclasses.dataclass
class Lora:
    """A LoRA file matched to a model.  ``matches``: the layers it adapts;  ``unmatched``: the
    file's keys that adapt no layer of the model (loaded only with ``allow_partial``)."""
    name: str
    path: str
    matches: list
    unmatched: list

    @property
    def formats(self) -> list[str]:
        return sorted({m.record.format for m in self.matches})

    def describe(self) -> list[str]:
        """One line per file layer: its name -> the sd-jax parameter it changes (``info --lora``)."""
        lines = [f"{self.name}: {len(self.matches)} layers matched ({', '.join(self.formats) or 'none'}), "
                 f"{len(self.unmatched)} keys unmatched"]
        for m in sorted(self.matches, key=lambda m: (m.component, m.path)):
            r = m.record
            extra = " +DoRA" if merge._dora_key(r.factors) else ""
            lines.append(f"  {r.name} -> {m.component}/{'/'.join(m.path)}/kernel "
                         f"({r.kind}{extra}, rank {r.rank}, scale {r.scale:g})")
        lines += [f"  {k} -> (no layer)" for k in self.unmatched]
        return lines


def _few(xs, n=3) -> str:
    xs = list(xs)
    return ", ".join(xs[:n]) + (f" ... (+{len(xs) - n} more)" if len(xs) > n else "")


def read_metadata(path: str) -> dict:
    """The ``__metadata__`` of a safetensors file (``{}`` if none)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__") or {}


def read_file(path: str) -> tuple[dict, dict]:
    """``(state dict, metadata)`` of a LoRA file; a :class:`LoraError` for anything but an intact
    ``.safetensors``."""
    if not os.path.isfile(path):
        raise LoraError(f"LoRA {path!r} not found" + (" (it is a folder)" if os.path.isdir(path) else ""))
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraError(f"LoRA {path} is a pickle file, which can run code when loaded; sd-jax reads LoRAs "
                        f"only as .safetensors (re-save it as safetensors)")
    try:
        sd = load_file(path)
        meta = read_metadata(path)
    except CheckpointError as e:
        raise LoraError(f"LoRA {e}") from None
    if not sd:
        raise LoraError(f"LoRA {path} holds no tensors")
    return sd, meta


def _guess_base(records) -> tuple[str | None, int | None]:
    """(base model, cross-attention width) a LoRA was made for, from its attn2 to_k (or None)."""
    for r in records:
        name = r.module.replace(".", "_")
        if r.kind == "lora" and "attn2" in name and name.endswith(("to_k", "to_k_lora")):
            width = int(r.factors["down"].reshape(r.factors["down"].shape[0], -1).shape[1])
            return BASES.get(width, f"a model with cross-attention width {width}"), width
    return None, None


def match(name: str, path: str, state_dict: dict, metadata: dict, shapes: dict, *, model: str,
          cross_attention_dim: int | None = None, allow_partial: bool = False) -> Lora:
    """Match a LoRA state dict to a model whose parameters (or their shapes) are ``shapes``.

    model: the model's description, for messages (``"Stable Diffusion 1.x (...)"``)."""
    records, unknown = formats.parse(state_dict, metadata)
    table = TargetTable(shapes)
    other = sorted({r.component for r in records if r.component and r.component not in table.names})
    if other:
        base = "an SDXL LoRA" if "text_encoder_2" in other else "a LoRA for another model"
        raise LoraError(f"LoRA {path} is {base} (it adapts {', '.join(other)}); the model is {model}, which has "
                        f"no {other[0]}: use a LoRA made for this model")
    matches, unmatched, misshaped = [], list(unknown), []
    for r in records:
        hit = table.lookup(r.component, r.module, r.dotted)
        if hit is None:
            unmatched.extend(r.keys)
            continue
        comp, p = hit
        want = merge.torch_shape(table.kernels[comp][p].shape)
        try:
            rows, size = merge.delta_size(r.kind, r.factors)
            ok = rows == want[0] and size == int(np.prod(want))
        except (KeyError, IndexError):
            ok = False
        if not ok:
            misshaped.append(f"{r.name} (model layer {'/'.join(p)} is {want})")
            continue
        matches.append(Match(r, comp, p))
    if misshaped:
        base, width = _guess_base(records)
        if base is not None and cross_attention_dim and width != cross_attention_dim:
            raise LoraError(f"LoRA {path} is for {base} (cross-attention width {width}); the model is {model} "
                            f"(width {cross_attention_dim}): use a LoRA made for this model")
        raise LoraError(f"LoRA {path}: {len(misshaped)} layers have the wrong shape for this model ({model}): "
                        f"{_few(misshaped)}")
    if not matches:
        raise LoraError(f"LoRA {path}: none of its {len(state_dict)} keys matches a layer of the model ({model}), "
                        f"e.g. {_few(unmatched)}; is it a LoRA for Stable Diffusion?")
    if unmatched and not allow_partial:
        raise LoraError(f"LoRA {path}: {len(unmatched)} of {len(state_dict)} keys match no layer of the model: "
                        f"{_few(unmatched)}; pass allow_partial=True (--lora-partial) to load the rest")
    return Lora(name, path, matches, unmatched)


def read(path: str, shapes: dict, *, model: str, cross_attention_dim: int | None = None,
         allow_partial: bool = False, name: str | None = None) -> Lora:
    """:func:`read_file` then :func:`match`; ``name`` defaults to the file name without suffix."""
    sd, meta = read_file(path)
    name = name or os.path.splitext(os.path.basename(path))[0]
    return match(name, path, sd, meta, shapes, model=model, cross_attention_dim=cross_attention_dim,
                 allow_partial=allow_partial)


def resolve(name_or_path: str, lora_dir: str | None = None) -> str:
    """The file of a LoRA given by path, or by name (file name without ``.safetensors``, as in
    A1111's ``<lora:name:1>``) in ``lora_dir`` and its sub-folders."""
    if os.path.isfile(name_or_path):
        return name_or_path
    if lora_dir is None:
        raise LoraError(f"LoRA {name_or_path!r} not found; give a .safetensors file, or a name with a LoRA "
                        f"folder (--lora-dir / lora_dir=)")
    if not os.path.isdir(lora_dir):
        raise LoraError(f"LoRA folder {lora_dir!r} not found")
    found = {}
    for root, _, files in os.walk(lora_dir):
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if ext.lower() in (".safetensors",) + PICKLE_SUFFIXES:
                found.setdefault(stem, os.path.join(root, f))
                found.setdefault(f, os.path.join(root, f))
    if name_or_path in found:
        return found[name_or_path]
    names = sorted({os.path.splitext(os.path.basename(p))[0] for p in found.values()})
    have = f"it has: {_few(names, 8)}" if names else "it holds no .safetensors files"
    raise LoraError(f"no LoRA named {name_or_path!r} in {lora_dir} ({have})")


def parse_spec(spec: str) -> tuple[str, float]:
    """``FILE[:WEIGHT]`` -> (FILE, WEIGHT) (weight 1 when not given)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0
