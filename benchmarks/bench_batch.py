"""Batch generation throughput: ``sd_jax.batch.run`` vs the Python API image by image, and
how the batch job scales with the device count.

    python benchmarks/bench_batch.py                        # tiny random model, 32x32, 4 steps
    python benchmarks/bench_batch.py --images 128 --size 64 --steps 8
    python benchmarks/bench_batch.py --model PATH --size 512 --steps 20 --dtype bf16 --devices 0   # a real model, GPU

Part 1 (this process, one device): the same prompts, seeds and settings, each writing a
PNG per image with the same metadata:
  * ``api``: ``pipe(prompt, seed=...)`` then ``save_png``, one image at a time;
  * ``batch.run``: the batch job (1 image per device call, PNG writes overlapped with compute);
  * ``batch.run --batch-size B``: the batch job with B images per call.
Part 2: ``batch.run`` in a subprocess per device count (``--devices 1 2 4 8``: fake CPU devices
via ``--xla_force_host_platform_device_count`` unless ``--real-devices``), one image per
device per call.  Fake CPU devices share the host's cores, so on a CPU they show the cost
of sharding, not a speed-up.

Compilation is excluded everywhere (a warm-up run first), and each figure is the best of
``--repeat`` runs (the host may be shared); the model is the tiny random
``tests/tiny_models.py`` pipeline unless ``--model`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model path (default: build the tiny random test model)")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement; the best counts")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batch-size", type=int, default=8, help="the batched batch.run row of part 1")
    ap.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4, 8],
                    help="device counts for part 2 (none: skip it)")
    ap.add_argument("--real-devices", action="store_true", help="part 2 on the first N real devices")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="also write the results here")
    return ap.parse_args()


def build_model(folder: str) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from tiny_models import build_tiny_pipeline
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    build_tiny_pipeline(folder)
    return folder


def rows_for(args, n: int, seed0: int = 0):
    from sd_jax import batch
    colours = ("red", "blue", "green", "white", "black", "yellow", "purple", "orange")
    shapes = ("circle", "square", "triangle", "star")
    raw = [(i + 1, {"prompt": f"a {colours[i % 8]} {shapes[(i // 8) % 4]}"}) for i in range(n)]
    defaults = {"negative_prompt": "", "seed": seed0, "steps": args.steps, "guidance": 7.5, "guidance_rescale": 0.0,
                "width": args.size, "height": args.size, "scheduler": args.scheduler, "clip_skip": None}
    return batch.make_rows(raw, defaults, "bench")


def load(args, mesh=None):
    import jax.numpy as jnp

    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(args.model, dtype=jnp.bfloat16 if args.dtype == "bf16" else jnp.float32,
                                                   mesh=mesh)


def time_batch_run(pipe, args, tmp: str, per_device: int, tag: str) -> float:
    """images/s of batch.run over args.images fresh rows (best of --repeat), after a warm-up that compiles."""
    from sd_jax import batch
    step = pipe.mesh.devices.size * per_device
    batch.run(pipe, rows_for(args, step, seed0=10_000), os.path.join(tmp, f"warm-{tag}"), per_device=per_device,
              progress=False)
    rows = rows_for(args, args.images)
    best = 0.0
    for k in range(args.repeat):
        t = time.perf_counter()
        s = batch.run(pipe, rows, os.path.join(tmp, f"run-{tag}-{k}"), per_device=per_device, progress=False)
        dt = time.perf_counter() - t
        assert s["generated"] == len(rows)
        best = max(best, len(rows) / dt)
    return best


def time_api(pipe, args, tmp: str) -> float:
    """images/s of the Python API, one image per call, each saved as a PNG with metadata (best of --repeat)."""
    from sd_jax import batch
    from sd_jax.images import save_png
    rows = rows_for(args, args.images)

    def one(r, out):
        img = pipe(r.prompt, r.negative_prompt, seed=r.seed, num_inference_steps=r.steps, guidance_scale=r.guidance,
                   height=r.height, width=r.width, scheduler=r.scheduler, output_type="uint8")[0]
        save_png(os.path.join(out, r.name), img, batch._meta(r, "bench"))

    one(rows_for(args, 1, seed0=10_000)[0], tmp)  # compile
    best = 0.0
    for k in range(args.repeat):
        out = os.path.join(tmp, f"api-{k}")
        os.makedirs(out)
        t = time.perf_counter()
        for r in rows:
            one(r, out)
        best = max(best, len(rows) / (time.perf_counter() - t))
    return best


def worker(args) -> None:
    """Part 2, in a subprocess with ``args.worker`` devices: print one JSON line."""
    import jax

    from sd_jax import sharding
    devs = jax.devices()[:args.worker]
    assert len(devs) == args.worker, f"asked for {args.worker} devices, have {len(jax.devices())}"
    pipe = load(args, mesh=sharding.make_mesh(devs))
    with tempfile.TemporaryDirectory() as tmp:
        rate = time_batch_run(pipe, args, tmp, 1, "w")
    print(json.dumps({"devices": args.worker, "images_per_second": rate, "backend": jax.default_backend(),
                      "device_kind": devs[0].device_kind}))


def main() -> None:
    args = parse()
    if args.worker is not None:
        return worker(args)
    if not args.real_devices:
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax

    from sd_jax import sharding
    results = {"config": {k: getattr(args, k) for k in ("images", "steps", "size", "scheduler", "dtype", "batch_size",
                                                         "repeat")}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            t = time.perf_counter()
            args.model = build_model(os.path.join(tmp, "tiny"))
            print(f"built the tiny random model in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        results["config"]["model"] = os.path.basename(args.model)
        dev = jax.devices()[0]
        pipe = load(args, mesh=sharding.make_mesh([dev]))
        print(f"part 1: one {dev.device_kind} device ({jax.default_backend()}), {args.images} images "
              f"{args.size}x{args.size}, {args.steps} steps {args.scheduler}, {args.dtype}", file=sys.stderr)
        part1 = [("Python API, 1 image per call + save_png", time_api(pipe, args, tmp)),
                 ("batch.run, 1 image per call", time_batch_run(pipe, args, tmp, 1, "b1")),
                 (f"batch.run, {args.batch_size} images per call", time_batch_run(pipe, args, tmp, args.batch_size,
                                                                                   f"b{args.batch_size}"))]
        results["part1"] = [{"what": w, "images_per_second": r} for w, r in part1]

        part2 = []
        env = dict(os.environ)
        for n in args.devices:
            if not args.real_devices:
                env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--model", args.model,
                   "--images", str(args.images), "--steps", str(args.steps), "--size", str(args.size),
                   "--scheduler", args.scheduler, "--dtype", args.dtype, "--repeat", str(args.repeat)]
            if args.real_devices:
                cmd.append("--real-devices")
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise SystemExit(f"worker with {n} devices failed:\n{p.stderr[-3000:]}")
            part2.append(json.loads(p.stdout.strip().splitlines()[-1]))
        results["part2"] = part2

    api = part1[0][1]
    print(f"\n{'part 1 (1 device)':<44} {'images/s':>9} {'vs API':>7}")
    for what, rate in part1:
        print(f"{what:<44} {rate:>9.2f} {rate / api:>6.2f}x")
    if part2:
        kind = "real" if args.real_devices else "fake CPU"
        print(f"\n{'part 2: batch.run, 1 image/device/call':<44} {'images/s':>9} {'vs 1 dev':>8}")
        base = part2[0]["images_per_second"]
        for r in part2:
            print(f"{str(r['devices']) + ' ' + kind + ' device(s)':<44} {r['images_per_second']:>9.2f} "
                  f"{r['images_per_second'] / base:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
