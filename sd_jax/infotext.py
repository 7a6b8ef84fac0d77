"""Reading AUTOMATIC1111 ``parameters`` text (the "infotext" A1111, sd-jax and other tools write
into PNGs) back into generation settings: ``/sdapi/v1/png-info`` and ``sd-jax generate --from-png``.

Written by :func:`sd_jax.images.a1111_parameters`::

    a lighthouse
    Negative prompt: blurry
    Steps: 20, Sampler: Euler, CFG scale: 5.0, Seed: 3, Size: 1024x1024, Model: sdxl-base,
    Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: sd-jax
"""
from __future__ import annotations

import functools
import hashlib
import json
import os

from sd_jax.images import A1111_SAMPLERS

_TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def parse_parameters(text: str) -> dict:
    """An A1111 ``parameters`` string -> {"Prompt", "Negative prompt", "Steps", ...} (values as text)."""
    lines = text.strip().split("\n")
    out: dict = {}
    last = lines[-1] if lines and ": " in lines[-1] and "Steps:" in lines[-1] else ""
    body = lines[:-1] if last else lines
    neg = [i for i, line in enumerate(body) if line.startswith("Negative prompt:")]
    if neg:
        out["Prompt"] = "\n".join(body[:neg[0]])
        out["Negative prompt"] = "\n".join(body[neg[0]:]).removeprefix("Negative prompt:").strip()
    else:
        out["Prompt"] = "\n".join(body)
    for part in _split_fields(last):
        if ": " in part:
            k, v = part.split(": ", 1)
            out[k.strip()] = json.loads(v) if v.startswith('"') else v
    return out


def _split_fields(line: str) -> list[str]:
    """``a: 1, b: "x, y"`` -> ["a: 1", 'b: "x, y"'] (commas inside quotes kept)."""
    parts, cur, quoted = [], "", False
    for i, c in enumerate(line):
        if c == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        if c == "," and not quoted:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += c
    return parts + ([cur.strip()] if cur.strip() else [])


def checkpoint_title(path: str | None) -> str | None:
    """A model as A1111 names it in ``Model``/``Refiner`` fields: ``NAME [HASH]`` for a single
    file (HASH: the first 10 hex digits of the file's sha256, A1111's ``shorthash``, by which
    A1111 finds the checkpoint), ``NAME`` for a folder (A1111 has no hash for those).  Hashed
    once per process and file version."""
    if not path:
        return None
    st = os.stat(path) if os.path.isfile(path) else None
    return _title(os.path.abspath(path), st and (st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _title(path: str, stamp) -> str:
    name = os.path.basename(os.path.normpath(path)).removesuffix(".safetensors")
    if not os.path.isfile(path):
        return name
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{name} [{h.hexdigest()[:10]}]"


def split_title(title: str) -> tuple[str, str | None]:
    """``"NAME [HASH]"`` -> (NAME, HASH); ``"NAME"`` -> (NAME, None)."""
    title = title.strip()
    if title.endswith("]") and " [" in title:
        name, _, h = title[:-1].rpartition(" [")
        return name, h
    return title, None


def generate_settings(fields: dict) -> tuple[dict, list[str]]:
    """Parsed A1111 fields (:func:`parse_parameters`) -> (``sd-jax generate`` option values by
    their argparse names, warnings).  What sd-jax cannot use is left out with a warning (a
    sampler it does not have); ``refiner`` is the A1111 title (NAME [HASH]): a model's path
    is the user's to give."""
    out: dict = {}
    warnings: list[str] = []

    def number(key, kind):
        v = fields.get(key)
        if v is None:
            return None
        try:
            return kind(v)
        except (TypeError, ValueError):
            warnings.append(f"{key}: {v!r} is not a number; ignored")
            return None

    if "Prompt" in fields:
        out["prompt"] = fields["Prompt"]
    out["negative"] = fields.get("Negative prompt", "")
    for key, dest, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
                            ("CFG Rescale", "rescale", float), ("Denoising strength", "strength", float),
                            ("Refiner switch at", "refiner_switch", float),
                            ("Guidance start", "guidance_start", float), ("Guidance end", "guidance_end", float)):
        v = number(key, kind)
        if v is not None:
            out[dest] = v
    skip = number("Clip skip", int)
    if skip is not None:
        out["clip_skip"] = skip - 1 if skip > 1 else None  # A1111 counts the last layer used
    if "Size" in fields:
        try:
            w, h = (int(x) for x in str(fields["Size"]).lower().split("x"))
            out["size"] = (w, h)
        except ValueError:
            warnings.append(f"Size: {fields['Size']!r} is not WxH; ignored")
    sampler = fields.get("Sampler")
    if sampler:
        names = {v: k for k, v in A1111_SAMPLERS.items()}
        karras = sampler.endswith(" Karras") or str(fields.get("Schedule type", "")).lower() == "karras"
        base = names.get(sampler.removesuffix(" Karras"))
        if base is None:
            warnings.append(f"Sampler: sd-jax has no {sampler!r}; the model's own is used (--scheduler to choose)")
        else:
            out["scheduler"] = base + ("_karras" if karras else "")
    spacing = str(fields.get("Timestep spacing", "")).lower()
    if spacing in _TIMESTEP_SPACINGS:
        out["timestep_spacing"] = spacing
    if fields.get("Refiner"):
        out["refiner_title"] = fields["Refiner"]
    if fields.get("Model"):
        out["model_title"] = fields["Model"]
    return out, warnings


def read_png_parameters(path: str) -> str:
    """The ``parameters`` text of a PNG (A1111's infotext); a ValueError (one line) if it has none."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("parameters")
    except (OSError, ValueError) as e:
        raise ValueError(f"--from-png {path!r} is not a readable image ({e})") from None
    if not text:
        raise ValueError(f"--from-png {path!r} has no A1111 'parameters' text (not made by sd-jax or A1111?)")
    return text
