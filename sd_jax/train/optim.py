"""The optimizer of the training loops: AdamW, warm-up + cosine/constant schedule,
global-norm clipping, gradient accumulation, per-component freezing and an EMA.

Everything is described by :class:`OptimConfig`, a frozen (hashable) dataclass, so a
jitted train step can take it as a static argument and build the optax transformation
inside the trace.

Steps: the training loop counts *batches* (micro-steps).  With ``grad_accum = k`` the
optimizer applies an update every ``k`` batches (``optax.MultiSteps`` averages their
gradients), so its schedule runs over ``steps // k`` updates with ``warmup // k``
warm-up updates; :func:`lr_at` gives the learning rate in force at a given batch.

Freezing: parameters are a tree ``{"text_encoder": ..., "unet": ...}``; a leaf is
trained when its path (``"unet/down_blocks_0/resnets_0/conv1/kernel"``) matches one of
the ``trainable`` patterns (Python regexes, matched from the start of the path; a bare
name such as ``unet`` means the whole component).  Frozen leaves go through
``optax.set_to_zero`` (via ``optax.multi_transform``), carry no Adam moments and no
accumulator, and the loss sees them through ``stop_gradient`` so XLA does not even
compute their gradients.

EMA: a second copy of the trained leaves (:func:`ema_init`), updated after every optimizer update ``n``
(0-based) with decay ``min(decay, (1 + n) / (10 + n))`` (the warm-up of
``torch_ema`` / diffusers' ``EMAModel``), so early averages are not dominated by the
random initialisation.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["OptimConfig", "TRAIN", "FREEZE", "path_str", "compile_patterns", "labels_for", "make_schedule",
           "lr_at", "make_optimizer", "ema_decay", "ema_init", "ema_params", "ema_update", "count_trainable"]

TRAIN, FREEZE = "train", "freeze"
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters (see the module docstring for how steps are counted).

    ``lr``: peak learning rate; ``warmup``: batches of linear warm-up from 0;
    ``steps``: total batches of the run; ``schedule``: ``"cosine"`` (decay to
    ``final_lr_ratio * lr`` at ``steps``) or ``"constant"``; ``clip_norm``: global-norm
    clipping of the (averaged) gradient, 0/None = off; ``weight_decay`` applies to
    matrices and embeddings only (leaves with 2+ dimensions), not to biases and norms;
    ``grad_accum``: batches per update; ``ema``: EMA decay, 0 = no EMA;
    ``trainable``: the freezing patterns.
    """
    lr: float = 1e-4
    steps: int = 1000
    warmup: int = 0
    schedule: str = "cosine"
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 1e-2
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    ema: float = 0.0
    trainable: tuple[str, ...] = (".*",)

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.grad_accum < 1:
            raise ValueError(f"grad-accum must be at least 1, got {self.grad_accum}")
        if self.grad_accum > self.steps:
            raise ValueError(f"grad-accum {self.grad_accum} is more than the {self.steps} steps: "
                             f"no update would ever be applied")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema decay must be in [0, 1) (0 = off), got {self.ema}")
        if self.clip_norm is not None and self.clip_norm < 0:
            raise ValueError(f"clip norm must be >= 0 (0 = off), got {self.clip_norm}")
        if not self.trainable:
            raise ValueError("nothing to train: give at least one component or pattern")
        compile_patterns(self.trainable)

    @property
    def updates(self) -> int:
        """Optimizer updates in the run."""
        return max(self.steps // self.grad_accum, 1)


def path_str(path) -> str:
    """A key path of ``jax.tree_util`` as ``"unet/conv_in/kernel"``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def compile_patterns(patterns) -> list[re.Pattern]:
    out = []
    for p in patterns:
        p = p.strip()
        if re.fullmatch(r"\w+", p):  # a component name: the whole sub-tree
            p = re.escape(p) + r"(/|$)"
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"trainable pattern {p!r} is not a valid regular expression: {e}") from None
    return out


def labels_for(params, patterns) -> Any:
    """A tree like ``params`` of ``"train"`` / ``"freeze"`` strings.

    Raises ValueError when a pattern matches no parameter or nothing is trained.
    """
    compiled = compile_patterns(patterns)
    used = [False] * len(compiled)

    def label(path, _):
        s = path_str(path)
        hit = False
        for i, r in enumerate(compiled):
            if r.match(s):
                used[i] = hit = True
        return TRAIN if hit else FREEZE

    labels = jax.tree_util.tree_map_with_path(label, params)
    components = sorted(params) if isinstance(params, dict) else []
    for p, u in zip(patterns, used):
        if not u:
            raise ValueError(f"trainable pattern {p!r} matches no parameter "
                             f"(components: {', '.join(components)})")
    return labels


def count_trainable(params, labels) -> tuple[int, int]:
    """(trained, total) parameter counts."""
    sizes = jax.tree.leaves(jax.tree.map(lambda p, l: (p.size, l == TRAIN), params, labels),
                            is_leaf=lambda x: isinstance(x, tuple))
    return sum(s for s, t in sizes if t), sum(s for s, _ in sizes)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer update count."""
    k = cfg.grad_accum
    warm = cfg.warmup // k
    total = cfg.updates
    if cfg.schedule == "constant":
        if warm == 0:
            return optax.constant_schedule(cfg.lr)
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), optax.constant_schedule(cfg.lr)],
                                    [warm])
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warm, max(total, warm + 1),
                                              end_value=cfg.lr * cfg.final_lr_ratio)


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Learning rate used by the update that batch ``step`` (0-based) contributes to."""
    return float(make_schedule(cfg)(step // cfg.grad_accum))


def make_optimizer(cfg: OptimConfig, labels) -> optax.GradientTransformation:
    """AdamW (+ clipping, accumulation) on the ``"train"`` leaves, zero updates elsewhere."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    inner = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm else []
    inner.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    tx = optax.chain(*inner)
    if cfg.grad_accum > 1:
        # Inside the "train" branch: the accumulator exists for trained leaves only.
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum).gradient_transformation()
    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)


def ema_decay(decay: float, count):
    """Decay for the ``count``-th (0-based) EMA update: ``min(decay, (1 + n) / (10 + n))``."""
    n = jnp.asarray(count, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def ema_init(params, labels):
    """The EMA tree: a copy of the trained leaves; frozen leaves hold a scalar placeholder
    (no memory spent on, e.g., a frozen text encoder) -- see :func:`ema_params`."""
    return jax.tree.map(lambda p, lab: jnp.copy(p) if lab == TRAIN else jnp.zeros((), p.dtype), params, labels)


def ema_params(ema, params, labels):
    """The full parameter tree with the EMA in place of every trained leaf."""
    return jax.tree.map(lambda e, p, lab: e if lab == TRAIN else p, ema, params, labels)


def ema_update(ema, params, labels, decay: float, count):
    """One EMA step on the trained leaves (frozen leaves are passed through unchanged)."""
    d = ema_decay(decay, count)

    def upd(e, p, lab):
        if lab != TRAIN:
            return e
        return (e.astype(jnp.float32) + (1.0 - d) * (p.astype(jnp.float32) - e.astype(jnp.float32))).astype(e.dtype)

    return jax.tree.map(upd, ema, params, labels)
