"""Prompts of any length as A1111 encodes them: 75-token chunks, each with its own BOS/EOS.

:func:`chunk_prompt` follows A1111's ``FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line``:

* ``<lora:name:weight>`` tags are removed (:func:`sd_jax.prompts.parser.extract_loras`);
* the prompt is parsed (:func:`sd_jax.prompts.parser.parse_prompt_attention`; in ``"plain"``
  syntax it is one piece of weight 1) and each piece tokenized without BOS/EOS;
* tokens fill chunks of 75; ``BREAK`` starts a new chunk;
* comma backtracking: when a chunk is full and a comma is among its last 20 tokens, the
  tokens after that comma move to the next chunk (A1111's ``comma_padding_backtrack`` = 20);
* a textual-inversion embedding's vectors stay together in one chunk;
* each chunk becomes ``[BOS] + tokens + [EOS] + [pad] * ...`` (77 ids; SD 1.x pads with EOS,
  SD 2.x / SDXL's second tokenizer with ``!``, as A1111 and diffusers), its weights 1 at
  BOS, EOS and padding.

A batch's prompts (and negative prompts) are padded to the same number of chunks with empty
chunks (``[BOS, EOS, pad...]``, the encoding of ``""``, as A1111 pads the shorter of prompt
and negative prompt).  The number of chunks is static (part of the compiled plan); the ids
and weights are traced arrays.

:func:`emphasis` is A1111's "Original" emphasis: the encoder's output is multiplied by the
token weights, then rescaled so its mean is the mean before (per sample and chunk; A1111
takes the mean over its whole batch, which is the same for a batch of one).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from sd_jax.prompts.parser import BREAK, extract_loras, parse_prompt_attention

__all__ = ["CHUNK", "SYNTAXES", "chunk_prompt", "count_chunks", "prompt_arrays", "emphasis"]

CHUNK = 75              # tokens per chunk, without BOS and EOS
COMMA_BACKTRACK = 20    # A1111's comma_padding_backtrack default
SYNTAXES = ("a1111", "plain")


def _pieces(text: str, syntax: str) -> list[tuple[str, float]]:
    if syntax == "a1111":  # <lora:...> tags are the caller's (sd_jax.lora), not text to encode
        return parse_prompt_attention(extract_loras(text)[0])
    if syntax == "plain":
        return [(text, 1.0)]
    raise ValueError(f"prompt_syntax must be one of {', '.join(SYNTAXES)}, got {syntax!r}")


def chunk_prompt(tokenizer, text: str, syntax: str = "a1111", groups: dict | None = None):
    """``text`` -> (ids [N, 77] int32, weights [N, 77] float32), N >= 1 chunks.

    ``groups``: ``{first id: (ids...)}`` of the multi-vector textual-inversion embeddings
    (the tokenizer yields the first id; it stands for all the vectors)."""
    groups = groups or {}
    pieces = _pieces(text, syntax)
    texts = [t for t, _ in pieces]
    tokenized = tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    if comma == tokenizer.unk_token_id:
        comma = None
    chunks: list[tuple[list, list]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk():
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for ids, (piece, weight) in zip(tokenized, pieces):
        if (piece, weight) == BREAK:
            next_chunk()
            continue
        for tok in ids:
            if tok == comma:
                last_comma = len(tokens)
            elif len(tokens) == CHUNK and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1   # the text after the comma moves to the next chunk
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == CHUNK:
                next_chunk()
            vec = groups.get(tok, (tok,))
            if len(tokens) + len(vec) > CHUNK:   # an embedding's vectors stay in one chunk
                next_chunk()
            tokens += list(vec)
            weights += [weight] * len(vec)
    if tokens or not chunks:
        next_chunk()
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = np.full((len(chunks), CHUNK + 2), pad, np.int32)
    w = np.ones((len(chunks), CHUNK + 2), np.float32)
    for i, (t, wt) in enumerate(chunks):
        ids[i, :len(t) + 2] = [bos] + t + [eos]
        w[i, 1:len(t) + 1] = wt
    return ids, w


def count_chunks(tokenizer, text: str, syntax: str = "a1111", groups: dict | None = None) -> int:
    """How many 75-token chunks ``text`` takes (1 in ``"plain"`` syntax, which truncates)."""
    if syntax == "plain":
        return 1
    return chunk_prompt(tokenizer, text, syntax, groups)[0].shape[0]


def prompt_arrays(tokenizer, texts, chunks: int, syntax: str = "a1111", groups: dict | None = None):
    """The prompts of a batch as (ids [B, chunks * 77] int32, weights [B, chunks * 77] float32),
    each padded with empty chunks up to ``chunks``."""
    out_ids, out_w = [], []
    for text in texts:
        ids, w = chunk_prompt(tokenizer, text, syntax, groups)
        if ids.shape[0] > chunks:
            raise ValueError(f"prompt {text[:60]!r} takes {ids.shape[0]} chunks of {CHUNK} tokens; "
                             f"this call was planned for {chunks}")
        empty_ids, empty_w = chunk_prompt(tokenizer, "", "plain")
        ids = np.concatenate([ids] + [empty_ids] * (chunks - ids.shape[0]))
        w = np.concatenate([w] + [empty_w] * (chunks - w.shape[0]))
        out_ids.append(ids.reshape(-1))
        out_w.append(w.reshape(-1))
    return np.stack(out_ids), np.stack(out_w)


def emphasis(z, weights):
    """A1111's emphasis: ``z`` [R, L, D] (one row per sample and chunk) times ``weights`` [R, L],
    rescaled so each row's mean is what it was.  Computed in float32; returns ``z``'s dtype."""
    x = z.astype(jnp.float32)
    before = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = x * weights.astype(jnp.float32)[:, :, None]
    after = jnp.mean(x, axis=(1, 2), keepdims=True)
    # A row whose mean is exactly 0 (all weights 1 on an output of mean 0) keeps its scale
    # instead of becoming 0/0 = NaN.
    return (x * jnp.where(after == 0, 1.0, before / jnp.where(after == 0, 1.0, after))).astype(z.dtype)
