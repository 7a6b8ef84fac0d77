"""Teach a from-scratch text encoder to read the shapes captions before diffusion training.

Stable Diffusion's text encoder comes pre-trained (CLIP) and stays frozen: every word of a
prompt already has its own direction in the embeddings the UNet attends to.  A text encoder
trained from scratch *together with* the UNet does not get that.  Measured on the shipped
shapes model (``benchmarks/probe_position.py``): its prompt embeddings for "at the top
left" and "at the bottom right" differ 16x less than for "red" and "green", because a word
the UNet has not learned to use yet sends the encoder no gradient, and weight decay then
shrinks what it had.  Position words never reached the UNet.

:func:`pretrain_text_encoder` gives the encoder a reason to keep every word: it reads each
caption's labels (per shape: colour, shape, size, position; the background; "not said" for
words the caption leaves out) from the pooled (EOS) state, which attends to the whole caption,
with linear heads that are then thrown away.  Captions come from the shapes dataset's own
labels and phrasing (no images are drawn), 1000 batches of 128 take about 4 minutes on two CPU cores,
and the result is a deterministic function of the seed, so a resumed run rebuilds nothing.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sd_jax.data import shapes
from sd_jax.models import clip as clip_lib
from sd_jax.tokenizer import tokenize

__all__ = ["LABEL_HEADS", "caption_labels", "pretrain_text_encoder", "label_accuracy"]

_CAPTION_LEN = 32
_NOT_SAID = "-"
_NONE = "none"
_COLORS = tuple(shapes.COLORS)
_POS = tuple(shapes.POSITIONS)
_SIZES = tuple(shapes.SIZES)

# head name -> the classes it predicts (index = class id).
LABEL_HEADS: dict[str, tuple[str, ...]] = {
    "color": _COLORS,
    "shape": shapes.SHAPES,
    "size": _SIZES + (_NOT_SAID,),
    "position": _POS + (_NOT_SAID,),
    "color2": _COLORS + (_NONE,),
    "shape2": shapes.SHAPES + (_NONE,),
    "size2": _SIZES + (_NOT_SAID, _NONE),
    "position2": _POS + (_NOT_SAID, _NONE),
    "background": _COLORS + (_NOT_SAID,),
}


def caption_labels(seed: int, start: int, n: int, max_shapes: int = 2, split: str = "all"):
    """Captions ``start .. start+n-1`` of a caption stream and their class ids per head."""
    captions, ids = [], {k: np.empty(n, np.int32) for k in LABEL_HEADS}
    for i in range(n):
        rng = np.random.default_rng([int(seed), int(start + i), 7])
        lab = shapes._sample_labels(rng, split, max_shapes)
        captions.append(shapes.caption_for(lab))
        objs = lab["objects"]
        said_size, said_pos = lab["mention_size"], lab["mention_position"]
        for j, suffix in enumerate(("", "2")):
            o = objs[j] if j < len(objs) else None
            for key, value, said in (("color", o and o["color"], True), ("shape", o and o["shape"], True),
                                     ("size", o and o["size"], said_size),
                                     ("position", o and o["position"], said_pos)):
                classes = LABEL_HEADS[key + suffix]
                name = _NONE if o is None else (value if said else _NOT_SAID)
                ids[key + suffix][i] = classes.index(name)
        ids["background"][i] = LABEL_HEADS["background"].index(
            lab["background"] if lab["mention_background"] else _NOT_SAID)
    return captions, ids


def _init_heads(key, width: int) -> dict:
    keys = jax.random.split(key, len(LABEL_HEADS))
    return {k: {"kernel": jax.random.normal(kk, (width, len(c))) / np.sqrt(width), "bias": jnp.zeros(len(c))}
            for kk, (k, c) in zip(keys, LABEL_HEADS.items())}


def _logits(model, params, heads, input_ids):
    pooled = model.apply({"params": params}, input_ids)["pooler_output"]
    return {k: pooled @ h["kernel"] + h["bias"] for k, h in heads.items()}


def _loss(model, both, input_ids, labels):
    logits = _logits(model, both["text_encoder"], both["heads"], input_ids)
    per = {k: optax.softmax_cross_entropy_with_integer_labels(v, labels[k]).mean() for k, v in logits.items()}
    return sum(per.values()) / len(per)


def pretrain_text_encoder(config: clip_lib.CLIPTextConfig, tokenizer, params: dict, *, steps: int, seed: int = 0,
                          batch_size: int = 128, lr: float = 1e-3, max_shapes: int = 2):
    """``params`` (a text encoder's) after ``steps`` batches of reading caption labels.

    Returns ``(params, metrics)``: metrics holds the final loss and the label accuracy on
    captions the pre-training never saw (:func:`label_accuracy`)."""
    if steps <= 0:
        return params, {}
    model = clip_lib.CLIPTextModel(config)
    # The captions are at most 27 tokens and the attention is causal, so the states up to the
    # EOS token are the same whatever the padding after it: train on 32 positions, not 77.
    max_len = min(config.max_position_embeddings, _CAPTION_LEN)
    heads = _init_heads(jax.random.key(seed + 1), config.hidden_size)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr * 0.05)
    opt = optax.adamw(sched, weight_decay=0.0)
    both = {"text_encoder": params, "heads": heads}
    state = opt.init(both)

    @jax.jit
    def step(both, state, ids, labels):
        loss, grads = jax.value_and_grad(functools.partial(_loss, model))(both, ids, labels)
        updates, state = opt.update(grads, state, both)
        return optax.apply_updates(both, updates), state, loss

    loss = jnp.nan
    for i in range(steps):
        captions, labels = caption_labels(seed, i * batch_size, batch_size, max_shapes)
        ids = jnp.asarray(tokenize(tokenizer, captions, max_len))
        both, state, loss = step(both, state, ids, {k: jnp.asarray(v) for k, v in labels.items()})
    acc = label_accuracy(model, both["text_encoder"], both["heads"], tokenizer, seed=seed + 10_000,
                         max_shapes=max_shapes)
    return both["text_encoder"], {"loss": float(loss), **acc}


def label_accuracy(model, params, heads, tokenizer, *, seed: int, n: int = 512, max_shapes: int = 2) -> dict:
    """Per-head accuracy of the label heads on ``n`` captions of stream ``seed``."""
    captions, labels = caption_labels(seed, 0, n, max_shapes)
    ids = jnp.asarray(tokenize(tokenizer, captions, model.config.max_position_embeddings))
    # (evaluated at the full length the UNet sees)
    logits = jax.jit(functools.partial(_logits, model))(params, heads, ids)
    return {f"acc_{k}": float((np.asarray(v).argmax(-1) == labels[k]).mean()) for k, v in logits.items()}
