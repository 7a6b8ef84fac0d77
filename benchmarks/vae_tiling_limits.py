"""The largest image and batch that fit per device memory size, untiled and with the tiled VAE,
from sd_jax.memory's estimate (the terms it counts; weights not included: subtract them).

    PYTHONPATH=$PWD python benchmarks/vae_tiling_limits.py
"""
from __future__ import annotations

from sd_jax import memory
from sd_jax.models.unet import UNetConfig
from sd_jax.models.vae import VAEConfig

GIB = 1 << 30
MODELS = {"SD 1.5": (UNetConfig.sd15(), VAEConfig.sd15(), 512), "SDXL": (UNetConfig.sdxl(), VAEConfig.sdxl(), 1024)}


def fits(unet, vae, limit, side, batch, dtype_bytes, attention, tiled):
    tile = memory.vae_tile("on" if tiled else "off", vae, batch=batch, height=side, width=side,
                           dtype_bytes=dtype_bytes, available_bytes=None, vae_attention=attention)
    est = memory.estimate(unet, vae, batch=batch, height=side, width=side, dtype_bytes=dtype_bytes,
                          unet_attention=attention, vae_attention=attention, vae_tile=tile)
    return est.total <= limit


def main():
    print("| model | dtype, attention | memory | largest square (batch 1), untiled / tiled VAE | "
          "largest batch at native size, untiled / tiled |")
    print("|---|---|---|---|---|")
    for name, (unet, vae, native) in MODELS.items():
        for dtype_bytes, attention, label in ((2, "pallas", "bf16, flash (TPU pallas / GPU cudnn)"),
                                              (2, "xla", "bf16, plain XLA")):
            for gib in (16, 24, 40, 80):
                limit = gib * GIB
                sides = [max((s for s in range(64, 16385, 64)
                              if fits(unet, vae, limit, s, 1, dtype_bytes, attention, t)), default=0)
                         for t in (False, True)]
                batches = [max((b for b in range(1, 513)
                                if fits(unet, vae, limit, native, b, dtype_bytes, attention, t)), default=0)
                           for t in (False, True)]
                print(f"| {name} | {label} | {gib} GiB | {sides[0]} / {sides[1]} px | {batches[0]} / {batches[1]} |")


if __name__ == "__main__":
    main()
