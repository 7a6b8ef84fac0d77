"""Scaled dot-product attention behind one function with named implementations.

Modules call :func:`dot_product_attention` with the implementation named by their
:class:`~sd_jax.models.policy.Policy` (chosen when the model is loaded).  The names:

``"xla"``      XLA-compiled, scores and softmax in float32.  On GPU (and for small or
               masked problems) a plain einsum + softmax; on CPU, large unmasked
               problems run blocked (see below), 1.4-9x faster there.
``"cudnn"``    ``jax.nn.dot_product_attention(implementation="cudnn")``: fused
               flash attention on NVIDIA GPUs (fp16/bf16 only).
``"chunked"``  queries processed in chunks with ``lax.map`` so the score matrix
               never exceeds ``chunk x Lk`` per head: memory-saving for large images.
``"pallas"``   flash attention as a Pallas TPU kernel of our own
               (:mod:`sd_jax.models.pallas_attention`): any head size (zero-padded to a
               multiple of 128) and key count (padded to a block, masked); masked or causal
               attention goes to ``"xla"``.  Off a TPU it runs in Pallas interpret mode:
               exact but slow, for tests.  Differentiable: its backward is ``"flash"``'s.
``"flash"``    JAX's own Pallas TPU flash attention (forward and backward kernels), padded
               and masked to SD's shapes (:func:`sd_jax.models.pallas_attention.tpu_flash_attention`).
``"auto"``     ``"pallas"`` on TPU for unmasked attention; ``"cudnn"`` on GPU for unmasked
               fp16/bf16 attention with a head size cuDNN takes (a multiple of 8, at most
               128); else ``"xla"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sd_jax import sharding
from sd_jax.models.pallas_attention import flash_attention, tpu_flash_attention

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "pallas", "flash")

# CPU blocking.  Materialising [B, H, Lq, Lk] float32 scores (1 GiB for SD's 4096-token
# self-attention at batch 2) makes every softmax pass a trip to DRAM, and each fresh
# buffer that large is page-faulted in on every call.  Instead one (batch*head,
# query-block) pair is done at a time in a loop, with the block's scores (block x Lk
# float32, <= 8 MiB) cache-resident; XLA:CPU compiles each block (matmul, row max, exp,
# matmul) into a single YNNPACK fusion.  The softmax is normalised after the second
# matmul, whose ones column after v also yields the denominators (no separate sum).  Measured on a 2-core AVX-512
# Xeon, SD 1.5 shapes at batch 2 (CPU time; PyTorch's fused SDPA in brackets):
# 4096x4096 self-attention 6.0 s -> 0.65 s (0.46 s), 1024x1024 157 -> 76 ms (53 ms),
# 4096x77 cross-attention 57 -> 40 ms (33 ms), 256x256 24 -> 17 ms (11 ms).
_CPU_BLOCK_BYTES = 8 << 20      # float32 scores per block
_CPU_MIN_SCORES = 1 << 18       # below this (B*H*Lq*Lk) the plain path is as fast


def cudnn_missing() -> str | None:
    """Why cuDNN's fused attention cannot run here (None where it can): it needs JAX's CUDA
    backend with cuDNN loaded."""
    backend = jax.default_backend()
    if backend != "gpu":
        return f"JAX runs on {backend} here"
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
    except ImportError:  # a JAX without this private check: let the kernel itself decide
        return None
    try:
        check_cudnn_version()
    except RuntimeError:
        return "this GPU backend has no cuDNN (a ROCm or CPU-only build of jaxlib?)"
    return None


def check_impl(name: str) -> str:
    """``name`` if it is an implementation that can run on this machine, else a ValueError
    (raised when a model is loaded, before anything is compiled)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    if name == "cudnn" and (why := cudnn_missing()):
        raise ValueError(
            f"attention 'cudnn' runs only on NVIDIA GPUs (JAX's CUDA build with cuDNN) and {why}; "
            f"use 'auto' (cuDNN where it works, XLA elsewhere), 'xla' or 'chunked'")
    return name


def _xla(q, k, v, mask, scale):
    # Scores and softmax in float32: at 4096 tokens a bf16 softmax loses visible detail
    # (this is what diffusers' `upcast_attention`/`upcast_softmax` do).
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _blocked(q, k, v, scale, chunk):
    """Exact attention, one (batch*head, query-block) at a time; no mask.  [B, L, H, D]."""
    b, lq, h, d = q.shape
    lk, dv = k.shape[1], v.shape[-1]
    chunk = max(1, min(chunk, lq))
    n = -(-lq // chunk)
    if q.dtype == jnp.float32:       # fold the scale into q (Lq x D multiplies, not Lq x Lk)
        q, scale = q * scale, None
    qh = q.transpose(0, 2, 1, 3).reshape(b * h, lq, d)
    if n * chunk != lq:              # zero rows give finite scores; sliced off below
        qh = jnp.pad(qh, ((0, 0), (0, n * chunk - lq), (0, 0)))
    qh = qh.reshape(b * h, n, chunk, d)
    kh = k.transpose(0, 2, 1, 3).reshape(b * h, lk, d)
    # A column of ones after v: the second matmul also gives the softmax denominator, so
    # the probabilities are read once (D=40 -> 41 costs nothing at SIMD widths of 16).
    vh = jnp.concatenate([v.transpose(0, 2, 1, 3).reshape(b * h, lk, dv),
                          jnp.ones((b * h, lk, 1), v.dtype)], axis=-1)

    def head(args):
        qs, kk, vv = args

        def block(qc):
            s = jnp.dot(qc, kk.T, preferred_element_type=jnp.float32)
            if scale is not None:
                s = s * scale
            e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
            ol = jnp.dot(e.astype(vv.dtype), vv, preferred_element_type=jnp.float32)
            return (ol[:, :dv] / ol[:, dv:]).astype(v.dtype)

        return jax.lax.map(block, qs)

    out = jax.lax.map(head, (qh, kh, vh)).reshape(b * h, n * chunk, dv)[:, :lq]
    return out.reshape(b, h, lq, dv).transpose(0, 2, 1, 3)


def _cpu_block(lk: int) -> int:
    """Query rows per block: a power of two with ~_CPU_BLOCK_BYTES of float32 scores."""
    rows = max(16, _CPU_BLOCK_BYTES // (4 * lk))
    return 1 << (rows.bit_length() - 1)


def _chunked(q, k, v, mask, scale, chunk):
    lq = q.shape[1]
    if mask is None:
        return _blocked(q, k, v, scale, chunk) if lq > chunk else _xla(q, k, v, mask, scale)
    if lq <= chunk or lq % chunk:
        return _xla(q, k, v, mask, scale)
    n = lq // chunk
    qs = q.reshape(q.shape[0], n, chunk, *q.shape[2:]).swapaxes(0, 1)
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], lq, k.shape[1]))
    ms = mask.reshape(mask.shape[0], mask.shape[1], n, chunk, -1).transpose(2, 0, 1, 3, 4)
    out = jax.lax.map(lambda a: _xla(a[0], k, v, a[1], scale), (qs, ms))
    return out.swapaxes(0, 1).reshape(q.shape[:2] + v.shape[2:])


def _resolve(impl: str, dtype, head_dim: int, masked: bool, causal: bool = False) -> str:
    if impl != "auto":
        return impl
    # TPUs have no fused attention in XLA; the Pallas kernel never materialises the scores.
    platform = sharding.target_platform()
    if platform == "tpu" and not (masked or causal):
        return "pallas"
    # cuDNN's fused kernels take half-precision head sizes that are multiples of 8 up to 128
    # (the VAE's single 512-wide head is not one of them); masks other than causal go to XLA.
    if (platform == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and not masked
            and head_dim % 8 == 0 and head_dim <= 128):
        return "cudnn"
    return "xla"


def dot_product_attention(q, k, v, *, impl: str = "xla", mask=None, causal: bool = False,
                          chunk: int = 1024, cpu_lowerings: bool = True):
    """Multi-head attention.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (any float dtype; output has v's dtype).
      impl: one of :data:`IMPLEMENTATIONS`.
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
      causal: add a causal (lower-triangular) mask.
      cpu_lowerings: allow the CPU's blocked lowering of ``"xla"`` (when tracing for the
        CPU); False: the plain formulation, whose XLA cost analysis is the FLOP count
        (a blocked loop's body is counted once).
    Returns:
      [B, Lq, H, D].
    """
    scale = q.shape[-1] ** -0.5
    impl = _resolve(check_impl(impl), q.dtype, q.shape[-1], mask is not None, causal)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            implementation="cudnn")
    if impl == "pallas" and mask is None and not causal:
        return sharding.map_over_batch(flash_attention, q, k, v)   # Mosaic kernels are not auto-partitioned
    if impl == "flash" and mask is None and not causal:
        return sharding.map_over_batch(tpu_flash_attention, q, k, v)
    if causal:
        cm = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = cm if mask is None else jnp.logical_and(mask, cm)
    if impl == "chunked":
        return _chunked(q, k, v, mask, scale, chunk)
    b, lq, h, _ = q.shape
    lk = k.shape[1]
    blocked = cpu_lowerings and sharding.target_platform() == "cpu"
    if mask is None and blocked and b * h * lq * lk >= _CPU_MIN_SCORES:
        return _blocked(q, k, v, scale, _cpu_block(lk))
    return _xla(q, k, v, mask, scale)
