"""One denoising step with a ControlNet: sd-jax (jit) vs diffusers PyTorch, same process.

SD 1.5's configuration (UNet 860M, ControlNet 361M parameters, 768-wide context), batch 2
(classifier-free guidance), 77 tokens; latents ``--size`` (default 32x32, i.e. 256x256 px:
reduced from SD 1.5's 64x64 to fit a shared 2-core VM), the control image 8x that.  For each
side: the plain UNet step and the step with the ControlNet (ControlNet, then the UNet with its
residuals), so the ControlNet's overhead is read in both.  Median wall and process-CPU time
per call over ``--iters`` calls after a warm-up.

The sides run one after the other (sd-jax first, its arrays freed before PyTorch builds its
models) so that only one copy of the weights is in memory (~5 GB in float32); each side has
its own random weights (the speed of a network does not depend on its weights' values).

    python benchmarks/bench_controlnet.py                 # SD 1.5 config, float32, CPU, 32x32 latents
    python benchmarks/bench_controlnet.py --size 64       # 512 px
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=32, help="latent height = width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--ctx", type=int, default=77)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    return p.parse_args()


def timed(fn, iters):
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(iters):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def bench_jax(args, x, t, ctx, img):
    import jax
    import jax.numpy as jnp

    from sd_jax.diffusion.denoisers import Conditioning, controlnet_residuals, unet_denoiser
    from sd_jax.models.controlnet import ControlNetConfig, ControlNetModel
    from sd_jax.models.unet import UNet2DConditionModel, UNetConfig

    ucfg = UNetConfig.sd15()
    unet, net = UNet2DConditionModel(ucfg), ControlNetModel(ControlNetConfig.from_unet(ucfg))
    # jit so the random parameters are made by XLA, not op by op.
    up = jax.jit(lambda k: unet.init(k, *unet.dummy_inputs())["params"])(jax.random.PRNGKey(0))
    cp = jax.jit(lambda k: net.init(k, *net.dummy_inputs())["params"])(jax.random.PRNGKey(1))
    b = x.shape[0]
    control = {"image": (jnp.asarray(img),), "scale": jnp.ones((b, 1)), "keep": jnp.ones((b, 1, 1))}
    cond = Conditioning(context=jnp.asarray(ctx), control=control)

    def step(params, x, t, with_control):
        res = controlnet_residuals([net], [params["cn"]]) if with_control else None
        return unet_denoiser(unet, params["unet"], cond, res)(x, t, jnp.int32(0))

    params = {"unet": up, "cn": cp}
    out = {}
    for name, with_control in (("plain", False), ("controlnet", True)):
        t0 = time.perf_counter()
        f = jax.jit(step, static_argnums=3).lower(params, x, t[0], with_control).compile()
        compile_s = time.perf_counter() - t0
        wall, cpu = timed(lambda: f(params, x, t[0]).block_until_ready(), args.iters)
        out[name] = (wall, cpu, compile_s)
        print(f"sd-jax  {name:10s}: {wall * 1e3:8.0f} ms wall, {cpu * 1e3:8.0f} ms CPU (compile {compile_s:.1f} s)",
              flush=True)
    return out


def bench_torch(args, x, t, ctx, img):
    import diffusers
    import torch

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(cross_attention_dim=768).eval()  # SD 1.5's config
    cn = diffusers.ControlNetModel(cross_attention_dim=768).eval()  # lllyasviel/sd-controlnet-*'s
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    it = torch.from_numpy(img.transpose(0, 3, 1, 2).copy())
    tt, ct = torch.from_numpy(t), torch.from_numpy(ctx)

    def plain():
        with torch.inference_mode():
            return unet(xt, tt, ct).sample

    def controlled():
        with torch.inference_mode():
            down, mid = cn(xt, tt, ct, it, conditioning_scale=1.0, return_dict=False)
            return unet(xt, tt, ct, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    out = {}
    for name, fn in (("plain", plain), ("controlnet", controlled)):
        wall, cpu = timed(fn, args.iters)
        out[name] = (wall, cpu)
        print(f"PyTorch {name:10s}: {wall * 1e3:8.0f} ms wall, {cpu * 1e3:8.0f} ms CPU", flush=True)
    return out


def main():
    args = parse()
    import numpy as np
    rng = np.random.default_rng(0)
    b, s = args.batch, args.size
    x = rng.standard_normal((b, s, s, 4)).astype(np.float32)
    t = np.full((b,), 981.0, np.float32)
    ctx = rng.standard_normal((b, args.ctx, 768)).astype(np.float32)
    img = rng.uniform(0, 1, (b, 8 * s, 8 * s, 3)).astype(np.float32)
    print(f"SD 1.5 UNet + ControlNet, batch {b}, {s}x{s} latents ({8 * s} px), {args.ctx} tokens, float32")
    j = bench_jax(args, x, t, ctx, img)
    gc.collect()
    if args.no_torch:
        return
    p = bench_torch(args, x, t, ctx, img)
    print("\n| | sd-jax ms | PyTorch ms | ratio |\n|---|---|---|---|")
    for name in ("plain", "controlnet"):
        print(f"| {name} step (wall) | {j[name][0] * 1e3:.0f} | {p[name][0] * 1e3:.0f} | {j[name][0] / p[name][0]:.2f} |")
    for side, r in (("sd-jax", j), ("PyTorch", p)):
        print(f"{side}: the ControlNet adds {100 * (r['controlnet'][0] / r['plain'][0] - 1):.0f}% to a step (wall), "
              f"{100 * (r['controlnet'][1] / r['plain'][1] - 1):.0f}% (CPU)")


if __name__ == "__main__":
    main()
