"""UNet forward speed: sd-jax (jit) vs diffusers PyTorch, same random weights, same process.

Default: the SD 1.5 UNet, batch 2 (classifier-free guidance), 64x64 latents (512 px),
77-token context -- one denoising step.  Both sides run interleaved so machine load
affects them alike; the ratio is the number to read.  Reports XLA's compile time, its
FLOP count (``cost_analysis``), steady-state median wall ms per call, and the median
process CPU time per call (less sensitive to other processes competing for cores).

    python benchmarks/bench_unet.py                       # SD 1.5, float32, CPU
    python benchmarks/bench_unet.py --dtype bfloat16 --attention auto --no-torch   # GPU
    python benchmarks/bench_unet.py --config sdxl --size 32 --sdxl-depth 2 --iters 3  # SDXL widths, fewer layers

XLA flags: ``--xla-flags "..."`` is appended to XLA_FLAGS before JAX starts.
``--baseline`` times the straight port instead (materialised [B, H, L, L] attention, XLA's
own convolutions, upsample-then-conv), i.e. sd-jax without its CPU lowerings.

Where the time goes (SD 1.5, batch 2, 64x64, float32, 2-core AVX-512 Xeon, XLA profile):
~52% matmuls (projections, feed-forward, im2col'd 16x16/8x8 convolutions), ~22% XLA
convolutions (32x32, 64x64), ~20% the 4096-token self-attention, ~5% elementwise/norms.
The straight port loses mainly in the attention (the 1 GiB score matrix: 6.0 s vs 0.65 s
CPU per layer, PyTorch's fused SDPA 0.46 s) and in 16x16/8x8 convolutions (XLA ~45
GFLOP/s vs ~100 as one matmul).  XLA flags tried, no gain: xla_cpu_prefer_vector_width=512,
xnn/ynn/onednn fusion types, xnn graph fusion, concurrency-optimised scheduler.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="sd15", choices=["sd15", "sd21", "sd15_inpaint", "tiny", "sdxl"])
    p.add_argument("--sdxl-depth", type=int, default=10,
                   help="sdxl: transformer layers of the lowest level and the mid block (SDXL's 10; fewer to fit "
                        "two copies of the weights in memory)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=64, help="latent height = width")
    p.add_argument("--ctx", type=int, default=77, help="context tokens")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention", default="xla", help="sd_jax.models.attention implementation")
    p.add_argument("--iters", type=int, default=5, help="timed calls per side (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-torch", action="store_true", help="time sd-jax only")
    p.add_argument("--torch-threads", type=int, default=0, help="0: PyTorch's default")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    p.add_argument("--baseline", action="store_true",
                   help="the straight port: plain attention, lax convolutions, no polyphase upsampling")
    return p.parse_args()


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def main():
    args = parse()
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sd_jax.models.policy import Policy
    from sd_jax.models.unet import UNet2DConditionModel, UNetConfig
    from sd_jax.weights.convert import state_dict_to_params

    cfg = (UNetConfig.sdxl(transformer_layers_per_block=(1, 2, args.sdxl_depth)) if args.config == "sdxl"
           else getattr(UNetConfig, args.config)())
    dtype = jnp.dtype(args.dtype)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"UNet {args.config}{f' (transformer layers 1/2/{args.sdxl_depth})' if args.config == 'sdxl' else ''}: batch {args.batch}, {args.size}x{args.size} latents, {args.ctx} tokens, "
          f"{args.dtype}, attention={args.attention}{' (BASELINE: straight port)' if args.baseline else ''}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.size, args.size, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((args.batch, args.ctx, cfg.cross_dims[0])).astype(np.float32)
    t = np.full((args.batch,), 981.0, np.float32)
    added = ()  # SDXL's text_time conditioning: pooled text embedding + 6 micro-conditioning ids
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = ({"text_embeds": rng.standard_normal((args.batch, pooled)).astype(np.float32),
                  "time_ids": np.tile(np.float32([1024, 1024, 0, 0, 1024, 1024]), (args.batch, 1))},)
    # The baseline: no CPU-specific lowerings (attention never blocked, XLA's convolutions).
    model = UNet2DConditionModel(cfg, policy=Policy(dtype, dtype, args.attention, cpu_lowerings=not args.baseline))

    tm = None
    t0 = time.perf_counter()
    if args.no_torch:   # random weights straight from the shapes (model.init is slow to compile)
        params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32), dtype),
                              model.param_shapes())
    else:
        import torch
        from diffusers import UNet2DConditionModel as TorchUNet
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        torch.manual_seed(0)
        tm = TorchUNet(**cfg.to_dict()).eval()
        sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
        params = state_dict_to_params(sd, model.param_shapes(), what="unet", dtype=dtype)
        params = jax.tree.map(jnp.asarray, params)
        del sd
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"weights ready in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.size for p in jax.tree.leaves(params)) / 1e6:.0f} M parameters)")

    xj, tj, cj = jnp.asarray(x, dtype), jnp.asarray(t), jnp.asarray(ctx, dtype)
    aj = jax.tree.map(jnp.asarray, added)
    t0 = time.perf_counter()
    lowered = jax.jit(model.apply).lower({"params": params}, xj, tj, cj, *aj)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    xla_flops = _flops(compiled.cost_analysis())
    # XLA counts a while loop's body once, so the blocked attention is undercounted in the
    # compiled program; the model's FLOPs are taken from the plain (unblocked) formulation.
    plain = UNet2DConditionModel(cfg, policy=Policy(dtype, dtype, "xla", "lax", cpu_lowerings=False))
    flops = _flops(jax.jit(plain.apply).trace({"params": params}, xj, tj, cj, *aj)
                   .lower(lowering_platforms=("cpu",)).cost_analysis())
    print(f"sd-jax: trace+lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s; XLA cost_analysis: "
          f"{flops / 1e9:.1f} GFLOP per call (plain formulation; GFLOP/s below use it), "
          f"{xla_flops / 1e9:.1f} GFLOP as compiled (loop bodies counted once)")

    def run_jax():
        return compiled({"params": params}, xj, tj, cj, *aj).block_until_ready()

    if tm is not None:
        import torch
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        tt = torch.from_numpy(t)
        ct = torch.from_numpy(ctx)
        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        if tdt != torch.float32:
            tm = tm.to(tdt)
            xt, ct = xt.to(tdt), ct.to(tdt)

        kw = {"added_cond_kwargs": {k: torch.from_numpy(v).to(tdt) for k, v in added[0].items()}} if added else {}

        def run_torch():
            with torch.inference_mode():
                return tm(xt, tt, ct, **kw).sample

    sides = {"sd-jax": run_jax}
    if tm is not None:
        sides = {"torch": run_torch, "sd-jax": run_jax}
    wall = {k: [] for k in sides}
    cpu = {k: [] for k in sides}
    outs = {}
    for i in range(args.warmup + args.iters):
        for name, fn in sides.items():
            w, c = time.perf_counter(), time.process_time()
            outs[name] = fn()
            w, c = time.perf_counter() - w, time.process_time() - c
            if i >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
            print(f"  {'warmup' if i < args.warmup else 'iter'} {name:7s} {1e3 * w:9.1f} ms wall "
                  f"{1e3 * c:9.1f} ms cpu", flush=True)

    print()
    for name in sides:
        w, c = np.median(wall[name]), np.median(cpu[name])
        print(f"{name:7s} median {1e3 * w:9.1f} ms/call (min {1e3 * min(wall[name]):9.1f}), "
              f"cpu {1e3 * c:9.1f} ms/call, {flops / w / 1e9:6.1f} GFLOP/s")
    if tm is not None:
        rw = np.median(wall["sd-jax"]) / np.median(wall["torch"])
        rc = np.median(cpu["sd-jax"]) / np.median(cpu["torch"])
        ref = outs["torch"].float().numpy().transpose(0, 2, 3, 1)
        diff = float(np.abs(np.asarray(outs["sd-jax"], np.float32) - ref).max())
        print(f"ratio sd-jax / torch: wall {rw:.2f}, cpu {rc:.2f} (<1: sd-jax faster); "
              f"max |diff| {diff:.2e} (output max {np.abs(ref).max():.2f})")


if __name__ == "__main__":
    sys.exit(main())
