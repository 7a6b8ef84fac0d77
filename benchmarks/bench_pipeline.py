"""Whole text-to-image generation: sd-jax vs diffusers PyTorch, same random SD 1.5 weights, same run.

    python benchmarks/bench_pipeline.py                          # 512x512, 20 and 50 steps, batch 1 and 4
    python benchmarks/bench_pipeline.py --size 256 --steps 20    # quicker
    python benchmarks/bench_pipeline.py --dtype bf16 --batch 1 8 16 --skip-torch   # on a GPU
    python benchmarks/bench_pipeline.py --cache-startup          # + a second process's start-up with the cache

Both sides use the SD 1.5 architecture (random weights: the speed is the same as with
trained ones), DPM-Solver++ 2M, guidance 7.5 (batch doubled for classifier-free guidance).
Prints per configuration: sd-jax compile time, steady-state seconds per call (median),
diffusers seconds per call, their ratio, images per second, and XLA's FLOP count of the
compiled function with the achieved FLOP/s (model FLOP utilisation with ``--peak-tflops``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


from bench_vae import flops_of  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

PROMPT = "a photograph of an astronaut riding a horse"


def build_models(dtype_name: str, tmp: str):
    """Random SD 1.5 weights made by diffusers, saved once; returns (torch pipeline, folder)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_jax.models.clip import CLIPTextConfig as JC
    from sd_jax.models.unet import UNetConfig
    from sd_jax.models.vae import VAEConfig
    from sd_jax.weights.single_file import tokenizer_for

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in JC.sd15().to_dict().items()
                                         if k not in ("architectures", "model_type")})).eval()
    unet = UNet2DConditionModel(**{k: v for k, v in UNetConfig.sd15().to_dict().items() if not k.startswith("_")}).eval()
    vae = AutoencoderKL(**{k: v for k, v in VAEConfig.sd15().to_dict().items() if not k.startswith("_")}).eval()
    sched = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        steps_offset=1, timestep_spacing="leading", algorithm_type="dpmsolver++")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer_for("sd1"), unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = os.path.join(tmp, "sd15-random")
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder


def time_jax(pipe, batch, steps, size, iters):
    t = time.perf_counter()
    lowered = pipe.lower(batch_size=batch, height=size, width=size, num_inference_steps=steps, scheduler="dpmpp_2m")
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    flops = flops_of(compiled)
    kw = dict(num_inference_steps=steps, height=size, width=size, scheduler="dpmpp_2m", output_type="np")
    pipe([PROMPT] * batch, **kw)  # warm: the pipeline's own jit cache compiles (or hits the persistent cache)
    ts = []
    for i in range(iters):
        t = time.perf_counter()
        pipe([PROMPT] * batch, seed=100 + i, **kw)
        ts.append(time.perf_counter() - t)
    return compile_s, statistics.median(ts), flops


def time_torch(pipe, batch, steps, size, iters):
    import torch
    ts = []
    with torch.inference_mode():
        pipe([PROMPT] * batch, num_inference_steps=steps, height=size, width=size, output_type="np")  # warm-up
        for i in range(iters):
            g = torch.Generator().manual_seed(i)
            t = time.perf_counter()
            pipe([PROMPT] * batch, num_inference_steps=steps, height=size, width=size, generator=g, output_type="np")
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


STARTUP = r"""
import sys, time
t0 = time.perf_counter()
import jax.numpy as jnp
from sd_jax.pipeline import StableDiffusionPipeline, enable_compilation_cache
enable_compilation_cache(sys.argv[2])
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
t1 = time.perf_counter()
pipe("a cat", num_inference_steps=int(sys.argv[4]), height=int(sys.argv[3]), width=int(sys.argv[3]), scheduler="dpmpp_2m")
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def startup(folder, size, steps):
    """Two fresh processes sharing a new persistent cache: the second skips compilation."""
    cache = tempfile.mkdtemp(prefix="sdjax-cache-")
    out = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", STARTUP, folder, cache, str(size), str(steps)],
                           capture_output=True, text=True, check=True)
        load, first = map(float, r.stdout.split()[-2:])
        out.append((load, first))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--cache-startup", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, for model FLOP utilisation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from sd_jax.pipeline import StableDiffusionPipeline

    tmp = tempfile.mkdtemp(prefix="sdjax-bench-")
    tpipe, folder = build_models(args.dtype, tmp)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, attention=args.attention)
    print(f"# backend {jax.default_backend()}, {jax.device_count()} device(s) ({jax.devices()[0].device_kind}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, {args.size}x{args.size}, {args.dtype}")
    rows = []
    hdr = f"{'steps':>5} {'batch':>5} | {'compile s':>9} {'sd-jax s':>9} {'img/s':>7} | {'torch s':>9} {'img/s':>7} | {'jax/torch':>9} | {'TFLOP':>7} {'TFLOP/s':>8}"
    print(hdr)
    print("-" * len(hdr))
    for steps in args.steps:
        for b in args.batch:
            compile_s, jax_s, flops = time_jax(pipe, b, steps, args.size, args.iters)
            torch_s = None if args.skip_torch else time_torch(tpipe, b, steps, args.size, args.iters)
            r = {"steps": steps, "batch": b, "compile_s": compile_s, "jax_s": jax_s, "jax_img_s": b / jax_s,
                 "torch_s": torch_s, "torch_img_s": b / torch_s if torch_s else None,
                 "ratio_jax_over_torch": jax_s / torch_s if torch_s else None, "tflop": flops / 1e12 if flops else None,
                 "tflop_s": flops / jax_s / 1e12 if flops else None}
            if args.peak_tflops and flops:
                r["mfu"] = r["tflop_s"] / args.peak_tflops
            rows.append(r)
            f = lambda v, fmt: format(v, fmt) if v is not None else "-"
            print(f"{steps:>5} {b:>5} | {compile_s:>9.1f} {jax_s:>9.2f} {b / jax_s:>7.3f} | {f(torch_s, '>9.2f')} "
                  f"{f(r['torch_img_s'], '>7.3f')} | {f(r['ratio_jax_over_torch'], '>9.2f')} | {f(r['tflop'], '>7.2f')} "
                  f"{f(r['tflop_s'], '>8.3f')}" + (f"  MFU {r['mfu']:.1%}" if 'mfu' in r else ""), flush=True)
    result = {"size": args.size, "dtype": args.dtype, "backend": jax.default_backend(), "rows": rows}
    if args.cache_startup:
        (l1, f1), (l2, f2) = startup(folder, args.size, args.steps[0])
        print(f"start-up, new process, empty cache:  load {l1:.1f}s, first image {f1:.1f}s")
        print(f"start-up, new process, warm cache:   load {l2:.1f}s, first image {f2:.1f}s")
        result["startup"] = {"cold": [l1, f1], "warm": [l2, f2]}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
