"""Per-step progress and A1111's "Approx cheap" live preview for ``sd-jax serve --live-preview``.

Generation is one compiled ``lax.scan`` over the sampler's steps, which tells the host nothing
until it ends.  With a :class:`StepMonitor` on the pipeline (``pipe.preview``), every plan gets
:meth:`StepMonitor.plan_hook`, which adds two host callbacks to the scan body
(``post_step``, after inpainting's blend):

1. ``tick(i)`` (every step; one scalar to the host and a boolean back): records that step ``i + 1`` of the call is done
   and answers whether a client asked for a preview in the last :attr:`StepMonitor.window_s`;
2. only when it answered yes (a ``lax.cond`` on the device): the first image's latents go
   through A1111's fixed linear latent -> RGB map (``cheap_approximation``: 4 x 3 coefficients,
   the latent grid's size) and that small image is copied to the host.

So nobody asking costs one scalar round trip per step; the latents are copied only while a
client polls ``/sdapi/v1/progress``.  The callbacks only read the latents: the images are the
same as without them (tested).  Their cost is in benchmarks/README.md.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

# AUTOMATIC1111's modules/sd_vae_approx.py cheap_approximation: latent channel -> RGB in [-1, 1]
# (after https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2).
SD_COEFFS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
SDXL_COEFFS = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
               (-0.3730, -0.2499, -0.2088))


def coefficients(family: str, channels: int) -> tuple:
    """The [C, 3] latent -> RGB map for a model family; for a latent width other than 4 (no
    published map), the first three channels as RGB."""
    if channels == 4:
        return SDXL_COEFFS if family.startswith("sdxl") else SD_COEFFS
    return tuple(tuple(1.0 if c == r else 0.0 for r in range(3)) for c in range(channels))


def cheap_rgb(latents, coeffs):
    """[..., h, w, C] latents (as the sampler holds them, VAE-scaled) -> uint8 [..., h, w, 3]:
    A1111's ``cheap_approximation`` then ``(x + 1) / 2`` clipped (numpy or jax arrays)."""
    xp = np if isinstance(latents, np.ndarray) else _jnp()
    rgb = latents.astype(xp.float32) @ xp.asarray(coeffs, xp.float32)
    return xp.round(xp.clip((rgb + 1) / 2, 0, 1) * 255).astype(xp.uint8)


def _jnp():
    import jax.numpy as jnp
    return jnp


@dataclasses.dataclass(frozen=True, eq=False)
class PlanHook:
    """What a :class:`~sd_jax.pipeline.Plan` carries (``Plan.preview``): the monitor and the
    family's map.  Compared by identity (one per pipeline and monitor), as the plan is a compile key."""
    monitor: "StepMonitor"
    coeffs: tuple

    def post_step(self, blend, sampler, plan):
        """``blend`` (``(x, i) -> x`` or None) followed by the two callbacks (see the module doc)."""
        import functools

        import jax
        import jax.numpy as jnp
        from jax.experimental import io_callback
        n = plan.end
        monitor, coeffs = self.monitor, self.coeffs
        tick = functools.partial(monitor._tick, start=plan.start, end=n)

        def copy(x, i):
            # the first image's latents at the noise level of the next step, in the model's input
            # scale (the sigma samplers' x / sqrt(sigma^2 + 1)); after the last step, the final ones
            first = x[:1]
            shown = jnp.where(i + 1 < n, sampler.scale_model_input(first, jnp.minimum(i + 1, n - 1)), first)
            jax.debug.callback(monitor._store, cheap_rgb(shown[0], coeffs))

        def post(x, i):
            x = blend(x, i) if blend is not None else x
            want = io_callback(tick, jax.ShapeDtypeStruct((), jnp.bool_), i)
            jax.lax.cond(want, copy, lambda x, i: None, x, i)  # all of it on the device only when asked
            return x
        return post


class StepMonitor:
    """The step the running device call has reached and the latest preview, for ``/progress``.

    The worker runs one call at a time (the next one is queued behind it on the devices), so
    the step reported is that of the call now on the devices."""
    window_s = 5.0  # a preview is copied while a client asked for one this recently

    def __init__(self):
        self._lock = threading.Lock()
        self.step = 0            # steps done in the running call (of ``steps``)
        self.steps = 0
        self.image = None        # uint8 [h, w, 3]: the latest preview, taken at ``image_step``
        self.image_step = 0
        self.ticks = 0           # tick callbacks seen (tests, benchmarks)
        self.copies = 0          # previews copied to the host
        self.started = 0.0       # when the running call's first step ended (eta)
        self._wanted_until = 0.0
        self._new = threading.Condition(self._lock)
        self._hooks: dict = {}

    def plan_hook(self, family: str, channels: int) -> PlanHook:
        """The hook for a model family's plans: one per family, so plans stay equal (compiled
        once) from call to call."""
        key = (family, channels)
        if key not in self._hooks:
            self._hooks[key] = PlanHook(self, coefficients(family, channels))
        return self._hooks[key]

    # ------------------------------------------------------------------ callbacks (device -> host)
    def _tick(self, i, *, start: int, end: int) -> np.ndarray:
        step, steps = int(i) + 1 - start, end - start
        now = time.perf_counter()
        with self._lock:
            if step == 1 or self.steps != steps or step < self.step:
                self.started, self.image = now, None  # a new call
            self.step, self.steps = step, steps
            self.ticks += 1
            return np.asarray(now < self._wanted_until)

    def _store(self, rgb) -> None:
        with self._lock:
            self.image, self.image_step = np.asarray(rgb), self.step
            self.copies += 1
            self._new.notify_all()

    # ------------------------------------------------------------------ the server's side
    def want(self) -> None:
        """A client asked for a preview: copy one at each step for :attr:`window_s`."""
        with self._lock:
            self._wanted_until = time.perf_counter() + self.window_s

    def snapshot(self, wait_s: float = 0.0) -> dict:
        """``{step, steps, image, image_step, started}``; with ``wait_s``, waits that long at
        most for a preview when there is none for the running call yet."""
        with self._lock:
            if self.image is None and wait_s > 0 and self.steps:
                self._new.wait(wait_s)
            return {"step": self.step, "steps": self.steps, "image": self.image, "image_step": self.image_step,
                    "started": self.started}

    def reset(self) -> None:
        """No call running (the worker is idle)."""
        with self._lock:
            self.step = self.steps = 0
            self.image = None
