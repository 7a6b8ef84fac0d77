"""Whole text-to-image generation: sd-jax vs diffusers PyTorch, same random SD 1.5 weights, same run.

    python benchmarks/bench_pipeline.py                          # 512x512, 20 and 50 steps, batch 1 and 4
    python benchmarks/bench_pipeline.py --size 256 --steps 20    # quicker
    python benchmarks/bench_pipeline.py --cache-startup          # + a second process's start-up with the cache
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python benchmarks/bench_pipeline.py --dtype bf16 \
        --configs 20x1 50x1 20x8 20x32 20x64 --peak-tflops 989 --cache-startup   # on a GPU (H100)

Both sides use the SD 1.5 architecture (random weights: the speed is the same as with
trained ones), DPM-Solver++ 2M, guidance 7.5 (batch doubled for classifier-free guidance;
``--guidance 1`` runs without it on both sides);
on a GPU both run there, in the same dtype (diffusers with PyTorch's SDPA attention, sd-jax
with cuDNN's fused attention).  Prints per configuration: sd-jax compile time, steady-state
seconds per call (median), diffusers seconds per call, their ratio, images per second, the
model's FLOPs per call (text encoder + steps x UNet + VAE decode, each from XLA's cost
analysis of one call: the compiled scan counts its body once) and the achieved TFLOP/s of
each side (model FLOP utilisation with ``--peak-tflops``).  A configuration that runs out
of device memory prints ``OOM`` for that side and the run goes on.
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
    if torch.cuda.is_available():
        pipe = pipe.to("cuda", {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name, torch.float32))
    return pipe, folder


_FLOPS: dict = {}


def model_flops(pipe, batch, steps, size, guidance=7.5):
    """FLOPs of one generation: text encoder (2B prompts) + steps x UNet (2B) + VAE decode (B);
    without guidance (``guidance <= 1``) the text encoder and the UNet see B rows, not 2B.

    XLA's cost analysis of each network's plain formulation (XLA attention, no CPU-specific
    lowerings), lowered for the CPU on any machine: the compiled scan counts its body once,
    and on a GPU the cuDNN calls count as no FLOPs.  Counted once per size at batch 1 (every
    part is linear in the batch).
    """
    import jax
    import jax.numpy as jnp
    if size not in _FLOPS:
        m, p = pipe.models, pipe.params
        te_m, unet_m, vae_m = (x.clone(policy=x.policy.replace(attention="xla", cpu_lowerings=False))
                               for x in (m.text_encoder, m.unet, m.vae))
        shape = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)  # noqa: E731
        f = m.vae_scale
        lat = jax.ShapeDtypeStruct((2, size // f, size // f, pipe.latent_channels), m.unet.dtype)
        ctx = jax.ShapeDtypeStruct((2, 77, m.unet.config.cross_dims[0]), m.unet.dtype)
        t = jax.ShapeDtypeStruct((2,), jnp.float32)
        ids = jax.ShapeDtypeStruct((2, 77), jnp.int32)
        z = jax.ShapeDtypeStruct((1, size // f, size // f, pipe.latent_channels), m.vae.dtype)

        def cost(fn, *args):
            ca = jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).cost_analysis()
            ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
            return float(ca["flops"])

        _FLOPS[size] = (
            cost(lambda pp, i: te_m.encode(pp, i), shape(p["text_encoder"]), ids),
            cost(lambda pp, x, tt, c: unet_m.apply({"params": pp}, x, tt, c), shape(p["unet"]), lat, t, ctx),
            cost(lambda pp, x: vae_m.apply({"params": pp}, x, method="decode"), shape(p["vae"]), z))
    te, un, va = _FLOPS[size]
    rows = 1 if guidance <= 1 else 2  # the costs above are for 2 rows of text encoder and UNet
    return batch * (rows / 2 * (te + steps * un) + va)


def time_jax(pipe, batch, steps, size, iters, guidance=7.5):
    t = time.perf_counter()
    lowered = pipe.lower(batch_size=batch, height=size, width=size, num_inference_steps=steps, scheduler="dpmpp_2m",
                         guidance_scale=guidance, output="float32")
    lowered.compile()
    compile_s = time.perf_counter() - t
    kw = dict(num_inference_steps=steps, height=size, width=size, scheduler="dpmpp_2m", output_type="np",
              guidance_scale=guidance)
    pipe([PROMPT] * batch, **kw)  # warm: the pipeline's own jit cache compiles (or hits the persistent cache)
    ts = []
    for i in range(iters):
        t = time.perf_counter()
        pipe([PROMPT] * batch, seed=100 + i, **kw)
        ts.append(time.perf_counter() - t)
    return compile_s, statistics.median(ts)


def time_torch(pipe, batch, steps, size, iters, guidance=7.5):
    import torch
    ts = []
    with torch.inference_mode():
        kw = dict(num_inference_steps=steps, height=size, width=size, output_type="np", guidance_scale=guidance)
        pipe([PROMPT] * batch, **kw)  # warm-up
        for i in range(iters):
            g = torch.Generator(pipe.device).manual_seed(i)
            t = time.perf_counter()
            pipe([PROMPT] * batch, generator=g, **kw)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts)


STARTUP = r"""
import sys, time
t0 = time.perf_counter()
import jax.numpy as jnp
from sd_jax.pipeline import StableDiffusionPipeline, enable_compilation_cache
enable_compilation_cache(sys.argv[2])
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], dtype=jnp.bfloat16 if sys.argv[5] == "bf16" else jnp.float32)
t1 = time.perf_counter()
pipe("a cat", num_inference_steps=int(sys.argv[4]), height=int(sys.argv[3]), width=int(sys.argv[3]), scheduler="dpmpp_2m")
t2 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f}")
"""


def startup(folder, size, steps, dtype):
    """Two fresh processes sharing a new persistent cache: the second skips compilation."""
    cache = tempfile.mkdtemp(prefix="sdjax-cache-")
    out = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", STARTUP, folder, cache, str(size), str(steps), dtype],
                           capture_output=True, text=True, check=True)
        load, first = map(float, r.stdout.split()[-2:])
        out.append((load, first))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--configs", nargs="+", default=None, metavar="STEPSxBATCH",
                    help="explicit configurations, e.g. 20x1 50x1 20x8 (instead of --steps x --batch)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=7.5,
                    help="guidance scale on both sides (<= 1: no classifier-free guidance, one UNet pass a step)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--cache-startup", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, for model FLOP utilisation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import torch
    from sd_jax.pipeline import StableDiffusionPipeline

    from sd_jax.pipeline import enable_compilation_cache

    if args.configs:
        try:
            configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs]
        except ValueError:
            ap.error(f"--configs takes STEPSxBATCH items such as 20x1, got {args.configs}")
    else:
        configs = [(st, b) for st in args.steps for b in args.batch]
    tmp = tempfile.mkdtemp(prefix="sdjax-bench-")
    # A fresh persistent cache: the compile timed below is cold, and the pipeline's own call
    # of the same function then loads it instead of compiling it a second time.
    enable_compilation_cache(os.path.join(tmp, "xla-cache"))
    tpipe, folder = build_models(args.dtype, tmp)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, attention=args.attention)
    print(f"# backend {jax.default_backend()}, {jax.device_count()} device(s) ({jax.devices()[0].device_kind}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, {args.size}x{args.size}, {args.dtype}, "
          f"guidance {args.guidance}")
    rows = []
    mfu = " MFU" if args.peak_tflops else ""
    hdr = (f"{'steps':>5} {'batch':>5} | {'compile s':>9} {'sd-jax s':>9} {'img/s':>7} | {'torch s':>9} {'img/s':>7} | "
           f"{'jax/torch':>9} | {'TFLOP':>7} | TFLOP/s{mfu} sd-jax, torch")
    print(hdr)
    print("-" * len(hdr))
    result = {"size": args.size, "dtype": args.dtype, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "peak_tflops": args.peak_tflops, "rows": rows}

    def dump():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)

    def guarded(fn, *a):
        try:
            return fn(*a)
        except Exception as e:  # noqa: BLE001 - out of memory on either side: report it, go on
            msg = str(e)
            if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
                if "torch" in sys.modules:
                    sys.modules["torch"].cuda.empty_cache()
                return "OOM"
            raise

    f = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else (v or "-")
    for steps, b in configs:
        got = guarded(time_jax, pipe, b, steps, args.size, args.iters, args.guidance)
        compile_s, jax_s = got if got != "OOM" else (None, "OOM")
        torch_s = None if args.skip_torch else guarded(time_torch, tpipe, b, steps, args.size, args.iters,
                                                       args.guidance)
        try:
            flops = model_flops(pipe, b, steps, args.size, args.guidance)
        except Exception as e:  # noqa: BLE001 - a FLOP count is a nicety; the timings stand
            print(f"# no FLOP count: {type(e).__name__}: {e}"[:300])
            flops = None
        num = lambda v: isinstance(v, float)
        r = {"steps": steps, "batch": b, "compile_s": compile_s, "jax_s": jax_s,
             "jax_img_s": b / jax_s if num(jax_s) else None, "torch_s": torch_s,
             "torch_img_s": b / torch_s if num(torch_s) else None,
             "ratio_jax_over_torch": jax_s / torch_s if num(jax_s) and num(torch_s) else None,
             "tflop": flops / 1e12 if flops else None,
             "jax_tflop_s": flops / jax_s / 1e12 if flops and num(jax_s) else None,
             "torch_tflop_s": flops / torch_s / 1e12 if flops and num(torch_s) else None}
        util = ""
        if args.peak_tflops:
            r["jax_mfu"] = r["jax_tflop_s"] / args.peak_tflops if r["jax_tflop_s"] else None
            r["torch_mfu"] = r["torch_tflop_s"] / args.peak_tflops if r["torch_tflop_s"] else None
            util = f"  ({f(r['jax_mfu'], '.1%')}, {f(r['torch_mfu'], '.1%')})"
        rows.append(r)
        dump()
        print(f"{steps:>5} {b:>5} | {f(compile_s, '>9.1f')} {f(jax_s, '>9.3f')} {f(r['jax_img_s'], '>7.3f')} | "
              f"{f(torch_s, '>9.3f')} {f(r['torch_img_s'], '>7.3f')} | {f(r['ratio_jax_over_torch'], '>9.2f')} | "
              f"{f(r['tflop'], '>7.2f')} | {f(r['jax_tflop_s'], '.1f')}, {f(r['torch_tflop_s'], '.1f')}{util}", flush=True)
    if args.cache_startup:
        (l1, f1), (l2, f2) = startup(folder, args.size, configs[0][0], args.dtype)
        print(f"start-up, new process, empty cache:  load {l1:.1f}s, first image {f1:.1f}s")
        print(f"start-up, new process, warm cache:   load {l2:.1f}s, first image {f2:.1f}s")
        result["startup"] = {"cold": [l1, f1], "warm": [l2, f2]}
    dump()


if __name__ == "__main__":
    main()
