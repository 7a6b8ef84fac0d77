"""Loading a Stable Diffusion ``tokenizer/`` folder and turning prompts into token ids.

A real SD repository's ``tokenizer/`` folder holds ``vocab.json`` + ``merges.txt`` (plus
``special_tokens_map.json`` / ``tokenizer_config.json``); transformers 5's
``save_pretrained`` writes a ``tokenizer.json`` instead.  Both load with
transformers' ``CLIPTokenizer``.

Padding uses the tokenizer's own pad token: ``<|endoftext|>`` for SD 1.x, ``!`` (id 0)
for SD 2.x -- the text encoders were trained with those, so do not override it.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["load_tokenizer", "tokenize", "PromptTruncatedWarning"]


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
