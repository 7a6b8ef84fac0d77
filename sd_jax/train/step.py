"""The compiled train step (gradients, optimizer update, EMA) and cheap compilation for
functions run once."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from sd_jax import sharding
from sd_jax.train import optim

__all__ = ["COMPILER_OPTIONS", "init_state", "init_state_jit", "train_step", "compile_cheap"]

_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _constrain(tree, shard):
    """``tree`` laid out as ``shard`` says: one sharding for every leaf (replicated), or
    :class:`sd_jax.sharding.ParamRules` (each leaf by its name and shape).  At the end of a
    jitted function this is its ``out_shardings``, given by a hashable static argument."""
    return jax.tree.map(jax.lax.with_sharding_constraint, tree, sharding.shardings_for(tree, shard))


def init_state(opt: optim.OptimConfig, shard, params):
    labels = optim.labels_for(params, opt.trainable)
    tx = optim.make_optimizer(opt, labels)
    params = jax.tree.map(lambda p: jnp.copy(p.astype(jnp.float32)) if jnp.issubdtype(p.dtype, jnp.floating)
                          else jnp.copy(p), params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if opt.ema:
        state["ema"] = optim.ema_init(params, labels)
    return _constrain(state, shard)


init_state_jit = jax.jit(init_state, static_argnums=(0, 1))


# Extra XLA options for compiling the train step, e.g. {"xla_backend_optimization_level": 0}:
# on CPU that compiles ~2.5x faster and runs ~2.5x slower, a good trade only for tiny
# models trained a few steps (the tests set it).
COMPILER_OPTIONS: dict = {}


@functools.lru_cache(maxsize=None)
def _train_step_jit(options: tuple):
    return jax.jit(_train_step_fn, static_argnums=(0, 1, 2, 3), donate_argnums=(4,),
                   compiler_options=dict(options) or None)


def train_step(*args):
    return _train_step_jit(tuple(sorted(COMPILER_OPTIONS.items())))(*args)


def _train_step_fn(loss, opt: optim.OptimConfig, seed: int, shard, state, frozen, batch):
    """One batch: gradients, optimizer update, EMA.  Static arguments are hashable, so runs
    with equal settings (and equal shapes and shardings) reuse the compiled program."""
    labels = optim.labels_for(state["params"], opt.trainable)
    tx = optim.make_optimizer(opt, labels)
    key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def objective(p):
        # Frozen leaves behind stop_gradient: XLA does not compute their gradients at all.
        p = jax.tree.map(lambda x, lab: x if lab == optim.TRAIN else jax.lax.stop_gradient(x), p, labels)
        return loss({**p, **frozen}, batch, key)

    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    new = {"step": step, "params": params, "opt_state": opt_state}
    if opt.ema:
        k = opt.grad_accum
        ema = optim.ema_update(state["ema"], params, labels, opt.ema, step // k - 1)
        if k > 1:  # only after the batches that complete an update
            ema = jax.tree.map(lambda a, b: jnp.where(step % k == 0, a, b), ema, state["ema"])
        new["ema"] = ema
    metrics = {"loss": value, **metrics, "grad_norm": _global_norm(grads)}
    return _constrain(new, shard), _constrain(metrics, shard)


def compile_cheap(fn, *args):
    """``jax.jit(fn)`` compiled for ``args``, for functions run once or a few times
    (initialisation, calibration): on CPU without LLVM optimisations, which compiles ~2x
    faster; the program runs slower, which does not matter for these."""
    lowered = jax.jit(fn).lower(*args)
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return lowered.compile(compiler_options=opts)
