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


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "interpret"))
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
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
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
