"""Scaled dot-product attention behind one function with named implementations.

Modules call :func:`dot_product_attention` and pass the implementation name
they were configured with (a field of the model config, chosen when the model is
loaded).  The names:

``"xla"``      plain einsum + softmax; scores and softmax in float32.
``"cudnn"``    ``jax.nn.dot_product_attention(implementation="cudnn")``: fused
               flash attention on NVIDIA GPUs (fp16/bf16 only).
``"chunked"``  queries processed in chunks with ``lax.map`` so the score matrix
               never exceeds ``chunk x Lk``: memory-saving for large images.
``"auto"``     ``"cudnn"`` on GPU when the dtype allows it, else ``"xla"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")


def check_impl(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {name!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
    return name


def _xla(q, k, v, mask, scale):
    # Scores and softmax in float32: at 4096 tokens a bf16 softmax loses visible detail
    # (this is what diffusers' `upcast_attention`/`upcast_softmax` do).
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def _chunked(q, k, v, mask, scale, chunk):
    lq = q.shape[1]
    if lq <= chunk or lq % chunk:
        return _xla(q, k, v, mask, scale)
    n = lq // chunk
    qs = q.reshape(q.shape[0], n, chunk, *q.shape[2:]).swapaxes(0, 1)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], lq, k.shape[1]))
        ms = mask.reshape(mask.shape[0], mask.shape[1], n, chunk, -1).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(lambda a: _xla(a[0], k, v, a[1], scale), (qs, ms))
    else:
        out = jax.lax.map(lambda qc: _xla(qc, k, v, None, scale), qs)
    return out.swapaxes(0, 1).reshape(q.shape[:2] + v.shape[2:])


def _resolve(impl: str, dtype) -> str:
    if impl != "auto":
        return impl
    if jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def dot_product_attention(q, k, v, *, impl: str = "xla", mask=None, causal: bool = False,
                          chunk: int = 1024):
    """Multi-head attention.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (any float dtype; output has v's dtype).
      impl: one of :data:`IMPLEMENTATIONS`.
      mask: optional boolean, broadcastable to [B, H, Lq, Lk]; True = attend.
      causal: add a causal (lower-triangular) mask.
    Returns:
      [B, Lq, H, D].
    """
    scale = q.shape[-1] ** -0.5
    impl = _resolve(check_impl(impl), q.dtype)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            implementation="cudnn")
    if causal:
        cm = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))[None, None]
        mask = cm if mask is None else jnp.logical_and(mask, cm)
    if impl == "chunked":
        return _chunked(q, k, v, mask, scale, chunk)
    return _xla(q, k, v, mask, scale)
