"""Where the SD 1.5 pipeline's compile time goes: trace, lower and XLA compile of the whole
generation function, its parts, and a second process's start with the persistent cache.

    python benchmarks/bench_compile.py                        # 512x512, 20 steps, batch 1, the model's PNDM
    python benchmarks/bench_compile.py --parts                # + text encoder / UNet step / VAE decode alone
    python benchmarks/bench_compile.py --cache-startup        # + two new processes sharing a new cache
    python benchmarks/bench_compile.py --first-image          # + one generation with random weights (slow on CPU)
    python benchmarks/bench_compile.py --size 64 --steps 2    # quick check that it works

The SD 1.5 architecture at its real widths (``families.SD1`` variant ``sd15``).  The
parameters are ``jax.ShapeDtypeStruct`` s (abstract: no memory, no download): tracing,
lowering and compiling need only their shapes, and a compiled program does not depend on
the values it is later called with.  ``--first-image`` draws random weights (4.3 GB in
float32) to run the compiled program once.

Prints, for ``jax.jit(generate).trace(params, batch)``, ``.lower()`` and ``.compile()``
(timed separately, compiled with the persistent cache off): seconds, the jaxpr's equation
count (sub-jaxprs included: a scan body counts once) and how many times the UNet, the text
encoder and the VAE decoder were traced into it (Flax's name stack in the
jaxpr: :func:`sd_jax.jaxpr_stats.network_traces`), and the StableHLO size.
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


def build(size: int, steps: int, batch: int, scheduler: str | None, guidance: float, attention: str = "xla"):
    """(jitted generation function, abstract params, batch) for SD 1.5 at ``size`` px."""
    import jax

    from sd_jax import families, pipeline, sharding
    from sd_jax.diffusion.samplers import SchedulerConfig
    from sd_jax.request import GenerationRequest
    from sd_jax.weights.single_file import tokenizer_for

    fam = families.get("sd1")
    cfg = fam.configs("sd15")
    models = families.build_models(fam, cfg, attention=attention)
    pipe = pipeline.StableDiffusionPipeline(models, {}, tokenizer_for("sd1"), SchedulerConfig.from_dict(cfg["scheduler"]),
                                            fam.default_sampler, family=fam)
    params = {c.name: c.param_shapes(getattr(models, c.name)) for c in fam.components}
    r, plan = pipe.resolve(GenerationRequest("a photograph of an astronaut riding a horse", steps=steps, height=size,
                                             width=size, scheduler=scheduler, guidance=guidance))
    n = sharding.padded_size(batch, pipe.mesh)
    inputs = {k: sharding.pad_batch(v, n) for k, v in pipe._inputs(plan, [r] * batch).items()}
    plan = pipe._vae_tiled(plan, n)
    fn = jax.jit(lambda p, b: pipeline._generate(models, fam.prompt, plan, p, b))
    return fn, params, inputs, plan


def measure(args) -> dict:
    import jax

    from sd_jax import jaxpr_stats
    fn, params, inputs, plan = build(args.size, args.steps, args.batch, args.scheduler, args.guidance, args.attention)
    t0 = time.perf_counter()
    traced = fn.trace(params, inputs)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2, c2 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t3, c3 = time.perf_counter(), time.process_time()
    text = lowered.as_text(debug_info=True)
    out = {"size": args.size, "steps": args.steps, "batch": args.batch, "scheduler": plan.sampler.name,
           "scan_steps": plan.sampler.num_steps, "guidance": plan.guidance,
           "trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "compile_cpu_s": c3 - c2,
           "jaxpr_eqns": jaxpr_stats.count_equations(traced.jaxpr), "stablehlo_mb": len(text) / 1e6,
           "traces": jaxpr_stats.network_traces(traced.jaxpr), "backend": jax.default_backend()}
    if args.first_image:
        import numpy as np
        rng = np.random.default_rng(0)
        real = jax.tree.map(lambda s: (rng.standard_normal(s.shape, np.float32) * 0.02).astype(s.dtype), params)
        t = time.perf_counter()
        jax.block_until_ready(compiled(real, inputs))
        out["first_call_s"] = time.perf_counter() - t
    return out


def parts(args) -> dict:
    """Compile time of each network alone at the shapes generation calls it with."""
    import jax
    import jax.numpy as jnp

    from sd_jax import families
    fam = families.get("sd1")
    cfg = fam.configs("sd15")
    m = families.build_models(fam, cfg, attention=args.attention)
    rows = args.batch * (2 if args.guidance > 1 else 1)
    lat = args.size // 8
    S = jax.ShapeDtypeStruct
    jobs = {"text_encoder": (lambda p, ids: m.text_encoder.apply({"params": p}, ids),
                             m.text_encoder.param_shapes(), S((rows, 77), jnp.int32)),
            "unet_step": (lambda p, x, t, c: m.unet.apply({"params": p}, x, t, c), m.unet.param_shapes(),
                          S((rows, lat, lat, 4), jnp.float32), S((), jnp.int32), S((rows, 77, 768), jnp.float32)),
            "vae_decode": (lambda p, z: m.vae.apply({"params": p}, z, method="decode"),
                           fam.component("vae").param_shapes(m.vae), S((args.batch, lat, lat, 4), jnp.float32))}
    out = {}
    for name, (f, *a) in jobs.items():
        t0 = time.perf_counter()
        lowered = jax.jit(f).trace(*a).lower()
        t1, c1 = time.perf_counter(), time.process_time()
        lowered.compile()
        out[name] = {"trace_lower_s": t1 - t0, "compile_s": time.perf_counter() - t1,
                     "compile_cpu_s": time.process_time() - c1}
    return out


# A new process: import, build, trace, lower, compile (a persistent-cache hit if it is warm).
STARTUP = r"""
import json, sys, time
t0 = time.perf_counter()
import jax
hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
from sd_jax.pipeline import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
sys.path.insert(0, sys.argv[2])
import bench_compile as b
size, steps, batch, guidance = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
t1, c1 = time.perf_counter(), time.process_time()
fn, params, inputs, plan = b.build(size, steps, batch, sys.argv[7] or None, guidance, sys.argv[8])
t2, c2 = time.perf_counter(), time.process_time()
lowered = fn.trace(params, inputs).lower()
t3, c3 = time.perf_counter(), time.process_time()
lowered.compile()
t4, c4 = time.perf_counter(), time.process_time()
print(json.dumps({"compile_cpu_s": c4 - c3, "cpu_s": c4, "import_cpu_s": c1, "build_cpu_s": c2 - c1,
                  "trace_lower_cpu_s": c3 - c2, "import_s": t1 - t0, "build_s": t2 - t1, "trace_lower_s": t3 - t2, "compile_s": t4 - t3,
                  "total_s": t4 - t0, "cache_hit": bool(hits)}))
"""


def cache_startup(args) -> list:
    """Two new processes sharing a new persistent cache: the first compiles, the second loads."""
    cache = tempfile.mkdtemp(prefix="sdjax-compile-cache-")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", STARTUP, cache, HERE, str(args.size), str(args.steps),
                            str(args.batch), str(args.guidance), args.scheduler or "", args.attention],
                           capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--scheduler", default=None, help="default: the model's (PNDM for SD 1.5)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--cache-startup", action="store_true")
    ap.add_argument("--first-image", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = ap.parse_args()
    import jax
    jax.config.update("jax_enable_compilation_cache", False)  # cold: nothing read from or written to a cache
    res = {"whole": measure(args)}
    if args.parts:
        res["parts"] = parts(args)
    if args.cache_startup:
        res["startup"] = cache_startup(args)
    if args.json:
        print(json.dumps(res))
        return
    w = res["whole"]
    print(f"SD 1.5, {w['size']}x{w['size']}, {w['steps']} steps ({w['scheduler']}, {w['scan_steps']} scan steps), "
          f"batch {w['batch']}, guidance {'on' if w['guidance'] else 'off'}, backend {w['backend']}")
    print(f"trace {w['trace_s']:.1f}s, lower {w['lower_s']:.1f}s, XLA compile {w['compile_s']:.1f}s "
          f"({w['compile_cpu_s']:.1f}s CPU); "
          f"{w['jaxpr_eqns']} jaxpr equations, {w['stablehlo_mb']:.1f} MB StableHLO (with locations); "
          f"traced: {w['traces']}")
    if "first_call_s" in w:
        print(f"first call (random weights): {w['first_call_s']:.1f}s")
    for name, p in res.get("parts", {}).items():
        print(f"  {name:13s} trace+lower {p['trace_lower_s']:.1f}s, compile {p['compile_s']:.1f}s ({p['compile_cpu_s']:.1f}s CPU)")
    for i, s in enumerate(res.get("startup", [])):
        print(f"new process {i + 1} ({'cache hit' if s['cache_hit'] else 'compiled'}): import {s['import_s']:.1f}s "
              f"({s['import_cpu_s']:.1f}s CPU), build {s['build_s']:.1f}s ({s['build_cpu_s']:.1f}s CPU), "
              f"trace+lower {s['trace_lower_s']:.1f}s ({s['trace_lower_cpu_s']:.1f}s CPU), compile/load {s['compile_s']:.1f}s "
              f"({s['compile_cpu_s']:.1f}s CPU), total {s['total_s']:.1f}s ({s['cpu_s']:.1f}s CPU)")


if __name__ == "__main__":
    main()
