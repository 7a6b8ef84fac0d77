"""VAE decode: sd-jax (jit) vs diffusers PyTorch on the same random weights, same process.

    python benchmarks/bench_vae.py                       # SD 1.5 VAE, 1 x 64x64 latents -> 512x512
    python benchmarks/bench_vae.py --size 32 --iters 5   # quicker (256x256)
    python benchmarks/bench_vae.py --dtype bfloat16

Reports JAX compile time separately, steady-state median ms of both, their ratio, the XLA FLOP
count of the compiled decode (``cost_analysis()``) and the achieved GFLOP/s, plus the max abs
difference of the two outputs as a sanity check.  ``--skip-torch`` times only JAX.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.policy import Policy
from sd_jax.models.vae import AutoencoderKL, VAEConfig, param_shapes
from sd_jax.weights.convert import state_dict_to_params


def flops_of(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports costs
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return float(ca["flops"]) if ca and "flops" in ca else None


def timeit(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, ts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=64, help="latent height = width (64 -> 512 px for SD 1.5)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--attention", default="xla", help="sd_jax attention implementation")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)

    import torch
    from diffusers import AutoencoderKL as TorchVAE

    cfg = VAEConfig.sd15()
    torch.manual_seed(args.seed)
    tvae = TorchVAE.from_config(cfg.to_dict()).eval()
    tdtype = getattr(torch, args.dtype)
    if tdtype != torch.float32:
        tvae = tvae.to(tdtype)
    jdtype = jnp.dtype(args.dtype)

    model = AutoencoderKL(cfg, policy=Policy(jdtype, jdtype, args.attention))
    sd = {k: v.float().numpy() for k, v in tvae.state_dict().items()}
    params = state_dict_to_params(sd, param_shapes(model), what="vae", dtype=jdtype)
    params = jax.device_put(params)

    z = np.random.RandomState(args.seed).randn(args.batch, args.size, args.size, cfg.latent_channels)
    z = z.astype(np.float32)
    zj = jax.device_put(jnp.asarray(z, jdtype))

    dec = jax.jit(lambda p, x: model.apply({"params": p}, x, method=AutoencoderKL.decode))
    t = time.perf_counter()
    lowered = dec.lower(params, zj)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    flops = flops_of(compiled)

    out = {}
    jax_ms, _ = timeit(lambda: out.__setitem__("y", compiled(params, zj).block_until_ready()),
                       args.iters, args.warmup)
    res = dict(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
               batch=args.batch, latent=args.size, pixels=args.size * cfg.downscale_factor,
               dtype=args.dtype, attention=args.attention, iters=args.iters,
               jax_compile_s=round(compile_s, 2), jax_ms=round(jax_ms, 1),
               xla_gflop=None if flops is None else round(flops / 1e9, 1))
    if flops:
        res["jax_gflops_per_s"] = round(flops / 1e9 / (jax_ms / 1e3), 1)

    if not args.skip_torch:
        zt = torch.from_numpy(z.transpose(0, 3, 1, 2).copy()).to(tdtype)
        with torch.inference_mode():
            torch_ms, _ = timeit(lambda: out.__setitem__("t", tvae.decode(zt).sample), args.iters, args.warmup)
        res.update(torch_ms=round(torch_ms, 1), torch_threads=torch.get_num_threads(),
                   jax_over_torch=round(jax_ms / torch_ms, 2))
        ty = out["t"].float().numpy().transpose(0, 2, 3, 1)
        res["max_abs_diff"] = float(np.max(np.abs(np.asarray(out["y"], np.float32) - ty)))

    for k, v in res.items():
        print(f"{k:>18}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
