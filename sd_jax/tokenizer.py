"""CLIP tokenizers: loading a ``tokenizer/`` folder, building the real SD one, prompts -> token ids.

A real SD repository's ``tokenizer/`` folder holds ``vocab.json`` + ``merges.txt`` (plus
``special_tokens_map.json`` / ``tokenizer_config.json``); transformers 5's
``save_pretrained`` writes a ``tokenizer.json`` instead.  Both load with
transformers' ``CLIPTokenizer``.

Padding uses the tokenizer's own pad token: ``<|endoftext|>`` for SD 1.x, ``!`` (id 0)
for SD 2.x -- the text encoders were trained with those, so do not override it.

A single-file checkpoint has no tokenizer: :func:`clip_tokenizer` builds the real SD one
(OpenAI CLIP's 49408-token BPE) from the merges shipped in ``sd_jax/assets/``.  The
byte-level alphabet (:func:`bytes_to_unicode`) is shared with the shapes tokenizer
(:mod:`sd_jax.data.tokenizer`).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import warnings
from functools import lru_cache

import numpy as np

from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["load_tokenizer", "save_tokenizer", "tokenize", "PromptTruncatedWarning", "bytes_to_unicode", "clip_tokenizer_folder",
           "clip_tokenizer", "BPE_FILE"]


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than the text encoder takes; the tail was dropped."""


def load_tokenizer(folder: str | os.PathLike):
    """A transformers ``CLIPTokenizer`` from a ``tokenizer/`` folder (either form); offline."""
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"tokenizer folder {folder!r} not found")
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise CheckpointError(
            f"{folder!r} is not a CLIP tokenizer folder: it needs vocab.json + merges.txt "
            f"or tokenizer.json")
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json")


def save_tokenizer(tokenizer, folder: str | os.PathLike) -> None:
    """Write ``tokenizer`` into ``folder``.  One loaded from a ``vocab.json`` + ``merges.txt``
    folder is copied as it is (that form loads in transformers 4 and 5; transformers 5's
    ``save_pretrained`` writes only ``tokenizer.json``)."""
    folder = os.fspath(folder)
    src = getattr(tokenizer, "name_or_path", None) or ""
    if os.path.isfile(os.path.join(src, "vocab.json")) and os.path.isfile(os.path.join(src, "merges.txt")):
        os.makedirs(folder, exist_ok=True)
        for name in _FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(folder, name))
    else:
        tokenizer.save_pretrained(folder)


def tokenize(tokenizer, prompts: str | list[str], max_length: int = 77) -> np.ndarray:
    """Token ids ``[B, max_length]`` int32: BOS, the prompt, EOS, then the pad token.

    Prompts longer than ``max_length`` (EOS and BOS included) are truncated (EOS kept
    last), with a :class:`PromptTruncatedWarning` naming the prompt and the dropped text.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        return np.zeros((0, max_length), np.int32)
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    full = tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
    for prompt, toks in zip(prompts, full):
        if len(toks) > max_length:
            dropped = len(toks) - max_length
            # The content kept is toks[1:max_length-1]; the rest (before the final EOS) is dropped.
            tail = tokenizer.decode(toks[max_length - 1:-1])
            warnings.warn(
                f"prompt {_short(prompt)!r} is {len(toks)} tokens long; the text encoder takes "
                f"{max_length}, so the last {dropped} were dropped: {tail!r}",
                PromptTruncatedWarning, stacklevel=2)
    return ids


def _short(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[:n - 3] + "..."


# =========================================================================== the CLIP BPE tokenizer
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BPE_FILE = os.path.join(ASSETS, "bpe_simple_vocab_16e6.txt.gz")
_N_MERGES = 49152 - 256 - 2
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's (and GPT-2's) reversible byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple, tuple]:
    if not os.path.isfile(BPE_FILE):
        raise CheckpointError(f"{BPE_FILE} is missing; reinstall sd-jax (the CLIP tokenizer is built from it)")
    with gzip.open(BPE_FILE) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = tuple(tuple(m.split()) for m in lines[1:_N_MERGES + 1])
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return tuple(vocab), merges


def clip_tokenizer_folder(folder: str | os.PathLike, pad_token: str = "<|endoftext|>") -> str:
    """Write the Stable Diffusion CLIP tokenizer files (as openai/clip-vit-large-patch14's
    ``vocab.json`` / ``merges.txt``, 49408 tokens) into ``folder``; SD 2.x pads with ``"!"``."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad_token,
               "unk_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({**special, "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
                   "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
    return folder


def _cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "sd_jax", "tokenizers")


def clip_tokenizer(pad_token: str, name: str):
    """The SD CLIP tokenizer padding with ``pad_token``, built from the bundled BPE merges once
    and cached as ``~/.cache/sd_jax/tokenizers/<name>/`` (``$XDG_CACHE_HOME``)."""
    folder = os.path.join(_cache_root(), name)
    if not all(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_FILES):
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(folder))
        try:
            clip_tokenizer_folder(tmp, pad_token=pad_token)
            if os.path.isdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:       # another process won the race: use its copy
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)
