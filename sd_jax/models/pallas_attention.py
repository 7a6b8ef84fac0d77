"""Flash attention as a Pallas TPU kernel, for the shapes Stable Diffusion uses.

JAX's own TPU kernels (``jax.experimental.pallas.ops.tpu.flash_attention`` and splash
attention) need head sizes that are multiples of 128 and sequence lengths that are
multiples of their blocks, and have no interpret mode to test them off a TPU.  Stable
Diffusion's heads are 40/80/160 wide (SD 1.x), 64 (SD 2.x, SDXL) or 512 (the VAE's one
head), and its cross-attention keys are 77 text tokens.  This kernel handles those by
padding, and runs in Pallas interpret mode on any backend (how the tests prove it):

* the head size is zero-padded to a multiple of 128 (TPU vector lanes): zero columns add
  nothing to ``q . k``, and zero columns of ``v`` give zero output columns, sliced off;
  the softmax scale stays ``1/sqrt(D)`` of the real size;
* the queries are zero-padded to a whole number of query blocks (rows sliced off);
* the keys are padded to a whole number of key blocks of a multiple of 128, and the
  padded keys are masked in the last block (77 -> 128 keys, one block).

The kernel is the online-softmax flash attention of Dao et al. 2022 (FlashAttention,
Algorithm 1): a grid over (batch, head, query block, key block), the key-block axis
innermost and sequential, with the running row maximum ``m``, denominator ``l`` and
un-normalised output in VMEM scratch, normalised after the last key block.  Scores and
softmax are float32 whatever the input dtype (as :func:`sd_jax.models.attention._xla`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sd_jax.sharding import target_platform

LANES = 128          # TPU vector lanes: head sizes and key blocks are padded to multiples
SUBLANES = 8         # query blocks are multiples of this
BLOCK_Q = 512        # default query rows per block
BLOCK_K = 512        # default keys per block
# Masked scores: finite (an all-masked row never occurs, but inf - inf would be NaN).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_sizes(lq: int, lk: int, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> tuple[int, int]:
    """The (query, key) block sizes used for ``lq`` queries and ``lk`` keys: at most
    ``block_q`` / ``block_k``, a multiple of 8 / 128, no larger than the padded length."""
    if block_q % SUBLANES or block_k % LANES:
        raise ValueError(f"block_q must be a multiple of {SUBLANES} and block_k of {LANES}, "
                         f"got {block_q} and {block_k}")
    return min(block_q, _round_up(lq, SUBLANES)), min(block_k, _round_up(lk, LANES))


def _kernel(q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, scale, kv_len, block_k, n_k):
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    # [bq, D] x [bk, D] -> [bq, bk] float32 scores.
    s = jax.lax.dot_general(q_ref[...], k_ref[...], (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * scale
    if kv_len % block_k:  # static: the last block holds padded keys (all others are whole)
        col = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(col < kv_len, s, _MASK_VALUE)
    # m and l are kept [bq, 128] (every lane equal), the layout TPU vregs hold.
    m_prev = m_sc[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)            # rescales what earlier blocks summed
    p = jnp.exp(s - m_next[:, :1])
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_sc[...] = acc_sc[...] * alpha[:, :1] + jnp.dot(p.astype(v.dtype), v,
                                                       preferred_element_type=jnp.float32)
    m_sc[...] = m_next

    @pl.when(j == n_k - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...][:, :1]).astype(o_ref.dtype)


def flash_attention(q, k, v, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                    interpret: bool | None = None):
    """Unmasked multi-head attention with the Pallas kernel.

    Args:
      q: [B, Lq, H, D]; k, v: [B, Lk, H, D] (same dtype; output has it).  Any D, Lq, Lk.
      block_q, block_k: query rows and keys per block (multiples of 8 and 128).
      interpret: run in Pallas interpret mode; None: everywhere except on a TPU (the
        kernel is written for TPUs; elsewhere interpret mode is for testing, and slow).
    Returns:
      [B, Lq, H, D], ``softmax(q k^T / sqrt(D)) v`` per head.
    """
    if interpret is None:   # decided here, not under the jit: the target is part of its cache key
        interpret = _off_tpu()
    return _differentiable(q, k, v, block_q, block_k, bool(interpret))


def _off_tpu() -> bool:
    return target_platform() != "tpu"


# The kernel above has no backward of its own: its gradient is JAX's TPU flash attention's
# (forward recomputed by that kernel, then its dq / dkv kernels), so a model using it trains
# with flash memory (no score matrix stored) at the cost of one more attention forward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _differentiable(q, k, v, block_q, block_k, interpret):
    return _flash_attention(q, k, v, block_q=block_q, block_k=block_k, interpret=interpret)


def _differentiable_fwd(q, k, v, block_q, block_k, interpret):
    return _flash_attention(q, k, v, block_q=block_q, block_k=block_k, interpret=interpret), (q, k, v)


def _differentiable_bwd(block_q, block_k, interpret, residuals, g):
    _, vjp = jax.vjp(lambda q, k, v: tpu_flash_attention(q, k, v, interpret=interpret), *residuals)
    return vjp(g)


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def _tpu_block(length: int, most: int = 512) -> int:
    """The largest of 512 / 256 / 128 that divides ``length`` (a multiple of 128)."""
    return next(b for b in (most, 256, 128) if b <= most and length % b == 0)


def tpu_flash_attention(q, k, v, *, interpret: bool | None = None):
    """JAX's Pallas TPU flash attention (``jax.experimental.pallas.ops.tpu.flash_attention``:
    forward, dq and dkv kernels, so differentiable with flash memory) at any SD shape.

    That kernel wants [B, H, L, D] with sequence lengths in whole 128-blocks and head sizes of
    at most 128 or a multiple of it: heads of 160 (SD 1.x's last level) are zero-padded to 256
    (zero columns change no score and give zero output columns), queries to a whole block
    (rows sliced off), and keys to a whole block, the padded keys masked with segment ids
    (77 text tokens -> 128).  ``interpret`` (default: off a TPU) runs the kernels in Pallas's
    TPU interpret mode; a backward pass traced off a TPU needs the whole differentiation inside
    ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (as the tests do).
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D].  Returns [B, Lq, H, D]."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    if interpret is None:
        interpret = _off_tpu()
    b, lq, h, d = q.shape
    lk = k.shape[1]
    dp = d if d <= LANES else _round_up(d, LANES)
    lqp, lkp = _round_up(lq, LANES), _round_up(lk, LANES)

    def prep(x, length):  # [B, L, H, D] -> [B, H, L_padded, D_padded]
        x = x.transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, dp - d)))

    seg = None
    if lkp != lk:
        seg = fa.SegmentIds(q=jnp.ones((b, lqp), jnp.int32),
                            kv=jnp.broadcast_to((jnp.arange(lkp) < lk).astype(jnp.int32), (b, lkp)))
    bq, bk = _tpu_block(lqp), _tpu_block(lkp)
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1, block_q_major_dkv=bq,
                           block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq, block_k_major_dq=bk,
                           block_k_dq=bk, block_q_dq=bq)

    def call():
        return fa.flash_attention(prep(q, lqp), prep(k, lkp), prep(v, lkp), segment_ids=seg, sm_scale=d ** -0.5,
                                  block_sizes=blocks)
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = call()
    else:
        out = call()
    return out[:, :, :lq, :d].transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
def _flash_attention(q, k, v, *, block_q: int, block_k: int, interpret: bool):
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bq, bk = block_sizes(lq, lk, block_q, block_k)
    dp, lqp, lkp = _round_up(d, LANES), _round_up(lq, bq), _round_up(lk, bk)

    def prep(x, length):  # [B, L, H, D] -> [B, H, L_padded, D_padded]
        x = x.transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, dp - d)))

    qp, kp, vp = prep(q, lqp), prep(k, lkp), prep(v, lkp)
    n_q, n_k = lqp // bq, lkp // bk
    kernel = functools.partial(_kernel, scale=1.0 / math.sqrt(d), kv_len=lk, block_k=bk, n_k=n_k)
    sq = pl.Squeezed()
    q_spec = pl.BlockSpec((sq, sq, bq, dp), lambda bi, hi, i, j: (bi, hi, i, 0))
    kv_spec = pl.BlockSpec((sq, sq, bk, dp), lambda bi, hi, i, j: (bi, hi, j, 0))
    out = pl.pallas_call(
        kernel,
        grid=(b, h, n_q, n_k),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, dp), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="sd_jax_flash_attention",
    )(qp, kp, vp)
    return out[:, :, :lq, :d].transpose(0, 2, 1, 3)
