"""``<lora:name:weight>`` tags of A1111 prompts, applied to a pipeline; A1111's LoRA hashes.

As A1111, the tags of the positive prompt choose the LoRAs (looked up by name in a LoRA
folder); tags in a negative prompt are removed from its text and not applied.  The tags
are added to the LoRAs loaded explicitly (``pipe.load_lora`` / ``--lora``); a tag naming
the same file sets its weight.  Generation takes the parameters as an argument, so
switching between prompts' LoRAs never recompiles.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct

from sd_jax.lora.loading import LoraError, resolve
from sd_jax.prompts.parser import extract_loras


def prompt_loras(prompt: str, syntax: str = "a1111") -> list[tuple[str, float]]:
    """The ``(name, weight)`` tags of one prompt (none in ``"plain"`` syntax); a name given twice
    keeps its last weight."""
    if syntax == "plain" or not prompt:
        return []
    return list(dict(extract_loras(prompt)[1]).items())


def call_loras(prompts, syntax: str = "a1111") -> list[tuple[str, float]]:
    """The tags of the prompts of one call, which must all name the same LoRAs and weights."""
    sets = {}
    for p in prompts:
        sets.setdefault(frozenset(prompt_loras(p, syntax)), p)
    if len(sets) > 1:
        shown = " / ".join(", ".join(f"{n}:{w:g}" for n, w in sorted(s)) or "none" for s in sets)
        raise LoraError(f"the prompts of one call name different LoRAs ({shown}); generate them in separate "
                        f"calls (sd-jax batch groups its rows by LoRAs)")
    return prompt_loras(next(iter(sets.values())), syntax) if sets else []


def resolve_tags(tags, lora_dir: str | None, flag: str = "lora_dir=") -> list[tuple[str, float]]:
    """Tags as ``(file, weight)``, each found in ``lora_dir`` (one-line LoraError otherwise)."""
    if tags and lora_dir is None:
        name, w = tags[0]
        raise LoraError(f"the prompt's <lora:{name}:{w:g}> needs a LoRA folder to look {name!r} up in: "
                        f"pass {flag} FOLDER")
    return [(resolve(name, lora_dir), w) for name, w in tags]


@contextlib.contextmanager
def applied(pipe, tags, lora_dir: str | None):
    """The pipeline's loaded LoRAs plus ``tags`` while the block runs; then as before."""
    if not tags:
        yield
        return
    before = [(lora.path, w) for lora, _, w in pipe.loras.loras.values()]
    pipe.use_loras(before + resolve_tags(tags, lora_dir))
    try:
        yield
    finally:
        pipe.use_loras(before)


def lora_hash(path: str) -> str:
    """A1111's short hash of a LoRA file: the first 12 hex digits of the sha256 of a
    ``.safetensors`` file's tensor data (after its header: kohya's / A1111's "addnet" hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.lower().endswith(".safetensors"):
            (n,) = struct.unpack("<Q", f.read(8))
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def loaded_hashes(pipe) -> dict[str, str]:
    """A1111's short hash of each LoRA merged into ``pipe``, by name (PNG metadata)."""
    return {name: _cached_hash(lora.path, *_stamp(lora.path)) for name, (lora, _, _) in pipe.loras.loras.items()}


def _stamp(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _cached_hash(path: str, size: int, mtime_ns: int) -> str:
    return lora_hash(path)


def file_record(path: str, weight: float | None = None) -> dict:
    """A LoRA as a batch job records it: the file, its short hash and size (and the weight)."""
    rec = {"file": os.path.abspath(path), "hash": _cached_hash(path, *_stamp(path)), "size": os.path.getsize(path)}
    return rec if weight is None else {**rec, "weight": float(weight)}


def group_rows(rows, syntax: str = "a1111") -> list[tuple[list, list]]:
    """``rows`` (with a ``.prompt``) in groups of the same LoRA tags, in order of first appearance:
    ``[(tags, rows), ...]``."""
    groups: dict[frozenset, tuple[list, list]] = {}
    for r in rows:
        tags = prompt_loras(r.prompt, syntax)
        groups.setdefault(frozenset(tags), (tags, []))[1].append(r)
    return list(groups.values())
