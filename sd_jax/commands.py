"""What each ``sd-jax`` sub-command does (the parser lives in ``cli.py``)."""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def default_model() -> str:
    """``$SD_JAX_MODEL``, else the small model shipped in ``checkpoints/``."""
    env = os.environ.get("SD_JAX_MODEL")
    if env:
        return env
    for root in (os.path.join(PACKAGE_DIR, "..", "checkpoints"), os.path.join(PACKAGE_DIR, "checkpoints")):
        path = os.path.normpath(os.path.join(root, "sd-jax-shapes"))
        if os.path.isdir(path):
            return path
    return os.path.normpath(os.path.join(PACKAGE_DIR, "..", "checkpoints", "sd-jax-shapes"))


class UsageError(ValueError):
    """A mistake in the command line or in its inputs; the message says what to do."""


# ----------------------------------------------------------------------------- errors and warnings
_OOM_ADVICE = {
    "generate": "lower --num or --size",
    "batch": "lower --batch-size or the rows' size (images already written are kept: rerun the same "
             "command to resume)",
    "convert": "convert on the host instead (JAX_PLATFORMS=cpu sd-jax convert ...)",
}


def _raised_in_sd_jax(e: BaseException) -> bool:
    """Whether the innermost frame that raised ``e`` is sd-jax code (not jax, numpy, ...)."""
    tb = e.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)


def describe_error(e: BaseException, command: str | None = None) -> str | None:
    """A one-line message for an error a user can fix; None for a bug (the caller re-raises it).

    User errors: :class:`UsageError` and ``CheckpointError``, ``ValueError`` raised by sd-jax's
    own argument checks, any ``OSError`` (missing, unreadable or unwritable files, full disk),
    and running out of device or host memory.  ``SD_JAX_DEBUG=1`` shows every traceback.
    """
    if os.environ.get("SD_JAX_DEBUG", "") not in ("", "0"):
        return None
    text = " ".join(str(e).split()) if str(e).strip() else type(e).__name__
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or isinstance(e, MemoryError):
        where = "host" if isinstance(e, MemoryError) else "device"
        if command == "convert":
            return f"out of {where} memory; {_OOM_ADVICE['convert']}"
        advice = _OOM_ADVICE.get(command, "lower the batch size or the image size")
        return f"out of {where} memory; {advice}, or use --dtype bf16 or --attention chunked"
    if isinstance(e, UsageError):
        return first
    if isinstance(e, OSError):
        return first
    if isinstance(e, ValueError) and _raised_in_sd_jax(e):
        return first
    return None


def _one_line(message) -> str:
    return " ".join(str(message).split())


def route_warnings() -> None:
    """Print a prompt-truncation warning as one line, ``sd-jax: warning: ...`` (no file/line)."""
    import warnings

    from sd_jax.tokenizer import PromptTruncatedWarning
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, PromptTruncatedWarning):
            from tqdm import tqdm  # writes above a running progress bar instead of through it
            tqdm.write(f"sd-jax: warning: {_one_line(message)}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


# ----------------------------------------------------------------------------- shared pieces
def _dtype(name):
    import jax.numpy as jnp

    return getattr(jnp, DTYPES[name])


def check_scheduler(name: str) -> str:
    """The canonical sampler name; one line naming the choices for an unknown one."""
    from sd_jax.request import canonical_scheduler
    return canonical_scheduler(name)


def _maybe_initialize_distributed() -> None:
    """Join a multi-host job when ``SD_JAX_COORDINATOR`` / ``SD_JAX_NUM_PROCESSES`` say so."""
    if os.environ.get("SD_JAX_COORDINATOR") or os.environ.get("SD_JAX_NUM_PROCESSES"):
        from sd_jax import sharding  # must run before anything touches a jax backend
        sharding.initialize_distributed()


def load_model(path: str, *, dtype: str = "fp32", attention: str = "auto", mesh=None, unet: str | None = None,
               safety_checker: bool = True, safety_policy: str = "black"):
    """Load a model (any format), turning every way a model can be broken into one-line errors."""
    from sd_jax.models.attention import check_impl
    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.weights.safetensors_io import CheckpointError
    try:
        check_impl(attention)  # not the model's fault: no "cannot load model" before it
        _check_pallas(attention)
    except ValueError as e:
        raise UsageError(f"--attention {attention}: {e}") from e
    try:
        return StableDiffusionPipeline.from_pretrained(path, dtype=_dtype(dtype), attention=attention, mesh=mesh,
                                                       unet=unet, safety_checker=safety_checker,
                                                       safety_policy=safety_policy)
    except CheckpointError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:
        # A malformed config or weights file; SD_JAX_DEBUG=1 shows where it failed.
        if os.environ.get("SD_JAX_DEBUG", "") not in ("", "0"):
            raise
        if isinstance(e, (ValueError, OSError)):
            what = _one_line(e)
        else:
            what = f"{type(e).__name__}: {_one_line(e)} (SD_JAX_DEBUG=1 shows where)"
        raise UsageError(f"cannot load model {path}: {what}") from e


def _check_pallas(attention: str) -> None:
    """``--attention pallas`` off a TPU is refused: elsewhere the TPU kernel runs only in Pallas
    interpret mode, exact but far too slow to generate with (the library keeps it for tests)."""
    import jax
    if attention in ("pallas", "flash") and jax.default_backend() != "tpu":
        raise ValueError(f"the Pallas attention kernels ('{attention}') are written for TPUs and JAX runs on {jax.default_backend()} "
                         f"here (off a TPU it only runs in interpret mode, far too slow to generate with); "
                         f"use 'auto' (Pallas on TPU, cuDNN on GPU, XLA elsewhere) or 'xla'")


def model_path(args) -> str:
    path = args.model or default_model()
    if os.path.exists(path):
        return path
    if args.model:
        raise UsageError(f"model {path!r} not found; --model takes a diffusers folder, an sd-jax checkpoint "
                         f"folder or a single-file .safetensors")
    if os.environ.get("SD_JAX_MODEL"):
        raise UsageError(f"model {path!r} (from $SD_JAX_MODEL) not found")
    raise UsageError(f"no model given and the default model {path} is not installed; pass --model PATH "
                     f"(a diffusers folder, an sd-jax checkpoint or a .safetensors file) or set SD_JAX_MODEL")


def load(args, mesh=None):
    from sd_jax.pipeline import enable_compilation_cache
    path = model_path(args)
    if getattr(args, "unet", None) and not os.path.isfile(args.unet):   # before the (slow) model load
        raise UsageError(f"--unet {args.unet!r} not found")
    _maybe_initialize_distributed()
    enable_compilation_cache(getattr(args, "compile_cache", None))
    off = getattr(args, "no_safety_checker", False)
    if off and os.path.isdir(path):
        from sd_jax.models.safety_checker import present
        if present(path):
            print("sd-jax: note: the model's safety checker is off (--no-safety-checker): images are not checked "
                  "for NSFW content", file=sys.stderr)
    pipe = load_model(path, dtype=args.dtype, attention=args.attention, mesh=mesh, unet=getattr(args, "unet", None),
                      safety_checker=not off, safety_policy=getattr(args, "safety_policy", "black"))
    if getattr(args, "no_watermark", False):
        pipe.watermark = False
    if getattr(args, "embeddings_dir", None):
        pipe.load_embeddings(args.embeddings_dir, allow_pickle=getattr(args, "allow_pickle", False))
    return pipe


def model_name(pipe) -> str:
    """The model's name for metadata: its folder or file name, without ``.safetensors``."""
    from sd_jax.images import model_name as name_of
    return name_of(pipe.source)


def check_generation_args(args) -> None:
    """Checks that need no model, so a mistake is reported before the (slow) model load."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.scheduler is not None:
        args.scheduler = check_scheduler(args.scheduler)
    if args.clip_skip is not None and args.clip_skip < 0:
        raise UsageError(f"--clip-skip must be >= 0, got {args.clip_skip}")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise UsageError(f"--guidance must be a finite number, got {args.guidance}")
    if not 0.0 <= args.rescale <= 1.0:  # NaN fails this too
        raise UsageError(f"--rescale must be in [0, 1], got {args.rescale}")
    g0, g1 = getattr(args, "guidance_start", None), getattr(args, "guidance_end", None)
    if not 0.0 <= (0.0 if g0 is None else g0) < (1.0 if g1 is None else g1) <= 1.0:  # NaN fails this too
        raise UsageError(f"--guidance-start {g0} / --guidance-end {g1}: need 0 <= start < end <= 1 "
                         f"(fractions of the steps)")
    emb = getattr(args, "embeddings_dir", None)
    if emb is not None and not os.path.isdir(emb):
        raise UsageError(f"--embeddings-dir {emb!r} is not a folder")
    check_refiner_args(args)


def check_refiner_args(args) -> None:
    """--refiner / --refiner-switch checks that need no model."""
    switch = getattr(args, "refiner_switch", None)
    if switch is not None and not getattr(args, "refiner", None):
        raise UsageError("--refiner-switch needs --refiner (an SDXL refiner folder)")
    if switch is not None and not 0.0 < switch < 1.0:  # NaN fails this too
        raise UsageError(f"--refiner-switch must be in (0, 1) (the fraction the base denoises), got {switch}")
    if getattr(args, "refiner", None):
        if getattr(args, "init_image", None):
            raise UsageError("--refiner continues a text-to-image base; it does not take --init-image / --mask")
        if not os.path.exists(args.refiner):
            raise UsageError(f"--refiner {args.refiner!r} not found; give an SDXL refiner folder")


def with_refiner(args, pipe):
    """``pipe``, or with ``--refiner`` the base + refiner ensemble; a UsageError for a refiner
    loaded as the base model (it needs a base, or an init image)."""
    from sd_jax import families
    if pipe.family is families.SDXL_REFINER and not args.refiner and not getattr(args, "init_image", None):
        raise UsageError(f"{args.model or 'the model'} is an SDXL refiner: it refines an image (--init-image) "
                         f"or continues a base model (--model BASE --refiner {args.model or 'REFINER'})")
    if not args.refiner:
        return pipe
    from sd_jax.ensemble import SDXLEnsemble
    refiner = load_model(args.refiner, dtype=args.dtype, attention=args.attention, mesh=pipe.mesh)
    refiner.watermark = refiner.watermark and pipe.watermark  # --no-watermark: neither marks
    switch = 0.8 if args.refiner_switch is None else args.refiner_switch
    try:
        ensemble = SDXLEnsemble(pipe, refiner, switch)
    except ValueError as e:
        raise UsageError(f"--refiner {args.refiner}: {_one_line(e)}") from None
    ensemble.memory_check = getattr(pipe, "memory_check", True)
    return ensemble


def settings(args, pipe=None) -> dict:
    """Generation settings from the command line, with the model's defaults filled in
    (placeholders when ``pipe`` is None, to check a prompt file before loading the model)."""
    if pipe is None:
        size, scheduler = args.size or (64, 64), args.scheduler or "ddim"
    else:
        size = args.size or (pipe.default_size, pipe.default_size)
        scheduler = args.scheduler or pipe.scheduler_name
    return {
        "negative_prompt": args.negative, "seed": args.seed,
        "steps": args.steps or 30,
        "guidance": args.guidance if args.guidance is not None else 7.5,
        "guidance_rescale": args.rescale, **guidance_window(args, pipe), "scheduler": scheduler,
        "width": size[0], "height": size[1], "clip_skip": args.clip_skip,
    }


def guidance_window(args, pipe=None) -> dict:
    """``--guidance-start`` / ``--guidance-end``, the model's ``generation_defaults`` where not given
    (None for those when ``pipe`` is None: filled when the model is loaded)."""
    start, end = getattr(args, "guidance_start", None), getattr(args, "guidance_end", None)
    if pipe is None:
        return {"guidance_start": start, "guidance_end": end}
    from sd_jax.request import RequestError, resolve_guidance_window
    try:
        return resolve_guidance_window(start, end, getattr(pipe, "generation_defaults", {}),
                                       " (with the model's defaults)")
    except RequestError as e:
        raise UsageError(str(e)) from None


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's factor (the UNet takes any latent size)."""
    return max(8, pipe.models.vae_scale)


def check_size(pipe, width: int, height: int, what: str = "--size") -> None:
    m = size_multiple(pipe)
    if width % m or height % m:
        raise UsageError(f"{what} {width}x{height}: this model needs both sides to be multiples of {m}")


def _check_writable(path: str, what: str) -> None:
    """The nearest existing folder above ``path`` must be writable (nothing is created)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {what} {path!r}: {folder} is not a writable folder")


def check_loras(args) -> list[tuple[str, float]]:
    """``--lora FILE[:WEIGHT]`` as (file, weight), each file found, before the (slow) model load."""
    from sd_jax.lora import parse_spec, resolve
    specs = []
    for spec in getattr(args, "lora", None) or []:
        name, weight = parse_spec(spec)
        if not math.isfinite(weight):
            raise UsageError(f"--lora {spec}: the weight must be a finite number")
        specs.append((resolve(name, args.lora_dir), weight))
    return specs


def prompt_lora_files(prompt: str, args) -> list[tuple[str, float]]:
    """The prompt's ``<lora:name:w>`` tags as (file, weight), found in ``--lora-dir`` (A1111 syntax)."""
    from sd_jax.lora import prompts as lora_prompts
    tags = lora_prompts.prompt_loras(prompt, getattr(args, "prompt_syntax", "a1111"))
    return lora_prompts.resolve_tags(tags, args.lora_dir, "--lora-dir")


def lora_hashes_of(pipe) -> dict[str, str]:
    from sd_jax.lora.prompts import loaded_hashes
    return loaded_hashes(pipe)


def apply_loras(pipe, specs, args) -> None:
    """Merge the checked ``--lora`` files into the pipeline (one line and nothing merged on error)."""
    if specs:
        pipe.use_loras(specs, allow_partial=args.lora_partial)


# ----------------------------------------------------------------------------- sub-commands
def warn(message: str) -> None:
    """One line on stderr, ``sd-jax: warning: ...``, above a running progress bar."""
    from tqdm import tqdm
    tqdm.write(f"sd-jax: warning: {_one_line(message)}", file=sys.stderr)


def _image_size(path: str, flag: str) -> tuple[int, int]:
    """(width, height) of an image file, from its header; a UsageError naming ``flag`` if unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise UsageError(f"{flag} {path!r} is not a readable image ({_one_line(e)})") from None


def _check_inputs(args) -> dict:
    """Checks of generate's image inputs before the model load; {flag: (path, (w, h))} of the images."""
    if args.mask and not args.init_image:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    images = {}
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is None:
            continue
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is a folder; give an image file")
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path!r}: no such file")
        images[flag] = (path, _image_size(path, flag))
    if args.strength is not None and not args.init_image:
        warn("--strength only applies with --init-image (img2img, inpainting); ignored")
    if args.init_image and not 0.0 < _strength(args) <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    return images


def _check_controls(args) -> list:
    """``--controlnet``/``--control`` checked before the model load: [(kind, image, scale)], the
    image a path, or for ``canny`` the computed edges."""
    from sd_jax.control import control_image, parse_control
    from sd_jax.models.controlnet import saved_count
    from sd_jax.request import RequestError
    saved = saved_count(model_path(args)) if args.control and not args.controlnet else 0
    if saved and len(args.control) != saved:  # no --controlnet: the --control entries steer the model's own
        raise UsageError(f"{len(args.control)} --control given for the model's {saved} ControlNet(s); give one "
                         f"--control KIND:IMAGE[:SCALE] per ControlNet, or --controlnet PATH for each --control")
    if not saved and len(args.control) != len(args.controlnet):
        raise UsageError(f"{len(args.controlnet)} --controlnet and {len(args.control)} --control given; "
                         f"give one --control KIND:IMAGE[:SCALE] per --controlnet PATH")
    if args.guess_mode and not (args.controlnet or saved):
        raise UsageError("--guess-mode needs --controlnet and --control")
    out = []
    _check_controlnet_paths(args.controlnet)
    for spec in args.control:
        try:
            kind, image, scale = parse_control(spec)
            if not os.path.isfile(image):
                raise UsageError(f"--control {spec!r}: no such file {image!r}")
            _image_size(image, "--control")
            out.append((kind, control_image(kind, image), scale))
        except RequestError as e:
            raise UsageError(str(e)) from None
    return out


def _check_controlnet_paths(paths) -> None:
    for path in paths:
        if not (os.path.isdir(path) or os.path.isfile(path) and path.endswith(".safetensors")):
            raise UsageError(f"--controlnet {path!r}: not found; give a diffusers ControlNetModel folder "
                             f"(config.json + diffusion_pytorch_model.safetensors) or an original .safetensors")


def _add_controlnet(pipe, path: str) -> str:
    """``pipe.load_controlnet(path)``; its name, or a UsageError naming ``--controlnet``."""
    try:
        return pipe.load_controlnet(path)
    except NotImplementedError as e:
        raise UsageError(f"--controlnet {path}: {_one_line(e)}") from None
    except ValueError as e:
        raise UsageError(_one_line(e)) from None


def _load_controlnets(pipe, args, controls) -> list:
    """Load each ``--controlnet``; [(Control, kind)] for the requests and the metadata."""
    from sd_jax.request import Control
    if not args.controlnet:  # the model's own (saved with it), in order
        return [(Control(name, image, scale), kind) for (name, _), (kind, image, scale) in zip(pipe.controlnets, controls)]
    return [(Control(_add_controlnet(pipe, path), image, scale), kind)
            for path, (kind, image, scale) in zip(args.controlnet, controls)]


def _strength(args) -> float:
    return 0.8 if args.strength is None else args.strength


def png_defaults(args) -> dict:
    """``generate --from-png PNG``: the PNG's A1111 parameters as generate's option defaults
    (:mod:`sd_jax.infotext`); warnings for what is not used (a refiner without ``--refiner``,
    another model or refiner than the PNG names)."""
    from sd_jax import infotext
    from sd_jax.images import model_name as name_of
    from sd_jax.request import RequestError, parse_size
    try:
        text = infotext.read_png_parameters(args.from_png)
    except ValueError as e:
        raise UsageError(str(e)) from None
    found, warnings = infotext.generate_settings(infotext.parse_parameters(text))
    where = f"--from-png {args.from_png}"
    for w in warnings:
        warn(f"{where}: {w}")
    if "size" in found:
        try:
            parse_size("x".join(map(str, found["size"])))
        except RequestError as e:
            raise UsageError(f"{where}: {e}") from None
    model = found.pop("model_title", None)
    if model and infotext.split_title(model)[0] != name_of(model_path(args)):
        warn(f"{where}: made with the model {model}, generating with {name_of(model_path(args))} (--model)")
    refiner = found.pop("refiner_title", None)
    if refiner and not args.refiner:
        found.pop("refiner_switch", None)
        warn(f"{where}: made with the refiner {refiner}; give it with --refiner PATH to use it (now: the base alone)")
    elif refiner:
        name, digest = infotext.split_title(refiner)
        given = infotext.split_title(infotext.checkpoint_title(args.refiner))
        if (digest and given[1] and digest != given[1]) or (not (digest and given[1]) and name != given[0]):
            warn(f"{where}: made with the refiner {refiner}, --refiner is {infotext.checkpoint_title(args.refiner)}")
    if not args.init_image:
        found.pop("strength", None)
    return found


def generate(args) -> int:
    """``--num`` images in batches of ``--batch-size`` (one per device by default): batch k+1 is
    queued on the devices before batch k is copied back and written, so memory does not grow
    with ``--num``; Ctrl-C stops at the next batch boundary, keeping the images written."""
    import signal
    import threading

    import jax
    from tqdm import tqdm

    from sd_jax import sharding
    from sd_jax.images import save_png
    from sd_jax.request import Dispatcher, GenerationRequest
    if args.prompt is None:
        raise UsageError("give a prompt (sd-jax generate \"a lighthouse\"), or --from-png PNG to take the PNG's")
    if args.num < 1:
        raise UsageError("--num must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"--output {args.output!r} must end in .png")
    if os.path.isdir(args.output):
        raise UsageError(f"--output {args.output!r} is a folder; give a file name ending in .png")
    check_generation_args(args)
    images = _check_inputs(args)
    controls = _check_controls(args)
    _check_writable(args.output, "--output")
    loras = check_loras(args) + prompt_lora_files(args.prompt, args)
    pipe = load(args)
    apply_loras(pipe, loras, args)
    lora_hashes = lora_hashes_of(pipe)
    controls = _load_controlnets(pipe, args, controls)
    pipe.memory_check = not args.no_memory_check
    pipe.vae_tiling = args.vae_tiling
    pipe = with_refiner(args, pipe)
    if pipe.models.unet.config.in_channels == 9 and not args.mask:
        raise UsageError(f"{args.model or 'the model'} is an inpainting model (9 input channels): "
                         f"pass --init-image and --mask")
    s = settings(args, pipe)
    check_size(pipe, s["width"], s["height"])
    for flag, (path, (w, h)) in images.items():
        if (w, h) != (s["width"], s["height"]):
            warn(f"{flag} {path} is {w}x{h}; it is resized to the output size {s['width']}x{s['height']} "
                 f"(--size sets the output size)")
    strength = _strength(args)
    ndev = pipe.mesh.devices.size
    chunk = min(-(-(args.batch_size or ndev) // ndev) * ndev, sharding.padded_size(args.num, pipe.mesh))
    writer = jax.process_index() == 0  # multi-host: every process holds every image; one writes them
    stem = args.output[:-4]
    requests = [GenerationRequest(args.prompt, s["negative_prompt"], seed=s["seed"] + i, steps=s["steps"],
                                  guidance=s["guidance"], guidance_rescale=s["guidance_rescale"],
                                  guidance_start=s["guidance_start"], guidance_end=s["guidance_end"],
                                  width=s["width"], height=s["height"], scheduler=s["scheduler"],
                                  clip_skip=s["clip_skip"], image=args.init_image, mask=args.mask,
                                  strength=strength, prompt_syntax=args.prompt_syntax, control=tuple(c for c, _ in controls), guess_mode=args.guess_mode,
                                  timestep_spacing=args.timestep_spacing)
                for i in range(args.num)]

    refiner = getattr(pipe, "metadata", None) if args.refiner else None  # SDXLEnsemble: the refiner, its switch

    def write(i: int, img, nsfw=None) -> None:
        path = args.output if args.num == 1 else f"{stem}-{i}.png"
        meta = {"prompt": args.prompt, **s, "seed": s["seed"] + i, "model": model_name(pipe), "generator": "sd-jax"}
        if refiner:
            meta.update(refiner)
        if pipe.loras.weights:
            meta["loras"] = pipe.loras.weights
            meta["lora_hashes"] = lora_hashes
        if args.prompt_syntax != "a1111":  # the A1111 parameters read the prompt as A1111 syntax
            meta["prompt_syntax"] = args.prompt_syntax
        if args.timestep_spacing:
            meta["timestep_spacing"] = args.timestep_spacing
        if nsfw is not None:  # the safety checker ran
            meta["nsfw_content_detected"] = nsfw
        if args.init_image:
            meta["strength"] = strength
            meta["mode"] = "inpaint" if args.mask else "img2img"
        if controls:
            meta["controlnets"] = [{"module": kind, "model": c.controlnet, "weight": c.scale, "guidance_start": c.start,
                                    "guidance_end": c.end} for c, kind in controls]
        save_png(path, img, meta)
        print(path, flush=True)

    stop = []

    def on_interrupt(signum, frame):
        if stop:  # a second Ctrl-C: now
            raise KeyboardInterrupt
        stop.append(True)

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_interrupt) if in_main else None
    bar = tqdm(total=args.num, unit="img", file=sys.stderr, disable=args.no_progress or args.num <= chunk
               or not writer, delay=0.5)
    written = 0
    t0 = time.perf_counter()
    try:
        # The dispatcher queues call k+1 on the devices before handing back call k.
        for call in Dispatcher(pipe, batch_size=chunk, output="uint8").run(requests):
            if stop:
                break
            flags = call.host_flags()
            for j, ((i, _), img) in enumerate(zip(call.items, call.host())):
                if writer:
                    write(i, img, None if flags is None else bool(flags[j]))
                written += 1
            bar.update(len(call.items))
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
        bar.close()
    if stop:
        print(f"sd-jax: interrupted: {written} of {args.num} image(s) written, the rest not generated",
              file=sys.stderr)
        return 130
    print(f"{written} image(s) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


def batch(args) -> int:
    """``sd-jax batch``: every row checked (and the output folder) before the model loads."""
    import jax

    from sd_jax import batch as batch_lib
    from sd_jax.batch import PromptFileError
    from sd_jax.memory import check_generation
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    check_generation_args(args)
    raw = batch_lib.read_prompt_file(args.prompts)
    nets = _batch_controlnets(args)
    batch_lib.make_rows(raw, settings(args), args.prompts, **nets)  # a bad row fails before the (slow) model load
    loras, tagged = check_loras(args), {}
    for line, rec in raw:  # every row's <lora:...> tags found in --lora-dir before the model load
        try:
            tagged.update(prompt_lora_files(str(rec.get("prompt", "")), args))
        except ValueError as e:
            raise PromptFileError(f"{args.prompts} line {line}: {e}") from None
    from sd_jax.images import model_name as name_of
    job = batch_lib.job_of_args(args, name_of(model_path(args)), raw, loras, sorted(tagged))
    batch_lib.check_out(args.out, job, args.replace)  # and so does a folder that cannot be used
    if args.score_with and not os.path.isdir(args.score_with):
        raise UsageError(f"--score-with {args.score_with!r} not found; give a transformers CLIPModel folder")
    pipe = with_refiner(args, load(args))
    if pipe.models.unet.config.in_channels == 9:
        raise UsageError(f"{args.model or 'the model'} is an inpainting model (9 input channels); "
                         f"batch does text-to-image only")
    apply_loras(pipe, loras, args)
    for path in args.controlnet:
        _add_controlnet(pipe, path)
    scorer = None
    if args.score_with and jax.process_index() == 0:  # loaded before the job: a bad folder fails early
        from sd_jax import sharding
        from sd_jax.score import ClipScorer
        scorer = ClipScorer.load(args.score_with, mesh=sharding.make_mesh(jax.local_devices()))
    rows = batch_lib.make_rows(raw, {**settings(args, pipe), "timestep_spacing": args.timestep_spacing}, args.prompts,
                               **nets)
    pipe.memory_check = not args.no_memory_check
    pipe.vae_tiling = args.vae_tiling
    ndev = pipe.mesh.devices.size
    per_device = -(-(args.batch_size or ndev) // ndev)
    seen = set()
    for r in rows:  # every row is resolved against the model (sampler, size, memory) before the first image
        try:
            pipe.resolve(r.request())
            if (r.width, r.height) not in seen:
                seen.add((r.width, r.height))
                check_generation(pipe, ndev * per_device, r.height, r.width)
        except ValueError as e:
            raise PromptFileError(f"{args.prompts} line {r.line}: {e}") from None
    s = batch_lib.run(pipe, rows, args.out, per_device=per_device, progress=not args.no_progress, job=job,
                      replace=args.replace, lora_dir=args.lora_dir)
    if jax.process_index() == 0:
        rate = f"{s['images_per_second']:.2f} images/s" if s["generated"] else "nothing to do"
        first = (f" (first batch, with compilation: {s['first_batch_seconds']:.1f}s)"
                 if s["first_batch_seconds"] is not None else "")
        print(f"{s['generated']} generated, {s['skipped']} already done, {s['rows']} rows in {args.out}; "
              f"{s['seconds']:.1f}s{first}, {rate} on {ndev} device(s), batches of {s['batch_size']}",
              file=sys.stderr)
    if scorer is not None:
        from sd_jax.score import score_folder, summary, write_table
        scored = score_folder(args.out, scorer)
        write_table(scored, os.path.join(args.out, "clip_scores.jsonl"))
        print(f"{summary(scored)}; table in {os.path.join(args.out, 'clip_scores.jsonl')}", file=sys.stderr)
    return 0


def _batch_controlnets(args) -> dict:
    """``batch``'s ``--controlnet``s checked before the model load: make_rows' ControlNet arguments
    (their names, as :meth:`load_controlnet` gives them)."""
    _check_controlnet_paths(args.controlnet)
    from sd_jax.models.controlnet import default_name
    names = [default_name(p) for p in args.controlnet]
    if len(set(names)) != len(names):
        raise UsageError(f"two --controlnet have the same name ({', '.join(names)}); give folders of other names")
    if args.guess_mode and not names:
        raise UsageError("--guess-mode needs --controlnet (and control entries in the prompt file)")
    return {"controlnets": names, "guess_mode": args.guess_mode}


def convert(args) -> int:
    """Load SOURCE (any format) and write DEST, atomically: DEST is written in a hidden sibling
    folder ``.DEST.tmp-PID`` and renamed into place once complete, so an interrupted conversion
    leaves no half model; ``--overwrite`` replaces only a DEST that is itself a model.  Every
    check runs before the (slow) model load."""
    from sd_jax.weights import checkpoint
    if not os.path.exists(args.source):
        raise UsageError(f"model {args.source!r} not found")
    single = args.to == "single-file"
    if single and not args.dest.endswith(".safetensors"):
        raise UsageError(f"--to single-file writes one .safetensors file: give a DEST ending in .safetensors, "
                         f"not {args.dest!r}")
    if not (single and os.path.isfile(args.dest)):   # an existing .safetensors is a model: --overwrite replaces it
        checkpoint.check_destination(args.dest, [args.source])
    elif os.path.realpath(args.dest) == os.path.realpath(args.source):
        raise UsageError(f"destination {args.dest} is the source model; choose another destination")
    if os.path.lexists(args.dest) and not args.overwrite:
        raise UsageError(f"{args.dest} already exists; pass --overwrite to replace it, or choose another DEST")
    _check_writable(os.path.abspath(args.dest), "DEST")
    nets = getattr(args, "controlnet", [])
    if nets and single:
        raise UsageError("a single-file checkpoint holds no ControlNets; give --to sd-jax or --to diffusers "
                         "to save --controlnet with the model")
    _check_controlnet_paths(nets)
    with _signals_interrupt():
        pipe = load_model(args.source, dtype="fp32", attention="xla", safety_checker=False)
        for path in nets:
            _add_controlnet(pipe, path)
        pipe.save_pretrained(args.dest, format={"sd-jax": "orbax"}.get(args.to, args.to))
    print(f"wrote {args.to} model to {args.dest}")
    return 0


@contextlib.contextmanager
def _signals_interrupt():
    """SIGTERM and SIGHUP raise KeyboardInterrupt (as Ctrl-C does) instead of ending the process
    at once, so that ``finally`` blocks remove what was half written."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            saved[sig] = signal.signal(sig, interrupt)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def info(args) -> int:
    import jax

    import sd_jax
    from sd_jax.pipeline import enable_compilation_cache
    cache = enable_compilation_cache()
    devs = jax.devices()
    print(f"sd-jax {sd_jax.__version__}, jax {jax.__version__}")
    print(f"backend: {jax.default_backend()}")
    print(f"processes: {jax.process_count()} (this is process {jax.process_index()})")
    print(f"devices: {len(devs)} ({', '.join(sorted({d.device_kind for d in devs}))}); "
          f"local: {jax.local_device_count()}")
    model = default_model()
    source = " (from $SD_JAX_MODEL)" if os.environ.get("SD_JAX_MODEL") else ""
    print(f"default model: {model}{source}{'' if os.path.exists(model) else ' (missing)'}")
    print("dtype: fp32 by default; bf16 recommended on this backend"
          if jax.default_backend() in ("gpu", "tpu") else "dtype: fp32 by default (bf16 is slow on CPU)")
    print(f"compilation cache: {cache}")
    loras = check_loras(args)
    if loras:
        pipe = load_model(model_path(args), dtype="fp32", attention="xla")
        print(f"model: {pipe.source} ({pipe.loras.model_description()})")
        for path, _ in loras:
            print("\n".join(pipe.loras.read(path, allow_partial=True).describe()))
    return 0


def serve(args) -> int:
    """``sd-jax serve``: arguments checked (and the port tried) before the model loads."""
    from sd_jax.serve import run
    from sd_jax.serve.extras import load_controlnets
    shapes = run.check_args(args)
    pipe = load(args)
    load_controlnets(pipe, args.controlnet_dir)

    def loader(path):  # /sdapi/v1/options: another model, with the same embeddings
        other = load_model(path, dtype=args.dtype, attention=args.attention)
        if args.embeddings_dir:
            other.load_embeddings(args.embeddings_dir, allow_pickle=args.allow_pickle)
        load_controlnets(other, args.controlnet_dir)
        return other
    return run.serve(args, pipe, shapes, loader=loader)


def train(args) -> int:
    import importlib
    try:
        train_cli = importlib.import_module("sd_jax.train.cli")
    except ModuleNotFoundError as e:
        if e.name != "sd_jax.train.cli":
            raise
        raise UsageError("training from the command line is not available in this version; "
                         "use the sd_jax.train Python API") from None
    return train_cli.run(args.recipe, args.rest)


def precompile(args) -> int:
    """``sd-jax precompile``: compile the programs ``generate``/``batch`` will run for each of
    ``--shapes`` (every call size up to ``--batch-size``) into the persistent compilation cache."""
    import jax

    from sd_jax.request import Dispatcher, GenerationRequest
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    pipe = load(args)
    pipe.memory_check = not args.no_memory_check
    pipe.vae_tiling = args.vae_tiling
    ndev = pipe.mesh.devices.size
    chunk = -(-(args.batch_size or ndev) // ndev) * ndev
    guidance = args.guidance if args.guidance is not None else 7.5
    for w, h, steps in args.shapes:
        check_size(pipe, w, h, "--shapes")
    t0 = time.perf_counter()
    for w, h, steps in args.shapes:
        t = time.perf_counter()
        request = GenerationRequest("", steps=steps, guidance=guidance, width=w, height=h,
                                    scheduler=args.scheduler or pipe.scheduler_name, clip_skip=args.clip_skip,
                                    timestep_spacing=args.timestep_spacing)
        n = Dispatcher(pipe, batch_size=chunk, output="uint8").precompile([request])
        print(f"{w}x{h}:{steps}: {n} program(s) compiled in {time.perf_counter() - t:.1f}s", flush=True)
    print(f"compilation cache: {jax.config.jax_compilation_cache_dir} "
          f"({time.perf_counter() - t0:.1f}s in all)", file=sys.stderr)
    return 0


def score(args) -> int:
    """``sd-jax score FOLDER --clip PATH``: the folder and --out checked before the (slow) CLIP load."""
    from sd_jax.score import ClipScorer, prompts_of_folder, score_folder, summary, write_table
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if args.out is not None:
        if not args.out.endswith((".csv", ".jsonl")):
            raise UsageError(f"--out {args.out!r} must end in .csv or .jsonl")
        _check_writable(args.out, "--out")
    if not prompts_of_folder(args.folder):
        raise UsageError(f"{args.folder!r}: its manifest.jsonl lists no image that exists")
    if not os.path.exists(args.clip):
        raise UsageError(f"--clip {args.clip!r} not found; give a transformers CLIPModel folder")
    rows = score_folder(args.folder, ClipScorer.load(args.clip), args.batch_size)
    if args.out:
        write_table(rows, args.out)
    print(summary(rows) + (f"; table in {args.out}" if args.out else ""))
    return 0
