"""Prompt editing and alternation inside the compiled sampling loop.

Every distinct text of a prompt's schedule (:mod:`sd_jax.prompts.schedule`) is encoded up
front: the conditioning holds K variants per sample (context [B, K, L, D], pooled [B, K, P]),
and an int32 index [B, S] (traced) says which variant each sampler step uses; the model
function picks it at step ``i``.  K (the most variants of any prompt in the call) is static,
part of the plan, so editing a prompt's steps or words does not recompile.
"""
from __future__ import annotations

import jax.numpy as jnp

from sd_jax.prompts.schedule import step_texts

__all__ = ["variants", "stack", "per_step"]


def variants(text: str, steps: int, num_steps: int, k: int | None = None) -> tuple[list[str], list[int]]:
    """(the distinct texts of ``text``'s schedule, in order of first use, repeated at the end up
    to ``k``; the index of the text each of the ``num_steps`` sampler steps uses)."""
    per_step_text = step_texts(text, steps, num_steps)
    distinct = list(dict.fromkeys(per_step_text))
    index = [distinct.index(t) for t in per_step_text]
    if k is not None:
        distinct += [distinct[-1]] * (k - len(distinct))
    return distinct, index


def stack(cond, k: int):
    """A Conditioning of B * K rows (sample-major) -> context [B, K, L, D], pooled [B, K, P]."""
    def split(x):
        return None if x is None else x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return cond.replace(context=split(cond.context), pooled=split(cond.pooled))


def _pick(cond, index):
    """The variant ``index`` [B] of each sample of a stacked Conditioning."""
    def take(x):
        if x is None:
            return None
        idx = index.reshape((-1, 1) + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)[:, 0]
    return cond.replace(context=take(cond.context), pooled=take(cond.pooled))


def per_step(build, cond, uncond, index, neg_index):
    """A model function ``f(x, t, i)`` that runs ``build(cond_i, uncond_i)`` (the ordinary,
    e.g. guided, model function of one conditioning) with each sample's variant of step ``i``:
    ``index`` / ``neg_index`` int32 [B, S] (``uncond`` and ``neg_index`` None without guidance)."""
    def model_fn(x, t, i):
        c = _pick(cond, index[:, i])
        u = None if uncond is None else _pick(uncond, neg_index[:, i])
        return build(c, u)(x, t, i)
    return model_fn
