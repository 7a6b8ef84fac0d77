"""Writing generated images: PNG with generation metadata, atomically.

Metadata, so that other tools read it back:
* ``parameters`` text chunk in the AUTOMATIC1111 format (prompt, ``Negative prompt:``,
  then ``Steps: .., Sampler: .., CFG scale: .., Seed: .., Size: WxH, Model: ..``), in A1111's
  numbering: its ``Clip skip`` counts the last layer used (1 = no skip, omitted then), so
  sd-jax's ``clip_skip`` k (layers skipped, as in diffusers) is written ``Clip skip: k+1``;
* ``sd-jax`` text chunk with the same settings as JSON, in sd-jax's numbering, with a
  ``clip_skip_note`` saying so;
* an XMP packet marking the image as AI-generated (IPTC digital source type
  ``trainedAlgorithmicMedia``), plus a plain ``AI-generated: true`` text chunk.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np

# A1111 sampler names, for tools that parse the parameters line.
A1111_SAMPLERS = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
    "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC",
    "lcm": "LCM",
}
XMP = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
       '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
       '<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/">'
       '<Iptc4xmpExt:DigitalSourceType>http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia'
       '</Iptc4xmpExt:DigitalSourceType></rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end="w"?>')


def _quote(value) -> str:
    """A1111's ``quote``: a value with a comma, colon, quote or newline is written as JSON."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:"\n') else text


CLIP_SKIP_NOTE = ("clip_skip: text-encoder layers skipped, as diffusers counts (0 or null = none); "
                  "A1111's 'Clip skip' is this + 1")


def a1111_clip_skip(clip_skip: int | None) -> int | None:
    """A1111's ``Clip skip`` (``CLIP_stop_at_last_layers``: hidden state ``[-n]``, 1 = the last
    layer) for sd-jax's / diffusers' ``clip_skip`` (``[-(k + 1)]``, 0 = the last); None = no
    skip, which A1111 leaves out of the parameters."""
    return clip_skip + 1 if clip_skip else None


def a1111_parameters(meta: dict) -> str:
    """The ``parameters`` string A1111-style tools read: the prompt, ``Negative prompt: ...``,
    then one line ``Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 512x512, ...``."""
    sampler = meta.get("scheduler") or ""
    name = A1111_SAMPLERS.get(sampler.removesuffix("_karras"), sampler) or None
    fields = [("Steps", meta.get("steps")), ("Sampler", name),
              ("Schedule type", "Karras" if sampler.endswith("_karras") else None),
              ("CFG scale", meta.get("guidance")), ("Seed", meta.get("seed")),
              ("Size", f"{meta['width']}x{meta['height']}" if "width" in meta and "height" in meta else None),
              ("Model", meta.get("model") or None), ("Denoising strength", meta.get("strength")),
              ("Clip skip", a1111_clip_skip(meta.get("clip_skip"))), ("CFG Rescale", meta.get("guidance_rescale") or None),
              # A1111's refiner fields: "Refiner: NAME [HASH]" (sd_jax.infotext.checkpoint_title), the switch
              ("Refiner", meta.get("refiner")), ("Refiner switch at", meta.get("refiner_switch") if meta.get("refiner") else None),
              ("Timestep spacing", meta.get("timestep_spacing")),   # sd-jax's own (A1111 keeps unknown fields)
              ("Guidance start", meta.get("guidance_start") or None),
              ("Guidance end", meta["guidance_end"] if meta.get("guidance_end", 1.0) != 1.0 else None),
              *a1111_controlnets(meta.get("controlnets")), *a1111_loras(meta), ("Version", "sd-jax")]
    text = a1111_prompt(meta)
    if meta.get("negative_prompt"):
        text += f"\nNegative prompt: {meta['negative_prompt']}"
    return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None)


def a1111_prompt(meta: dict) -> str:
    """The prompt as written, with a ``<lora:name:w>`` tag added for each LoRA it does not name
    (loaded with ``--lora``), so that the parameters pasted back apply the same LoRAs."""
    from sd_jax.prompts.parser import extract_loras
    text = meta.get("prompt", "")
    loras = meta.get("loras") or {}
    if loras and meta.get("prompt_syntax", "a1111") == "a1111":
        tagged = {n for n, _ in extract_loras(text)[1]}
        text += "".join(f" <lora:{n}:{w:g}>" for n, w in loras.items() if n not in tagged)
    return text


def a1111_loras(meta: dict) -> list:
    """A1111's ``Lora hashes: "name: 0123456789ab, ..."`` field (the files' short hashes)."""
    hashes = meta.get("lora_hashes") or {}
    names = {n: n.replace(":", "").replace(",", "") for n in hashes}  # as A1111 writes them
    return [("Lora hashes", ", ".join(f"{names[n]}: {h}" for n, h in hashes.items()))] if hashes else []


def a1111_controlnets(controlnets) -> list:
    """The ControlNet extension's fields, ``ControlNet 0: "Module: canny, Model: NAME, Weight: 1.0,
    Guidance Start: 0.0, Guidance End: 1.0"``, from sd-jax's ``controlnets`` metadata."""
    return [(f"ControlNet {i}", f"Module: {c['module']}, Model: {c['model']}, Weight: {c['weight']}, "
                                f"Guidance Start: {c['guidance_start']}, Guidance End: {c['guidance_end']}")
            for i, c in enumerate(controlnets or [])]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # read once: os.umask is process-wide, not thread-safe to probe later
TMP_PREFIX = ".tmp-"


def _png_parts(image, meta: dict | None):
    """(PIL image, PngInfo with the metadata described above)."""
    from PIL import Image, PngImagePlugin
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    info = PngImagePlugin.PngInfo()
    if meta is not None:
        info.add_text("parameters", a1111_parameters(meta))
        note = {"clip_skip_note": CLIP_SKIP_NOTE} if meta.get("clip_skip") is not None else {}
        info.add_text("sd-jax", json.dumps({**meta, **note}, sort_keys=True))
    info.add_text("AI-generated", "true")
    info.add_itxt("XML:com.adobe.xmp", XMP)
    return img, info


def png_bytes(image, meta: dict | None = None) -> bytes:
    """``image`` (uint8 [H, W, 3] or PIL) as PNG file bytes with the metadata of :func:`save_png`."""
    import io
    img, info = _png_parts(image, meta)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str, image, meta: dict | None = None) -> None:
    """Write ``image`` (uint8 [H, W, 3] or PIL) to ``path`` atomically, with metadata: a
    temporary file ``.tmp-*.png`` in the same folder, fsynced, then renamed over ``path``."""
    img, info = _png_parts(image, meta)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name is: no empty PNG after a crash
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; an image should get the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_metadata(path: str) -> dict:
    """The sd-jax metadata of a PNG written by :func:`save_png` (``{}`` if none): the ``meta``
    it was given (``clip_skip`` in sd-jax's numbering, as written; the note left out)."""
    from PIL import Image
    with Image.open(path) as im:
        text = im.text.get("sd-jax")
    meta = json.loads(text) if text else {}
    meta.pop("clip_skip_note", None)
    return meta


def model_name(source: str | None) -> str:
    """A model's name for metadata: its folder or file name, without ``.safetensors``."""
    return os.path.basename(os.path.normpath(source)).removesuffix(".safetensors") if source else ""
