"""The cost of ``sd-jax serve --live-preview``: per-step progress and the "Approx cheap" preview.

    python benchmarks/bench_preview.py                          # the shipped model, 64x64, 20 steps
    python benchmarks/bench_preview.py --model PATH --size 512 --steps 20 --batch 4

With ``--live-preview`` every compiled generation has two host callbacks per step
(:mod:`sd_jax.serve.preview`): a scalar round trip telling the host the step (every step) and,
only while a client polls ``/sdapi/v1/progress``, a copy of the first image's latent-grid
preview.  This times one device call (``--batch`` images) three ways, interleaved round by
round in one process: without the callbacks ("off"), with them and nobody asking ("on, idle"),
and with a client asking ("on, asked").  Prints one JSON line: median seconds per call of each,
per step, and the overheads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from sd_jax import sharding
from sd_jax.pipeline import StableDiffusionPipeline
from sd_jax.serve.preview import StepMonitor

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=SHIPPED)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(a.model, mesh=sharding.make_mesh(jax.devices()[:1]))
    monitor = StepMonitor()
    monitor.window_s = 1e9
    args = dict(num_inference_steps=a.steps, height=a.size, width=a.size, output_type="uint8",
                num_images_per_prompt=a.batch, seed=0)
    modes = {"off": (None, False), "on, idle": (monitor, False), "on, asked": (monitor, True)}

    def call(mode):
        pipe.preview, asked = modes[mode]
        monitor._wanted_until = time.perf_counter() + 1e9 if asked else 0.0
        t = time.perf_counter()
        out = np.asarray(pipe("a red circle", **args))
        return time.perf_counter() - t, out

    images = {m: call(m)[1] for m in modes}  # compile
    same = all(np.array_equal(images["off"], images[m]) for m in modes)
    times = {m: [] for m in modes}
    for _ in range(a.iters):
        for m in modes:
            times[m].append(call(m)[0])
    med = {m: statistics.median(v) for m, v in times.items()}
    print(json.dumps({
        "device": str(jax.devices()[0].device_kind), "size": a.size, "steps": a.steps, "batch": a.batch,
        "seconds_per_call": {m: round(v, 4) for m, v in med.items()},
        "overhead_idle_ms_per_step": round((med["on, idle"] - med["off"]) / a.steps * 1e3, 3),
        "overhead_asked_ms_per_step": round((med["on, asked"] - med["off"]) / a.steps * 1e3, 3),
        "overhead_idle_pct": round(100 * (med["on, idle"] / med["off"] - 1), 1),
        "overhead_asked_pct": round(100 * (med["on, asked"] / med["off"] - 1), 1),
        "images_equal": same, "previews_copied": monitor.copies}))


if __name__ == "__main__":
    main()
