"""One request path: a :class:`GenerationRequest` validated in one place, one :class:`Dispatcher`.

The Python API (``StableDiffusionPipeline.__call__``), ``sd-jax generate``, batch jobs and a
server all describe each image they want as a :class:`GenerationRequest` and hand the
requests to a :class:`Dispatcher`, which

* groups them by their static settings (size, steps, sampler, mode, clip skip, whether
  guidance runs), so each group compiles once;
* cuts each group into device calls of at most ``batch_size`` images, padding the last one
  up to a bucket size (multiples of the device count, doubling, up to ``batch_size``; a size
  compiled already is preferred), so a stream of requests reuses a few compiled shapes;
* keeps one call queued on the devices while the previous one is collected (JAX dispatch
  is asynchronous), so host work (PNG encoding, writing) overlaps device work;
* can compile a list of shapes ahead of time (:meth:`Dispatcher.precompile`).

An image depends on its own request (prompt, seed, settings), not on what it was batched
with: bit for bit at the same call size on the same devices; another call size or device
count can move a pixel by a grey level (XLA sums some reductions in an order that depends on
the batch shape: README, "Several devices and hosts").
"""
from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from sd_jax.memory import check_side

MAX_SEED = 2**32


class RequestError(ValueError):
    """A request that cannot be generated; the message names the field and what to do."""


# ----------------------------------------------------------------------------- field parsers
def parse_size(text) -> tuple[int, int]:
    """``"512"`` or ``"768x512"`` (width x height) -> (width, height); a ValueError otherwise."""
    try:
        parts = [int(p) for p in str(text).strip().lower().split("x")]
    except ValueError:
        raise RequestError(f"size {text!r} is not WxH (e.g. 512x512)") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0 or parts[0] % 8 or parts[1] % 8:
        raise RequestError(f"size {text!r} must be WxH with both sides positive multiples of 8 (e.g. 512x512)")
    check_side(parts[0], parts[1])
    return parts[0], parts[1]


def canonical_scheduler(name: str) -> str:
    """The canonical sampler name (``"Euler-A"`` -> ``"euler_a"``); a RequestError for an unknown one."""
    from sd_jax.diffusion import samplers
    key = str(name).strip().lower().replace("-", "_")
    base = key.removesuffix("_karras")
    cls = samplers.SCHEDULERS.get(base)
    if cls is None or (key != base and not cls.supports_karras):
        karras = sorted(k for k, c in samplers.SCHEDULERS.items() if c.supports_karras)
        raise RequestError(f"unknown scheduler {name!r}; choose one of {', '.join(sorted(samplers.SCHEDULERS))} "
                           f"(or add _karras to {', '.join(karras)})")
    return key


def check_timestep_spacing(name) -> str:
    """``"trailing"`` etc. (diffusers' ``timestep_spacing``); a RequestError naming the choices otherwise."""
    from sd_jax.diffusion.schedules import TIMESTEP_SPACINGS
    key = str(name).strip().lower()
    if key not in TIMESTEP_SPACINGS:
        raise RequestError(f"timestep spacing {name!r} is not one of {', '.join(TIMESTEP_SPACINGS)} "
                           f"(SDXL-Turbo/-Lightning: trailing)")
    return key


def _number(value, what: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RequestError(f"{what} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise RequestError(f"{what} must be a finite number, got {value!r}")
    return x


def _integer(value, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise RequestError(f"{what} must be an integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- ControlNet
@dataclasses.dataclass(frozen=True)
class Control:
    """One ControlNet's part in a request: ``controlnet`` names a ControlNet loaded into the
    pipeline (``pipe.load_controlnet``; its name or index), ``image`` is its control image (a
    path, PIL image or HxWxC array, resized to the output size), ``scale`` diffusers'
    ``controlnet_conditioning_scale``, ``start``/``end`` its ``control_guidance_start``/``_end``
    (fractions of the steps).  The numbers are traced: changing them does not recompile."""
    controlnet: Any
    image: Any = dataclasses.field(compare=False)
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if self.image is None:
            raise RequestError(f"ControlNet {self.controlnet!r} needs a control image")
        object.__setattr__(self, "scale", _number(self.scale, "controlnet_conditioning_scale"))
        start = _number(self.start, "control_guidance_start")
        end = _number(self.end, "control_guidance_end")
        if start >= end:
            raise RequestError(f"control_guidance_start ({start}) must be below control_guidance_end ({end})")
        if start < 0.0 or end > 1.0:
            raise RequestError(f"the control guidance window must lie in [0, 1], got {start}..{end}")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)


# The guidance window that guides every step (diffusers' default), by request field.
GUIDANCE_WINDOW = {"guidance_start": 0.0, "guidance_end": 1.0}


def check_guidance_window(start: float | None, end: float | None, where: str = "") -> None:
    """A RequestError unless 0 <= start < end <= 1 (None: not given, checked once resolved)."""
    lo = GUIDANCE_WINDOW["guidance_start"] if start is None else start
    hi = GUIDANCE_WINDOW["guidance_end"] if end is None else end
    if not 0.0 <= lo < hi <= 1.0:  # NaN fails this too
        raise RequestError(f"the guidance window must satisfy 0 <= guidance_start < guidance_end <= 1 "
                           f"(fractions of the steps), got {lo}..{hi}{where}")


def resolve_guidance_window(start: float | None, end: float | None, defaults: dict, where: str = "") -> dict:
    """``{"guidance_start", "guidance_end"}``: the given values, ``defaults`` (a model's
    generation defaults) for those that are None, else every step; a RequestError if the
    result is not a window."""
    out = {k: v if v is not None else defaults.get(k, GUIDANCE_WINDOW[k])
           for k, v in (("guidance_start", start), ("guidance_end", end))}
    check_guidance_window(out["guidance_start"], out["guidance_end"], where)
    return out


# ----------------------------------------------------------------------------- the request
@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One image to generate.  Constructing it checks every field that needs no model.

    ``width``/``height``/``scheduler`` None: the model's defaults (filled by
    :meth:`resolved`).  ``image`` (img2img, inpainting) and ``mask`` (inpainting, white =
    repaint): a path, a PIL image or an array.  ``latents``: optional initial noise
    [h, w, C] instead of the seeded noise.  ``prompt_syntax``: ``"a1111"`` (emphasis, ``BREAK``,
    prompts of any length in 75-token chunks: :mod:`sd_jax.prompts`) or ``"plain"``
    (diffusers: the text as it is, truncated at 77 tokens with a warning).
    """
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    guidance_rescale: float = 0.0
    # the steps classifier-free guidance runs in, as fractions of the steps that run (diffusers'
    # ``ClassifierFreeGuidance(start=, stop=)`` guider): step j of n is guided when
    # int(start * n) <= j < int(end * n), the others take the conditional prediction.  Traced.
    # None: the model's (its generation_defaults.json), else 0 and 1 (every step).
    guidance_start: Optional[float] = None
    guidance_end: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    scheduler: Optional[str] = None
    clip_skip: Optional[int] = None
    image: Any = dataclasses.field(default=None, compare=False)
    mask: Any = dataclasses.field(default=None, compare=False)
    strength: float = 0.8
    latents: Any = dataclasses.field(default=None, compare=False, repr=False)
    prompt_syntax: str = "a1111"
    control: tuple = dataclasses.field(default=(), compare=False)  # Control entries (ControlNets)
    guess_mode: bool = False
    # SDXL (diffusers' StableDiffusionXL*Pipeline arguments; traced, changing them does not
    # recompile): the second text encoder's prompts (None: the first's), micro-conditioning
    # sizes as (height, width) (None: the image's), the refiner's aesthetic scores.
    prompt_2: Optional[str] = None
    negative_prompt_2: Optional[str] = None
    original_size: Optional[tuple] = None
    crops_coords_top_left: tuple = (0, 0)
    target_size: Optional[tuple] = None
    negative_original_size: Optional[tuple] = None
    negative_crops_coords_top_left: tuple = (0, 0)
    negative_target_size: Optional[tuple] = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    # fractions of the noise schedule (static): stop early / start an image's latents late
    # (SDXL's base -> refiner hand-off, diffusers' ``denoising_end`` / ``denoising_start``).
    denoising_start: Optional[float] = None
    denoising_end: Optional[float] = None
    # the sampler's timestep spacing (diffusers' ``timestep_spacing``: "leading", "trailing",
    # "linspace"), replacing the scheduler config's; None: the config's.  SDXL-Turbo/-Lightning
    # are trained for "trailing".  Static (part of the compiled plan).
    timestep_spacing: Optional[str] = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if not isinstance(self.prompt, str):
            raise RequestError(f"prompt must be text, got {self.prompt!r}")
        neg = "" if self.negative_prompt is None else self.negative_prompt
        if not isinstance(neg, str):
            raise RequestError(f"negative_prompt must be text, got {neg!r}")
        set_("negative_prompt", neg)
        seed = _integer(self.seed, "seed")
        if not 0 <= seed < MAX_SEED:
            raise RequestError(f"seed must be in [0, 2**32), got {seed}")
        set_("seed", seed)
        steps = _integer(self.steps, "steps (num_inference_steps)")
        if steps < 1:
            raise RequestError(f"steps must be at least 1 (num_inference_steps), got {steps}")
        set_("steps", steps)
        set_("guidance", _number(self.guidance, "guidance (guidance_scale)"))
        rescale = _number(self.guidance_rescale, "guidance_rescale")
        if not 0.0 <= rescale <= 1.0:
            raise RequestError(f"guidance_rescale must be in [0, 1], got {rescale}")
        set_("guidance_rescale", rescale)
        for name in ("guidance_start", "guidance_end"):
            if getattr(self, name) is not None:
                set_(name, _number(getattr(self, name), name))
        check_guidance_window(self.guidance_start, self.guidance_end)
        for side in ("width", "height"):
            v = getattr(self, side)
            if v is not None:
                v = _integer(v, side)
                if v <= 0 or v % 8:
                    raise RequestError(f"height and width must be positive multiples of 8, got {side}={v}")
                set_(side, v)
        if self.width is not None and self.height is not None:
            check_side(self.width, self.height)
        if self.scheduler is not None:
            set_("scheduler", canonical_scheduler(self.scheduler))
        if self.clip_skip is not None:
            cs = _integer(self.clip_skip, "clip_skip")
            if cs < 0:
                raise RequestError(f"clip_skip must be >= 0, got {cs}")
            set_("clip_skip", cs or None)  # 0 and None both mean the last layer
        strength = _number(self.strength, "strength")
        if self.image is not None and not 0.0 < strength <= 1.0:
            raise RequestError(f"strength must be in (0, 1], got {strength}")
        set_("strength", strength)
        if self.mask is not None and self.image is None:
            raise RequestError("a mask (mask_image) needs an image to inpaint")
        if self.prompt_syntax not in ("a1111", "plain"):
            raise RequestError(f"prompt_syntax must be 'a1111' (emphasis, BREAK, long prompts) or 'plain' "
                               f"(diffusers: truncated at 77 tokens), got {self.prompt_syntax!r}")
        control = tuple(self.control or ())
        if not all(isinstance(c, Control) for c in control):
            raise RequestError("control must be a sequence of sd_jax.request.Control entries")
        set_("control", control)
        set_("guess_mode", bool(self.guess_mode))
        _check_sdxl_fields(self, set_)
        if self.timestep_spacing is not None:
            set_("timestep_spacing", check_timestep_spacing(self.timestep_spacing))

    @property
    def mode(self) -> str:
        return "txt2img" if self.image is None else ("img2img" if self.mask is None else "inpaint")

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs for this image (diffusers: guidance_scale > 1)."""
        return self.guidance > 1.0

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)


def _pair(value, what: str, low: int) -> tuple[int, int]:
    """(a, b) of integers >= ``low`` (micro-conditioning sizes, crop corners); a RequestError otherwise."""
    kind = "positive" if low > 0 else "non-negative"
    try:
        a, b = value
        pair = (_integer(a, what), _integer(b, what))
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be two {kind} integers (height, width), got {value!r}") from None
    if min(pair) < low:
        raise RequestError(f"{what} must be two {kind} integers (height, width), got {value!r}")
    return pair


def _check_sdxl_fields(r: "GenerationRequest", set_) -> None:
    for name in ("prompt_2", "negative_prompt_2"):
        v = getattr(r, name)
        if v is not None and not isinstance(v, str):
            raise RequestError(f"{name} must be text, got {v!r}")
    for name in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
        if getattr(r, name) is not None:
            set_(name, _pair(getattr(r, name), name, 1))
    for name in ("crops_coords_top_left", "negative_crops_coords_top_left"):
        set_(name, _pair(getattr(r, name), name, 0))
    for name in ("aesthetic_score", "negative_aesthetic_score"):
        set_(name, _number(getattr(r, name), name))
    for name in ("denoising_start", "denoising_end"):
        v = getattr(r, name)
        if v is not None:
            v = _number(v, name)
            if not 0.0 < v < 1.0:
                raise RequestError(f"{name} must be in (0, 1), got {v}")
            set_(name, v)
    if r.denoising_start is not None and r.mode != "img2img":
        raise RequestError("denoising_start continues an image's latents: it needs image= (img2img), no mask")
    if r.denoising_start is not None and r.denoising_end is not None and r.denoising_start >= r.denoising_end:
        raise RequestError(f"denoising_start ({r.denoising_start}) must be below denoising_end ({r.denoising_end})")


# ----------------------------------------------------------------------------- dispatching
def bucket_sizes(devices: int, batch_size: int) -> list[int]:
    """Padded call sizes: multiples of the device count, doubling, up to ``batch_size``."""
    top = -(-batch_size // devices) * devices
    sizes, s = [], devices
    while s < top:
        sizes.append(s)
        s *= 2
    return sizes + [top]


@dataclasses.dataclass
class Chunk:
    """One device call: ``items`` are (index in the submitted list, request); ``out`` holds
    ``len(items)`` results followed by padding rows up to ``size`` (a batch-sharded global
    jax.Array); ``plan`` is the static plan it ran; ``dispatched_at``: ``time.perf_counter()``
    when it was handed to the devices; ``flags``: the safety checker's bool [size] (a global
    jax.Array like ``out``) when the plan ran one, else None."""
    items: list
    out: Any
    plan: Any = None
    size: int = 0
    dispatched_at: float = 0.0
    flags: Any = None

    def host(self) -> np.ndarray:
        """The results of this chunk on this host (all rows, gathered across hosts)."""
        from sd_jax import sharding
        return sharding.to_host(self.out)[: len(self.items)]

    def host_flags(self) -> Optional[np.ndarray]:
        """The safety checker's flags of this chunk's images (bool [len(items)]), or None."""
        from sd_jax import sharding
        return None if self.flags is None else sharding.to_host(self.flags)[: len(self.items)]


class Dispatcher:
    """Runs requests on a pipeline in device-sized, compile-friendly calls.

    batch_size: images per device call over all devices (rounded up to a multiple of the
      device count); None: each group in one call.
    output: ``"uint8"``, ``"float32"`` or ``"latent"`` (see ``pipeline.Plan``).
    """

    def __init__(self, pipe, *, batch_size: Optional[int] = None, output: str = "uint8", loop: str = "scan"):
        if batch_size is not None and batch_size < 1:
            raise RequestError(f"batch_size must be at least 1, got {batch_size}")
        self.pipe = pipe
        self.devices = pipe.mesh.devices.size
        self.batch_size = batch_size
        self.output = output
        self.loop = loop

    def _chunks(self, plan, group: list) -> Iterator[tuple[list, int]]:
        limit = self.batch_size or len(group)
        buckets = bucket_sizes(self.devices, limit)
        for k in range(0, len(group), limit):
            items = group[k:k + limit]
            # A shape compiled already (a batch job's full batches) beats compiling a smaller one.
            compiled = self.pipe.compiled_sizes(plan)
            done = [b for b in buckets if b >= len(items) and b in compiled]
            yield items, done[0] if done else next(b for b in buckets if b >= len(items))

    def plan(self, requests: Iterable[GenerationRequest]):
        """The requests resolved against the model and grouped: [(plan, [(index, request)...])]."""
        groups: dict = collections.OrderedDict()
        for i, r in enumerate(requests):
            r, plan = self.pipe.resolve(r, output=self.output, loop=self.loop)
            groups.setdefault(plan, []).append((i, r))
        return list(groups.items())

    def run(self, requests: Iterable[GenerationRequest]) -> Iterator[Chunk]:
        """Yield one :class:`Chunk` per device call, each once its call has been dispatched
        *and* the next one is queued behind it (so the caller's host work overlaps the next
        call).  Every request is checked before the first call."""
        planned = self.plan(requests)
        pending: collections.deque = collections.deque()
        for plan, group in planned:
            for items, size in self._chunks(plan, group):
                out = self.pipe.dispatch(plan, [r for _, r in items], size)
                out, flags = out if isinstance(out, tuple) else (out, None)  # a plan with a safety checker
                pending.append(Chunk(items, out, plan, size, time.perf_counter(), flags))
                while len(pending) > 1:
                    yield pending.popleft()
        while pending:
            yield pending.popleft()

    def generate(self, requests: Iterable[GenerationRequest]) -> list:
        """Every request's result, in the order given (numpy arrays); the safety checker's flag
        of each (or None where none ran) is left in ``self.flags``."""
        requests = list(requests)
        out: list = [None] * len(requests)
        self.flags: list = [None] * len(requests)
        for chunk in self.run(requests):
            flags = chunk.host_flags()
            for j, ((i, _), x) in enumerate(zip(chunk.items, chunk.host())):
                out[i] = x
                self.flags[i] = None if flags is None else bool(flags[j])
        return out

    def precompile(self, requests: Iterable[GenerationRequest], sizes: Optional[Iterable[int]] = None) -> int:
        """Compile the calls these (example) requests need, at every bucket size (or ``sizes``)
        without running them; returns the number of programs compiled."""
        n = 0
        for plan, group in self.plan(requests):
            for size in (sizes or bucket_sizes(self.devices, self.batch_size or len(group))):
                self.pipe.compile(plan, group[0][1], size)
                n += 1
        return n
