"""What each ``sd-jax`` sub-command does (the parser lives in ``cli.py``)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


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

    from sd_jax.cli import DTYPES
    return getattr(jnp, DTYPES[name])


def check_scheduler(name: str) -> str:
    """The canonical sampler name (``"Euler-A"`` -> ``"euler_a"``); a UsageError for an unknown one."""
    from sd_jax.diffusion import samplers
    key = str(name).strip().lower().replace("-", "_")
    base = key.removesuffix("_karras")
    cls = samplers.SCHEDULERS.get(base)
    if cls is None or (key != base and not cls.supports_karras):
        karras = sorted(k for k, c in samplers.SCHEDULERS.items() if c.supports_karras)
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(sorted(samplers.SCHEDULERS))} "
                         f"(or add _karras to {', '.join(karras)})")
    return key


def _maybe_initialize_distributed() -> None:
    """Join a multi-host job when ``SD_JAX_COORDINATOR`` / ``SD_JAX_NUM_PROCESSES`` say so."""
    if os.environ.get("SD_JAX_COORDINATOR") or os.environ.get("SD_JAX_NUM_PROCESSES"):
        from sd_jax import sharding  # must run before anything touches a jax backend
        sharding.initialize_distributed()


def load_model(path: str, *, dtype: str = "fp32", attention: str = "auto", mesh=None):
    """Load a model (any format), turning every way a model can be broken into one-line errors."""
    from sd_jax.pipeline import StableDiffusionPipeline
    from sd_jax.weights.safetensors_io import CheckpointError
    try:
        return StableDiffusionPipeline.from_pretrained(path, dtype=_dtype(dtype), attention=attention, mesh=mesh)
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


def model_path(args) -> str:
    from sd_jax.cli import default_model
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
    _maybe_initialize_distributed()
    enable_compilation_cache()
    return load_model(path, dtype=args.dtype, attention=args.attention, mesh=mesh)


def model_name(pipe) -> str:
    """The model's name for metadata: its folder or file name, without ``.safetensors``."""
    name = os.path.basename(os.path.normpath(pipe.source or "")) if pipe.source else ""
    return name.removesuffix(".safetensors")


def check_generation_args(args) -> None:
    """Checks that need no model, so a mistake is reported before the (slow) model load."""
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.scheduler is not None:
        args.scheduler = check_scheduler(args.scheduler)
    if args.clip_skip is not None and args.clip_skip < 0:
        raise UsageError(f"--clip-skip must be >= 0, got {args.clip_skip}")


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
        "guidance_rescale": args.rescale, "scheduler": scheduler,
        "width": size[0], "height": size[1], "clip_skip": args.clip_skip,
    }


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


# ----------------------------------------------------------------------------- sub-commands
def generate(args) -> int:
    import jax

    from sd_jax.images import save_png
    if args.num < 1:
        raise UsageError("--num must be at least 1")
    if not args.output.lower().endswith(".png"):
        raise UsageError(f"--output {args.output!r} must end in .png")
    if os.path.isdir(args.output):
        raise UsageError(f"--output {args.output!r} is a folder; give a file name ending in .png")
    check_generation_args(args)
    if args.mask and not args.init_image:
        raise UsageError("--mask needs --init-image (the image to inpaint)")
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag} {path!r}: no such file")
    if args.init_image and not 0.0 < args.strength <= 1.0:
        raise UsageError(f"--strength must be in (0, 1], got {args.strength}")
    _check_writable(args.output, "--output")
    pipe = load(args)
    if pipe.models.unet.config.in_channels == 9 and not args.mask:
        raise UsageError(f"{args.model or 'the model'} is an inpainting model (9 input channels): "
                         f"pass --init-image and --mask")
    s = settings(args, pipe)
    check_size(pipe, s["width"], s["height"])
    t0 = time.perf_counter()
    images = pipe([args.prompt] * args.num, s["negative_prompt"], seed=s["seed"], num_inference_steps=s["steps"],
                  guidance_scale=s["guidance"], guidance_rescale=s["guidance_rescale"], height=s["height"],
                  width=s["width"], scheduler=s["scheduler"], clip_skip=s["clip_skip"], image=args.init_image,
                  mask_image=args.mask, strength=args.strength, output_type="np")
    dt = time.perf_counter() - t0
    if jax.process_index() != 0:  # multi-host: every process holds every image; one writes them
        return 0
    stem = args.output[:-4]
    for i, img in enumerate(images):
        path = args.output if args.num == 1 else f"{stem}-{i}.png"
        meta = {"prompt": args.prompt, **s, "seed": s["seed"] + i, "model": model_name(pipe), "generator": "sd-jax"}
        if args.init_image:
            meta["strength"] = args.strength
            meta["mode"] = "inpaint" if args.mask else "img2img"
        save_png(path, img, meta)
        print(path)
    print(f"{len(images)} image(s) in {dt:.1f}s", file=sys.stderr)
    return 0


def batch(args) -> int:
    from sd_jax import batch as batch_lib
    return batch_lib.run_from_args(args)


def convert(args) -> int:
    """Load SOURCE (any format) and write DEST, atomically: DEST is written in a hidden sibling
    folder ``.DEST.tmp-PID`` and renamed into place once complete, so an interrupted conversion
    leaves no half model; ``--overwrite`` replaces only a DEST that is itself a model.  Every
    check runs before the (slow) model load."""
    from sd_jax.weights import checkpoint
    if not os.path.exists(args.source):
        raise UsageError(f"model {args.source!r} not found")
    checkpoint.check_destination(args.dest, [args.source])
    if os.path.lexists(args.dest) and not args.overwrite:
        raise UsageError(f"{args.dest} already exists; pass --overwrite to replace it, or choose another DEST")
    _check_writable(os.path.abspath(args.dest), "DEST")
    with _signals_interrupt():
        pipe = load_model(args.source, dtype="fp32", attention="xla")
        pipe.save_pretrained(args.dest, format="orbax" if args.to == "sd-jax" else "diffusers")
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
    from sd_jax.cli import default_model
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
    print(f"dtype: fp32 by default; bf16 recommended on this backend"
          if jax.default_backend() in ("gpu", "tpu") else "dtype: fp32 by default (bf16 is slow on CPU)")
    print(f"compilation cache: {cache}")
    return 0


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
