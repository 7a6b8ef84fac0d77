"""A small CLIP-format byte-level BPE tokenizer for the shapes dataset.

``write_tokenizer(folder)`` writes ``vocab.json``, ``merges.txt``,
``special_tokens_map.json`` and ``tokenizer_config.json`` -- the files of a
Stable Diffusion ``tokenizer/`` folder -- so that
``transformers.CLIPTokenizer.from_pretrained(folder)`` loads it.

The vocabulary is laid out like CLIP's: the 256 byte-level base characters,
the same with ``</w>`` appended, one token per merge (in merge order), then
``<|startoftext|>`` and ``<|endoftext|>``.  Any text therefore tokenizes
(falling back to characters), and every word of ``WORDS`` -- the caption
vocabulary plus common prompt words -- is a single ``word</w>`` token.

The merges are built word by word: each word's tokenization under the merges
so far is computed with the same BPE rule CLIP uses (repeatedly merge the
lowest-ranked adjacent pair), and the left-to-right chain of merges that joins
what remains is appended.  A word that is already one token stays one token
when merges are appended after it, so every word ends up one token.
"""

from __future__ import annotations

import functools
import json
import os
import re

from sd_jax.data import shapes
from sd_jax.tokenizer import bytes_to_unicode

__all__ = ["WORDS", "BOS", "EOS", "MODEL_MAX_LENGTH", "build_vocab", "vocab_size", "write_tokenizer"]

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

_EXTRA_WORDS = """
a an the on at of with in and or to is are it its this that there here by from
for as near next above below under over between beside behind front side sides
background backdrop image picture photo photograph drawing painting render
illustration icon logo shape shapes object objects plain solid simple flat
colored coloured color colour single one two three four five six seven eight
nine ten
circle circles square squares triangle triangles rectangle star dot disc ball
box
red green blue yellow purple orange white black gray grey pink brown cyan
magenta violet dark light bright
small large big tiny little medium huge
top bottom left right center centre middle corner upper lower edge
""".split()


def _dedupe(words) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w.lower(), None)
    return tuple(seen)


# Dataset words first so their merges come first (lowest rank).
WORDS: tuple[str, ...] = _dedupe(list(shapes.vocabulary()) + _EXTRA_WORDS)


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one pre-tokenized word (byte-level characters)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:]))]
        rank, first = min(pairs)
        if rank == float("inf"):
            break
        pair = (parts[first], parts[first + 1])
        merged: list[str] = []
        i = 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


@functools.cache
def build_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """``(vocab token -> id, merges)`` of the tokenizer."""
    byte_encoder = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in WORDS:
        if not re.fullmatch(r"[a-z]+", word):
            raise ValueError(f"tokenizer words must be lowercase letters, got {word!r}")
        encoded = "".join(byte_encoder[b] for b in word.encode("utf-8"))
        parts = _bpe(encoded, ranks)
        acc = parts[0]
        for nxt in parts[1:]:
            pair = (acc, nxt)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            acc = acc + nxt
        assert _bpe(encoded, ranks) == [encoded + "</w>"], word
    base = list(byte_encoder.values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        if t in vocab:  # pragma: no cover - merges never rebuild a base token
            raise AssertionError(f"duplicate token {t!r}")
        vocab[t] = len(vocab)
    # Words that were already one token must still be (appending merges
    # never splits a finished word, but check: the files must be right).
    for word in WORDS:
        assert _bpe(word, ranks) == [word + "</w>"], word
    return vocab, tuple(merges)


def vocab_size() -> int:
    """Number of tokens (= the text encoder's ``vocab_size``)."""
    return len(build_vocab()[0])


def _special(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(folder: str | os.PathLike) -> int:
    """Write the tokenizer files into ``folder`` (created if needed); returns the vocab size."""
    vocab, merges = build_vocab()
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special_map = {
        "bos_token": _special(BOS),
        "eos_token": _special(EOS),
        "pad_token": EOS,
        "unk_token": _special(EOS),
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
    config = {
        "add_prefix_space": False,
        "bos_token": {"__type": "AddedToken", **_special(BOS)},
        "do_lower_case": True,
        "eos_token": {"__type": "AddedToken", **_special(EOS)},
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(EOS)},
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return len(vocab)
