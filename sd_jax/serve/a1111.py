"""The AUTOMATIC1111 web UI's API, as its clients send it, mapped onto sd-jax requests.

A txt2img / img2img body becomes one :class:`~sd_jax.request.GenerationRequest` per image
(``batch_size * n_iter`` of them, seeds ``seed, seed + 1, ...`` as in A1111), built by the
pipeline's own :meth:`~sd_jax.pipeline.StableDiffusionPipeline.requests` (the Python API's
path), so a server image equals the Python API's for the same prompt and seed.  Fields that
sd-jax does not support are listed in the response's ``unsupported`` (with a value other than
A1111's default), never silently dropped.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import time

from sd_jax import infotext
from sd_jax.images import A1111_SAMPLERS, a1111_controlnets, a1111_loras, a1111_parameters
from sd_jax.prompts import extract_loras
from sd_jax.request import GUIDANCE_WINDOW, MAX_SEED, RequestError
from sd_jax.serve import extras

# /png-info's parser (shared with ``sd-jax generate --from-png``)
parse_parameters = infotext.parse_parameters

# A1111 sampler name -> sd-jax sampler ("Euler a" -> "euler_a"); "X Karras" adds "_karras".
SAMPLERS = {v: k for k, v in A1111_SAMPLERS.items()}

# Fields A1111 clients send that change nothing here at these values (A1111's defaults, and
# what webuiapi sends): anything else in them is reported as unsupported.
DEFAULTS = {
    "enable_hr": (False, None), "styles": ([], None), "subseed": (-1, None, 0), "subseed_strength": (0, 0.0, None),
    "seed_resize_from_h": (0, -1, None), "seed_resize_from_w": (0, -1, None), "restore_faces": (False, None),
    "tiling": (False, None), "eta": (None, 0, 1, 1.0), "s_churn": (0, None), "s_tmax": (0, None), "s_tmin": (0, None),
    "s_noise": (1, None), "script_name": (None, ""), "script_args": ([], None),
    "refiner_checkpoint": (None, ""), "refiner_switch_at": (None, 0), "resize_mode": (0, None),
    "image_cfg_scale": (None, 1.5), "initial_noise_multiplier": (None, 1, 1.0), "comments": (None, {}),
    "firstpass_image": (None,), "latent_mask": (None,), "inpainting_fill": (0, None),
    "inpainting_mask_invert": (0, False, None), "controlnet_units": ([], None),
}
# Accepted whatever their value: they concern saving, the UI, or what hires fix would do (off).
IGNORED = {"do_not_save_samples", "do_not_save_grid", "send_images", "save_images", "override_settings_restore_afterwards",
           "sampler_index", "include_init_images", "force_task_id", "infotext", "user", "disable_extra_networks",
           "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
           "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
           "hr_negative_prompt", "hr_additional_modules", "inpaint_full_res_padding"}
USED = {"prompt", "negative_prompt", "seed", "steps", "cfg_scale", "width", "height", "sampler_name", "scheduler",
        "batch_size", "n_iter", "override_settings", "denoising_strength", "alwayson_scripts"}
IMG2IMG_USED = {"init_images", "mask", "mask_blur", "inpaint_full_res"}


def sampler_names(schedulers) -> list[dict]:
    """``/sdapi/v1/samplers``: every sd-jax sampler under its A1111 name (aliases: sd-jax's)."""
    out = []
    for name, cls in sorted(schedulers.items()):
        a1111 = A1111_SAMPLERS.get(name, name)
        out.append({"name": a1111, "aliases": [name], "options": {}})
        if cls.supports_karras:
            out.append({"name": f"{a1111} Karras", "aliases": [f"{name}_karras"], "options": {"scheduler": "karras"}})
    return out


def to_scheduler(sampler_name, scheduler=None) -> str | None:
    """An A1111 sampler name (and its separate ``scheduler``, e.g. ``"Karras"``) -> an sd-jax
    sampler name (checked later by the request); None: the model's own."""
    if sampler_name in (None, ""):
        return None
    name = str(sampler_name).strip()
    karras = name.endswith(" Karras")
    name = name.removesuffix(" Karras")
    base = SAMPLERS.get(name, name)
    if str(scheduler or "").strip().lower() == "karras":
        karras = True
    return base + ("_karras" if karras else "")


def decode_image(text, what: str, max_pixels: int):
    """A base64 PNG/JPEG (optionally a ``data:`` URL) -> RGB PIL image; a RequestError naming
    ``what`` for anything else, and for images above ``max_pixels`` (before decoding them)."""
    from PIL import Image
    if not isinstance(text, str):
        raise RequestError(f"{what} must be a base64-encoded image")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        raw = base64.b64decode(text, validate=True)
        im = Image.open(io.BytesIO(raw))
        if im.width * im.height > max_pixels:
            raise RequestError(f"{what} is {im.width}x{im.height}, above the server's limit of {max_pixels} pixels")
        im.load()
    except RequestError:
        raise
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError):
        raise RequestError(f"{what} is not a base64-encoded image (PNG or JPEG)") from None
    return im.convert("RGB")


def _int(body: dict, key: str, default):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise RequestError(f"{key} must be an integer, got {v!r}")
    return int(v)


def unsupported_fields(body: dict, img2img: bool) -> list[str]:
    """The fields of ``body`` this server does not act on, each as ``"name=value: why"``."""
    out = extras.ignored_fields(body, USED | (IMG2IMG_USED if img2img else set()) | IGNORED, DEFAULTS)
    if img2img and body.get("mask"):
        if body.get("mask_blur") not in (None, 0):
            out.append(f"mask_blur={body.get('mask_blur')}: masks are not blurred, ignored")
        if body.get("inpaint_full_res"):
            out.append("inpaint_full_res=true: the whole image is inpainted, ignored")
    return out


def parse(body: dict, pipe, limits, *, img2img: bool, model: str, lora_dir: str | None = None):
    """An A1111 txt2img / img2img body -> (requests, settings for the info string, unsupported).

    ``limits`` (:class:`sd_jax.serve.app.Limits`) are checked before any image is decoded or
    any request is built; the prompt's ``<lora:name:w>`` tags must name LoRAs of ``lora_dir``
    (``override_settings.sd_lora`` adds one, as A1111's "Add network to prompt")."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    unsupported = unsupported_fields(body, img2img)
    width = _int(body, "width", None)
    height = _int(body, "height", None)
    steps = _int(body, "steps", 20)
    batch, n_iter = _int(body, "batch_size", 1), _int(body, "n_iter", 1)
    if batch < 1 or n_iter < 1:
        raise RequestError("batch_size and n_iter must be at least 1")
    limits.check(width, height, steps, batch * n_iter)
    seed = _int(body, "seed", -1)
    if seed == -1:
        seed = secrets.randbelow(MAX_SEED - batch * n_iter)
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise RequestError("override_settings must be a JSON object")
    clip_skip = None
    add_lora = overrides.get("sd_lora")
    multiplier = overrides.get("extra_networks_default_multiplier", 1.0)
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise RequestError(f"override_settings.extra_networks_default_multiplier must be a number, got {multiplier!r}")
    for key, value in overrides.items():
        if key == "sd_model_checkpoint":
            if value and str(value).split(" [")[0].removesuffix(".safetensors") != model:
                raise RequestError(f"override_settings.sd_model_checkpoint {value!r} is not the loaded model "
                                   f"{model!r}; switch models with POST /sdapi/v1/options")
        elif key == "CLIP_stop_at_last_layers":
            n = _int(overrides, key, 1)
            if n < 1:
                raise RequestError(f"CLIP_stop_at_last_layers must be at least 1, got {n}")
            clip_skip = n - 1 or None  # A1111 counts the last layer used; sd-jax the layers skipped
        elif key in ("sd_lora", "extra_networks_default_multiplier"):
            pass
        else:
            unsupported.append(f"override_settings.{key}: not supported by sd-jax, ignored")
    image = mask = None
    strength = 0.75
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise RequestError("init_images must be a list with one base64-encoded image")
        if len(images) > 1:
            unsupported.append(f"init_images: {len(images)} given, only the first is used")
        image = decode_image(images[0], "init_images[0]", limits.max_pixels)
        if body.get("mask"):
            mask = decode_image(body["mask"], "mask", limits.max_pixels)
        strength = body.get("denoising_strength")
        strength = 0.75 if strength is None else strength
        if width is None or height is None:  # A1111 keeps the init image's size unless told
            width, height = width or image.width, height or image.height
            limits.check(width, height, steps, batch * n_iter)
    prompt = body.get("prompt", "")
    negative = body.get("negative_prompt", "") or ""
    if not isinstance(prompt, str) or not isinstance(negative, str):
        raise RequestError("prompt and negative_prompt must be text")
    if add_lora not in (None, "", "None"):
        if not isinstance(add_lora, str):
            raise RequestError(f"override_settings.sd_lora must be a LoRA name, got {add_lora!r}")
        if add_lora not in dict(extract_loras(prompt)[1]):  # A1111: unless the prompt names it already
            prompt += f"<lora:{add_lora}:{multiplier:g}>"
    unsupported += extras.negative_lora_tags(negative)
    loras = extras.prompt_loras(prompt, lora_dir)
    units = extras.control_units(body.get("alwayson_scripts"), pipe,
                                 lambda text, what: decode_image(text, what, limits.max_pixels), unsupported)
    guidance = body.get("cfg_scale", 7.0)
    scheduler = to_scheduler(body.get("sampler_name") or body.get("sampler_index"), body.get("scheduler"))
    requests = pipe.requests(prompt, negative, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                             height=height, width=width, scheduler=scheduler, clip_skip=clip_skip, image=image,
                             mask_image=mask, strength=strength, num_images_per_prompt=batch * n_iter,
                             **extras.control_args(units))
    r, _ = pipe.resolve(requests[0])
    settings = {"prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "guidance": guidance,
                "scheduler": r.scheduler, "width": r.width, "height": r.height, "clip_skip": clip_skip,
                "batch_size": batch, "n_iter": n_iter, "model": model, "strength": strength if img2img else None,
                "mode": r.mode, "controlnets": extras.control_meta(units),
                "guidance_start": r.guidance_start, "guidance_end": r.guidance_end, **loras}
    return requests, settings, unsupported


def image_meta(settings: dict, seed: int) -> dict:
    """The metadata of one image (PNG chunks, :func:`sd_jax.images.a1111_parameters`)."""
    keys = ("prompt", "negative_prompt", "steps", "scheduler", "guidance", "width", "height", "clip_skip", "model")
    meta = {k: settings[k] for k in keys}
    meta.update(seed=seed, generator="sd-jax", mode=settings["mode"])
    if settings.get("strength") is not None:
        meta["strength"] = settings["strength"]
    window = {k: settings.get(k, v) for k, v in GUIDANCE_WINDOW.items()}
    if window != GUIDANCE_WINDOW:  # the model's generation defaults
        meta.update(window)
    if settings.get("controlnets"):
        meta["controlnets"] = settings["controlnets"]
    if settings.get("loras"):  # as sd-jax generate writes them: A1111's "Lora hashes"
        meta.update(loras=settings["loras"], lora_hashes=settings["lora_hashes"])
    return meta


def info(settings: dict, seeds: list, nsfw: list | None = None) -> str:
    """A1111's ``info``: a JSON string with the generation's settings and one infotext per image;
    with a safety checker, ``nsfw_content_detected``: its flag of each image (as diffusers')."""
    n = len(seeds)
    checked = {} if nsfw is None else {"nsfw_content_detected": nsfw}
    sampler = settings["scheduler"] or ""
    name = A1111_SAMPLERS.get(sampler.removesuffix("_karras"), sampler)
    return json.dumps({
        "prompt": settings["prompt"], "all_prompts": [settings["prompt"]] * n,
        "negative_prompt": settings["negative_prompt"], "all_negative_prompts": [settings["negative_prompt"]] * n,
        "seed": settings["seed"], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": settings["width"], "height": settings["height"], "sampler_name": name,
        "scheduler": "Karras" if sampler.endswith("_karras") else "Automatic",
        "cfg_scale": settings["guidance"], "steps": settings["steps"], "batch_size": settings["batch_size"],
        "n_iter": settings["n_iter"], "restore_faces": False, "sd_model_name": settings["model"], "sd_model_hash": None,
        "denoising_strength": settings.get("strength"), "clip_skip": (settings["clip_skip"] or 0) + 1,
        "extra_generation_params": dict(a1111_controlnets(settings.get("controlnets")) + a1111_loras(settings)),
        "index_of_first_image": 0, "styles": [],
        "infotexts": [a1111_parameters(image_meta(settings, s)) for s in seeds],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "sd-jax", **checked,
    })
