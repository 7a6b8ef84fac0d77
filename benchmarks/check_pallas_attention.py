"""Every attention shape of SD 1.x, SD 2.x and SDXL through the Pallas kernel, against the
plain formulation, in Pallas interpret mode on the CPU (and lowered for TPU).

The kernel treats every (batch, head) pair alike, so each distinct (query tokens, key tokens,
head size) is checked once at batch 1 with 2 heads, in float32 (max abs error <= 1e-5).
Shapes: the UNet's self-attention (latent tokens at each attention level) and cross-attention
(77 text tokens), and the VAE's mid-block attention (one 512-wide head over the latent
tokens), at each model's usual sizes (SDXL: its aspect-ratio buckets).

    PYTHONPATH=$PWD python benchmarks/check_pallas_attention.py               # all (minutes)
    PYTHONPATH=$PWD python benchmarks/check_pallas_attention.py --max-tokens 1024   # quick
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.models.attention import _xla
from sd_jax.models.pallas_attention import flash_attention
from sd_jax.models.unet import UNetConfig

SIZES = {
    "sd1": (UNetConfig.sd15(), [(512, 512), (512, 768), (768, 512), (768, 768)]),
    "sd2": (UNetConfig.sd21(), [(512, 512), (768, 768), (768, 1024), (1024, 768)]),
    "sdxl": (UNetConfig.sdxl(), [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216),
                                 (1344, 768), (768, 1344), (1536, 640), (640, 1536)]),
}
TEXT_TOKENS = 77
VAE_HEAD = 512   # the SD/SDXL VAE's mid-block attention: one head of its 512 channels


def attention_shapes(cfg: UNetConfig, height: int, width: int) -> set[tuple[int, int, int]]:
    """(Lq, Lk, head size) of every attention in the UNet and the VAE at ``width x height``."""
    h, w = height // 8, width // 8
    n = len(cfg.block_out_channels)
    levels = {i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t}
    levels |= {n - 1 - i for i, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
    if cfg.mid_block_type is not None:
        levels.add(n - 1)
    out = {(h * w, h * w, VAE_HEAD)}
    for i in levels:
        tokens = -(-h // 2 ** i) * -(-w // 2 ** i)
        d = cfg.block_out_channels[i] // cfg.heads[i]
        out |= {(tokens, tokens, d), (tokens, TEXT_TOKENS, d)}
    return out


def reference(q, k, v, rows=1024):
    """The plain formulation, a block of query rows at a time (exact per row; bounded memory)."""
    f = jax.jit(lambda q: _xla(q, k, v, None, q.shape[-1] ** -0.5))
    return jnp.concatenate([f(q[:, i:i + rows]) for i in range(0, q.shape[1], rows)], axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sd1,sd2,sdxl")
    ap.add_argument("--max-tokens", type=int, default=None, help="skip shapes with more query tokens")
    args = ap.parse_args()
    shapes = {}
    for name in args.models.split(","):
        cfg, sizes = SIZES[name]
        for hw in sizes:
            for s in attention_shapes(cfg, *hw):
                shapes.setdefault(s, []).append(f"{name} {hw[1]}x{hw[0]}")
    rng = np.random.default_rng(0)
    worst = 0.0
    print(f"{len(shapes)} distinct shapes; jax {jax.__version__} on {jax.default_backend()}")
    for (lq, lk, d) in sorted(shapes):
        if args.max_tokens and lq > args.max_tokens:
            continue
        q = jnp.asarray(rng.standard_normal((1, lq, 2, d)), jnp.float32)
        k = jnp.asarray(2 * rng.standard_normal((1, lk, 2, d)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((1, lk, 2, d)), jnp.float32)
        t = time.perf_counter()
        out = flash_attention(q, k, v, interpret=True).block_until_ready()
        t = time.perf_counter() - t
        err = float(jnp.max(jnp.abs(out - reference(q, k, v))))
        tpu = jax.jit(lambda q, k, v: flash_attention(q, k, v, interpret=False)).trace(
            q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)).lower(
            lowering_platforms=("tpu",))
        assert "tpu_custom_call" in tpu.as_text()
        worst = max(worst, err)
        print(f"Lq {lq:6d} Lk {lk:6d} D {d:4d}  max|err| {err:.2e}  interpret {t:6.1f} s  "
              f"({', '.join(shapes[(lq, lk, d)][:3])}{' ...' if len(shapes[(lq, lk, d)]) > 3 else ''})")
        assert err <= 1e-5, (lq, lk, d, err)
    print(f"all within 1e-5 (worst {worst:.2e}); every shape lowers for TPU")


if __name__ == "__main__":
    main()
