"""A guidance window's cost and saving: sd-jax vs diffusers PyTorch, same random SD 1.5 weights, same run.

    python benchmarks/bench_guidance_window.py                     # 256x256, 20 steps, batch 1, end 0.7
    python benchmarks/bench_guidance_window.py --size 512 --batch 4 --end 0.5

For each engine, one generation guided at every step and one guided only in the first
``--end`` of the steps (sd-jax: ``guidance_end=``; diffusers: its documented dynamic-CFG
callback, which drops the unconditional half of the batch after the last guided step).  The
unguided steps run the UNet on the conditional half alone in both, so a window of 0.7 should
save about 15% of the UNet work.  Prints per engine: the first call (sd-jax: compile included,
each window setting compiles its own program: one holds a second UNet trace for the unguided
steps) and the steady-state seconds per call (median of ``--iters``), and the ratio sd-jax /
diffusers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pipeline import PROMPT, build_models  # noqa: E402


def stop_guidance(end):
    def callback(pipe, i, t, kwargs):   # diffusers' "dynamic classifier-free guidance" callback
        if i == int(end * pipe.num_timesteps) - 1:
            kwargs["prompt_embeds"] = kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return kwargs
    return callback


def timed(fn, iters):
    t = time.perf_counter()
    fn(0)
    first = time.perf_counter() - t
    ts = []
    for i in range(iters):
        t = time.perf_counter()
        fn(i + 1)
        ts.append(time.perf_counter() - t)
    return first, statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--end", type=float, default=0.7, help="guide only in the first END of the steps")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args(argv)

    import jax
    import torch
    from sd_jax.pipeline import StableDiffusionPipeline

    tpipe, folder = build_models("fp32", tempfile.mkdtemp(prefix="sdjax-bench-"))
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    prompts = [PROMPT] * args.batch
    kw = dict(num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=7.5)
    print(f"# backend {jax.default_backend()} ({jax.devices()[0].device_kind}), torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; SD 1.5 architecture, {args.size}x{args.size}, {args.steps} "
          f"DPM-Solver++ steps, batch {args.batch}, guidance 7.5")
    hdr = f"{'guided steps':>14} | {'sd-jax first s':>14} {'sd-jax s':>9} | {'torch s':>9} | {'jax/torch':>9}"
    print(hdr)
    print("-" * len(hdr))
    rows = {}
    for end in (1.0, args.end):
        first, jax_s = timed(lambda i: pipe(prompts, seed=100 + i, scheduler="dpmpp_2m", output_type="np",
                                            guidance_end=end, **kw), args.iters)
        torch_s = None
        if not args.skip_torch:
            cb = {} if end >= 1 else dict(callback_on_step_end=stop_guidance(end),
                                          callback_on_step_end_tensor_inputs=["prompt_embeds"])

            def run_torch(i):
                with torch.inference_mode():
                    tpipe(prompts, generator=torch.Generator().manual_seed(i), output_type="np", **kw, **cb)
            _, torch_s = timed(run_torch, args.iters)
        rows[end] = (jax_s, torch_s)
        label = "all" if end >= 1 else f"first {end:.0%}"
        ratio = f"{jax_s / torch_s:>9.2f}" if torch_s else f"{'-':>9}"
        print(f"{label:>14} | {first:>14.1f} {jax_s:>9.3f} | {torch_s or float('nan'):>9.3f} | {ratio}", flush=True)
    (a, ta), (w, tw) = rows[1.0], rows[args.end]
    saved = f"sd-jax {1 - w / a:.0%}" + (f", diffusers {1 - tw / ta:.0%}" if ta and tw else "")
    print(f"time saved by the window: {saved}")


if __name__ == "__main__":
    main()
