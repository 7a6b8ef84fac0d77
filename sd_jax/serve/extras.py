"""What ``sd-jax serve`` lists of the extra networks it has: ``/sdapi/v1/loras`` (the LoRA files
of ``--lora-dir``) and ``/sdapi/v1/embeddings`` (the textual-inversion embeddings loaded from
``--embeddings-dir``), in the AUTOMATIC1111 API's shapes; the ``<lora:name:w>`` tags of a
request's prompt, checked against ``--lora-dir`` (the batch worker merges them); ControlNet units."""
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


def negative_lora_tags(negative) -> list[str]:
    """The ``<lora:name:w>`` tags of a negative prompt, each as an ``unsupported`` entry: as
    A1111, they are removed from its text and not applied."""
    if not isinstance(negative, str):
        return []
    return [f"<lora:{name}:{w:g}> in negative_prompt: LoRA tags apply from the prompt only, ignored"
            for name, w in extract_loras(negative)[1]]


def prompt_loras(prompt: str, lora_dir: str | None, syntax: str = "a1111") -> dict:
    """The LoRAs a prompt's ``<lora:name:w>`` tags name, checked against ``lora_dir`` before
    anything is queued (a one-line LoraError naming the folder otherwise), as the metadata of
    ``sd-jax generate``'s PNGs: ``{"loras": {name: weight}, "lora_hashes": {name: hash}}``
    (``{}`` without tags).  The batch worker merges them (:meth:`BatchWorker._use_loras`)."""
    from sd_jax.lora.loading import LoraError
    from sd_jax.lora.prompts import file_record, prompt_loras as tags_of, resolve_tags
    tags = tags_of(prompt, syntax)
    if tags and not lora_dir:
        name, w = tags[0]
        raise LoraError(f"the prompt's <lora:{name}:{w:g}>: this server has no LoRA folder "
                        f"(start it with --lora-dir FOLDER)")
    files = resolve_tags(tags, lora_dir, "--lora-dir")
    names = [os.path.splitext(os.path.basename(f))[0] for f, _ in files]
    if not files:
        return {}
    return {"loras": {n: w for n, (_, w) in zip(names, files)},
            "lora_hashes": {n: file_record(f)["hash"] for n, (f, _) in zip(names, files)}}


# ----------------------------------------------------------------------------- ControlNet
def list_controlnets(folder: str | None) -> list[str]:
    """The ControlNets of ``--controlnet-dir``: diffusers ``ControlNetModel`` folders
    (``config.json``) and original-layout ``.safetensors`` files, as paths, sorted."""
    if not folder or not os.path.isdir(folder):
        return []
    out = []
    for e in sorted(os.listdir(folder)):
        path = os.path.join(folder, e)
        if e.startswith("."):
            continue
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")) or \
                e.endswith(".safetensors") and os.path.isfile(path):
            out.append(path)
    return out


def load_controlnets(pipe, folder: str | None) -> list[str]:
    """Load every ControlNet of ``folder`` into ``pipe`` (named by its folder or file name, as
    requests name them); a ValueError naming the one that does not fit the model."""
    names = []
    for path in list_controlnets(folder):
        try:
            names.append(pipe.load_controlnet(path))
        except ValueError as e:
            raise ValueError(f"--controlnet-dir: {path}: {' '.join(str(e).split())}") from None
    return names


# The sd-webui-controlnet extension's unit fields: used, or accepted whatever their value (they
# concern its UI or resizing the control image, which is resized to the output size here).
CONTROLNET_USED = {"image", "input_image", "module", "model", "weight", "guidance_start", "guidance_end",
                   "threshold_a", "threshold_b", "enabled"}
CONTROLNET_IGNORED = {"resize_mode", "processor_res", "pixel_perfect", "lowvram", "save_detected_map", "hr_option",
                      "input_mode", "batch_images", "is_ui", "loopback"}
CONTROLNET_DEFAULTS = {"control_mode": (0, "Balanced", None), "guessmode": (False, None), "mask": (None, ""),
                       "low_vram": (False, None)}
MODULES = ("none", "canny")


def control_units(scripts, pipe, decode, unsupported: list) -> list[dict]:
    """A1111's ``alwayson_scripts`` -> ``[{controlnet, image, kind, scale, start, end}]`` (the
    ``controlnet`` script's enabled units); other scripts and fields sd-jax does not act on are
    appended to ``unsupported``.  ``decode(text, what)``: base64 -> PIL image (size-checked).
    Model names must be ControlNets the server loaded (from ``--controlnet-dir``); A1111's
    ``"name [hash]"`` titles are accepted."""
    from sd_jax.control import CANNY_THRESHOLDS, canny
    from sd_jax.request import RequestError
    if scripts in (None, {}):
        return []
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts must be a JSON object")
    for name in scripts:
        if name.lower() != "controlnet":
            unsupported.append(f"alwayson_scripts.{name}: script not available in sd-jax, ignored")
    script = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if script is None:
        return []
    units = script.get("args") if isinstance(script, dict) else script
    if not isinstance(units, list):
        raise RequestError("alwayson_scripts.controlnet.args must be a list of ControlNet units")
    loaded = [n for n, _ in pipe.controlnets]
    out = []
    for i, unit in enumerate(units):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(unit, dict):
            raise RequestError(f"{where} must be a JSON object")
        if unit.get("enabled", True) is False:
            continue
        unsupported += ignored_fields(unit, CONTROLNET_USED | CONTROLNET_IGNORED, CONTROLNET_DEFAULTS, where + ".")
        model = str(unit.get("model") or "").split(" [")[0].strip()
        if model not in loaded:
            have = ", ".join(loaded) if loaded else "none (start the server with --controlnet-dir)"
            raise RequestError(f"{where}.model {unit.get('model')!r} is not a ControlNet of this server "
                               f"(loaded: {have})")
        image = unit.get("image", unit.get("input_image"))
        if isinstance(image, dict):  # newer extension versions: {"image": ..., "mask": ...}
            image = image.get("image")
        image = decode(image, f"{where}.image")
        module = str(unit.get("module") or "none").lower()
        if module == "canny":
            low, high = (int(unit.get(k) if unit.get(k) not in (None, -1) else d)
                         for k, d in zip(("threshold_a", "threshold_b"), CANNY_THRESHOLDS))
            image = canny(image, low, high)
        elif module != "none":
            unsupported.append(f"{where}.module={module!r}: preprocessor not available in sd-jax (only "
                               f"{', '.join(MODULES)}), the image is used as given")
        out.append({"controlnet": model, "image": image, "kind": module if module in MODULES else "none",
                    "scale": unit.get("weight", 1.0), "start": unit.get("guidance_start", 0.0),
                    "end": unit.get("guidance_end", 1.0)})
    return out


def control_args(units: list) -> dict:
    """Units of :func:`control_units` -> the pipeline's ``requests`` arguments."""
    if not units:
        return {}
    return {"control_image": [u["image"] for u in units], "controlnet": [u["controlnet"] for u in units],
            "controlnet_conditioning_scale": [u["scale"] for u in units],
            "control_guidance_start": [u["start"] for u in units], "control_guidance_end": [u["end"] for u in units]}


def ignored_fields(body: dict, used, defaults: dict, prefix: str = "") -> list[str]:
    """The fields of an A1111 request object this server does not act on, each as
    ``"name=value: why"``: a field outside ``used`` is fine only at one of its ``defaults``."""
    out = []
    for key, value in body.items():
        if key in used:
            continue
        if key in defaults:
            if value not in defaults[key]:
                out.append(f"{prefix}{key}={json.dumps(value)[:60]}: not supported by sd-jax, ignored")
        else:
            out.append(f"{prefix}{key}: unknown field, ignored")
    return out


def control_meta(units: list) -> list:
    """The ``controlnets`` metadata (as ``sd-jax generate`` writes it; A1111 parameters)."""
    return [{"module": u["kind"], "model": u["controlnet"], "weight": u["scale"], "guidance_start": u["start"],
             "guidance_end": u["end"]} for u in units]


def native_unit(i: int, c: dict, decode_image) -> dict:
    """One entry of ``POST /v1/generate``'s ``controls`` -> a unit of :func:`control_units`:
    ``kind`` ``canny`` computes the edges, ``none`` or a kind of :data:`sd_jax.control.KINDS`
    uses the image as given.  ``decode_image(text, what)``: the server's checked, size-bounded
    base64 decoder."""
    from sd_jax.control import KINDS, canny
    from sd_jax.request import RequestError
    kind = c["kind"].lower()
    if kind not in ("none",) + KINDS:
        raise RequestError(f"controls[{i}].kind {c['kind']!r} is not one of none, {', '.join(KINDS)}")
    image = decode_image(c["image"], f"controls[{i}].image")
    return {"controlnet": c["controlnet"], "image": canny(image) if kind == "canny" else image, "kind": kind,
            "scale": c["scale"], "start": c["start"], "end": c["end"]}
