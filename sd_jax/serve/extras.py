"""What ``sd-jax serve`` lists of the extra networks it has: ``/sdapi/v1/loras`` (the LoRA files
of ``--lora-dir``) and ``/sdapi/v1/embeddings`` (the textual-inversion embeddings loaded from
``--embeddings-dir``), in the AUTOMATIC1111 API's shapes; and the ``<lora:name:w>`` tags of a
prompt, which the server reports as not applied (it does not switch LoRAs per request)."""
from __future__ import annotations

import json
import os
import struct

from sd_jax.lora.loading import PICKLE_SUFFIXES
from sd_jax.prompts import extract_loras
from sd_jax.prompts import embeddings as emb

LORA_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


def safetensors_metadata(path: str) -> dict:
    """The ``__metadata__`` of a ``.safetensors`` header ({} when there is none or the file is
    not readable); values that are JSON objects or lists are decoded, as A1111 does."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(os.path.getsize(path), 100_000_000):
                return {}
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}
    out = {}
    for k, v in meta.items():
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except ValueError:
                pass
        out[k] = v
    return out


def list_loras(lora_dir: str | None) -> list[dict]:
    """``/sdapi/v1/loras``: every LoRA file in ``lora_dir`` and its sub-folders, as A1111 lists
    them: ``name`` (the file name without suffix, as ``<lora:name:w>`` writes it), ``alias``
    (the training's ``ss_output_name``, else the name), ``path`` and ``metadata``."""
    if not lora_dir or not os.path.isdir(lora_dir):
        return []
    out = []
    for root, dirs, files in os.walk(lora_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            stem, ext = os.path.splitext(f)
            if f.startswith(".") or ext.lower() not in LORA_SUFFIXES:
                continue
            path = os.path.join(root, f)
            meta = safetensors_metadata(path) if ext.lower() == ".safetensors" else {}
            alias = meta.get("ss_output_name") if isinstance(meta.get("ss_output_name"), str) else None
            out.append({"name": stem, "alias": alias or stem, "path": path, "metadata": meta})
    return out


def list_embeddings(pipe, embeddings_dir: str | None, allow_pickle: bool = False) -> dict:
    """``/sdapi/v1/embeddings``: ``{"loaded": {name: {...}}, "skipped": {name: {...}}}`` as
    A1111: ``shape`` is the vector width, ``vectors`` the count; ``step`` (training steps) and
    the checkpoint are not recorded in the files sd-jax reads, so None.  Loaded: the model's
    embeddings; skipped: files in ``embeddings_dir`` whose embeddings are not loaded."""
    files = {}
    if embeddings_dir and os.path.isdir(embeddings_dir):
        for path in emb.find_embeddings(embeddings_dir):
            try:
                for e in emb.read_embedding(path, allow_pickle=allow_pickle):
                    files.setdefault(e.name, e)
            except ValueError:  # a pickle without --allow-pickle, an unreadable file
                files.setdefault(os.path.splitext(os.path.basename(path))[0], None)

    def entry(name, count=None):
        e = files.get(name)
        vectors = e.vectors.get(None, e.vectors.get("clip_l")) if e is not None else None
        return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                "shape": None if vectors is None else int(vectors.shape[1]),
                "vectors": count if count is not None else (None if vectors is None else int(vectors.shape[0]))}
    loaded = dict(getattr(pipe, "embeddings", {}) or {})
    return {"loaded": {name: entry(name, n) for name, n in sorted(loaded.items())},
            "skipped": {name: entry(name) for name in sorted(files) if name not in loaded}}


def lora_tags(*prompts: str) -> list[str]:
    """The ``<lora:name:w>`` tags of the prompts, each as an ``unsupported`` entry: the server
    serves the model as loaded and does not merge LoRAs per request (the tags are removed from
    the text the model reads, as A1111 does)."""
    return [f"<lora:{name}:{w:g}>: LoRA tags are not applied by this server, ignored"
            for p in prompts if isinstance(p, str) for name, w in extract_loras(p)[1]]
