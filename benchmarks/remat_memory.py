"""Does per-block remat lower a UNet gradient's compiled memory?  (XLA's memory analysis; nothing runs)

    python benchmarks/remat_memory.py --model sd15 --side 64 --remat none checkpoint ordered

Compiles the gradient of a UNet's mean squared output (the full SD 1.5 or SDXL UNet, bf16
compute, float32 parameters, XLA's attention: what a TPU traces) for one image of
``side x side`` latents on this machine's default device, and prints one JSON line per remat
mode with XLA's argument, output and temporary bytes:

* ``none``: no remat;
* ``checkpoint``: ``jax.checkpoint`` (``nn.remat``) on every ResNet and transformer block;
* ``ordered``: sd-jax's remat (:func:`sd_jax.train.losses.remat_blocks`), whose recomputation
  waits for the cotangent.

On the CPU, ``checkpoint`` measures the same as ``none``: XLA's CPU pipeline removes the
optimization barriers that order the recomputation.  Each compile takes 1-2 minutes (SD 1.5)
or 10-25 (SDXL) on two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from sd_jax.models import unet as unet_lib  # noqa: E402
from sd_jax.models.policy import Policy  # noqa: E402
from sd_jax.train.losses import remat_blocks  # noqa: E402

GiB = 2 ** 30


def measure(model: str, side: int, remat: str) -> dict:
    policy = Policy(jnp.bfloat16, param_dtype=jnp.float32, attention="xla", cpu_lowerings=False)
    cfg = unet_lib.UNetConfig.sd15() if model == "sd15" else unet_lib.UNetConfig.sdxl()
    un = unet_lib.UNet2DConditionModel(cfg, policy=policy)
    bf16 = jnp.bfloat16
    x = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), bf16)
    ctx = jax.ShapeDtypeStruct((1, 77, cfg.cross_dims[0]), bf16)
    added = None
    if model == "sdxl":
        added = {"text_embeds": jax.ShapeDtypeStruct((1, 1280), bf16), "time_ids": jax.ShapeDtypeStruct((1, 6), jnp.float32)}

    def loss(p, x, c, added):
        def f(p, x, c):
            return un.apply({"params": p}, x, jnp.array([500]), c, *([added] if added is not None else []))
        out = (f if remat == "none" else remat_blocks(f, how=remat))(p, x, c)
        return jnp.mean(out.astype(jnp.float32) ** 2)

    t = time.time()
    jitted = jax.jit(jax.grad(loss), compiler_options={"xla_backend_optimization_level": 0})
    m = jitted.lower(un.param_shapes(), x, ctx, added).compile().memory_analysis()
    return {"model": model, "latents": side, "remat": remat, "arguments_GiB": round(m.argument_size_in_bytes / GiB, 3),
            "outputs_GiB": round(m.output_size_in_bytes / GiB, 3), "temp_GiB": round(m.temp_size_in_bytes / GiB, 3),
            "compile_s": round(time.time() - t, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    ap.add_argument("--side", type=int, default=64, help="latent side (64 = 512x512 pixels)")
    ap.add_argument("--remat", nargs="+", choices=["none", "checkpoint", "ordered"],
                    default=["none", "checkpoint", "ordered"])
    a = ap.parse_args(argv)
    for how in a.remat:
        print(json.dumps(measure(a.model, a.side, how)), flush=True)


if __name__ == "__main__":
    main()
