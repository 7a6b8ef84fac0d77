"""Textual-inversion embeddings: the files people share, added as new tokens.

Formats read (:func:`read_embedding`):

* A1111 ``.safetensors``: ``emb_params`` [n, D] (or a flattened ``string_to_param.*``); the
  name is the file's stem, as in A1111;
* A1111 ``.pt`` / ``.bin`` (``{"string_to_param": {"*": [n, D]}, ...}``): pickles, read only
  with ``allow_pickle=True`` (``torch.load(weights_only=True)``);
* diffusers ``learned_embeds.safetensors``: ``{token: [D] or [n, D]}``; the name is the token;
* SDXL: ``clip_l`` [n, 768] and ``clip_g`` [n, 1280] (the first and the second text encoder).

Adding an embedding (:func:`add_embeddings`) works as diffusers' ``load_textual_inversion``:
its name (and, for n > 1 vectors, ``name_1`` ... ``name_{n-1}``) become tokens of every
tokenizer of the model, with ids after the vocabulary, and each text encoder's token
embedding table grows by those rows.  A prompt uses the embedding by writing its name;
the name's token stands for all n vectors (in ``"a1111"`` syntax they stay in one 75-token
chunk, as in A1111; in ``"plain"`` syntax the name is replaced by ``name name_1 ...`` as
diffusers' ``maybe_convert_prompt`` does).
"""
from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np

from sd_jax.weights.safetensors_io import load_file

__all__ = ["Embedding", "read_embedding", "find_embeddings", "add_embeddings", "expand_plain", "groups_for",
           "EXTENSIONS"]

EXTENSIONS = (".safetensors", ".pt", ".bin")


@dataclasses.dataclass(frozen=True)
class Embedding:
    """One textual-inversion embedding: ``name`` (its token), ``vectors``: ``{key: float32 [n, D]}``
    with key ``None`` (one set, for whichever text encoder has width D) or ``"clip_l"`` /
    ``"clip_g"`` (SDXL's first and second encoder); ``path``: where it came from."""
    name: str
    vectors: dict
    path: str

    @property
    def count(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def _as_2d(x, what: str) -> np.ndarray:
    a = np.asarray(x, np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] < 1:
        raise ValueError(f"{what}: expected vectors [n, width], got shape {a.shape}")
    return a


def _read_pickle(path: str) -> dict:
    try:
        import torch
    except ImportError:
        raise ValueError(f"reading the pickle embedding {path} needs torch (pip install torch)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a corrupt or non-tensor pickle: one line)
        raise ValueError(f"cannot read embedding {path}: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"embedding {path} is not a dict of tensors")

    def np_(t):
        return t.detach().float().numpy() if hasattr(t, "detach") else t
    if isinstance(obj.get("string_to_param"), dict):
        return {"string_to_param": np_(next(iter(obj["string_to_param"].values())))}
    return {k: np_(v) for k, v in obj.items() if hasattr(v, "detach")}


def read_embedding(path: str, allow_pickle: bool = False) -> list[Embedding]:
    """The embedding(s) in one file (a diffusers file may hold several tokens).

    Raises ValueError (one line) for a pickle without ``allow_pickle``, an unreadable file or
    an unknown layout."""
    path = os.fspath(path)
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ext.lower()
    if not os.path.isfile(path):
        raise ValueError(f"embedding {path!r} not found")
    if ext in (".pt", ".bin"):
        if not allow_pickle:
            raise ValueError(f"embedding {path} is a pickle ({ext}), which can run code when read; re-save it as "
                             f".safetensors, or pass allow_pickle=True (--allow-pickle) to read it with "
                             f"torch.load(weights_only=True)")
        sd = _read_pickle(path)
    elif ext == ".safetensors":
        sd = load_file(path)
    else:
        raise ValueError(f"embedding {path}: unknown file type {ext!r}; use .safetensors (or .pt with allow_pickle)")
    if not sd:
        raise ValueError(f"embedding {path} holds no tensors")
    if "clip_l" in sd or "clip_g" in sd:
        if not ("clip_l" in sd and "clip_g" in sd):
            raise ValueError(f"embedding {path}: an SDXL embedding needs both clip_l and clip_g, it has "
                             f"{', '.join(sorted(sd))}")
        vecs = {k: _as_2d(sd[k], f"embedding {path} ({k})") for k in ("clip_l", "clip_g")}
        if vecs["clip_l"].shape[0] != vecs["clip_g"].shape[0]:
            raise ValueError(f"embedding {path}: clip_l has {vecs['clip_l'].shape[0]} vectors, clip_g "
                             f"{vecs['clip_g'].shape[0]}")
        return [Embedding(stem, vecs, path)]
    for key in ("emb_params", "string_to_param", "string_to_param.*"):
        if key in sd:
            return [Embedding(stem, {None: _as_2d(sd[key], f"embedding {path} ({key})")}, path)]
    # diffusers: {token: vectors}
    return [Embedding(k, {None: _as_2d(v, f"embedding {path} ({k})")}, path) for k, v in sorted(sd.items())]


def find_embeddings(folder: str) -> list[str]:
    """The embedding files directly in ``folder`` and its sub-folders (A1111 looks in both), sorted."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"embeddings folder {folder!r} not found (--embeddings-dir)")
    out = []
    for root, _, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in EXTENSIONS]
    return sorted(out)


def _token_names(e: Embedding) -> list[str]:
    """diffusers' tokens for an n-vector embedding: ``name``, ``name_1``, ..., ``name_{n-1}``."""
    return [e.name] + [f"{e.name}_{i}" for i in range(1, e.count)]


def _assign(e: Embedding, widths: list[int], encoders: list[str]) -> list[np.ndarray]:
    """The vectors of ``e`` for each text encoder (widths in the family's order)."""
    if None in e.vectors:
        v = e.vectors[None]
        if all(w == v.shape[1] for w in widths):
            return [v] * len(widths)
        fits = "fits none of them" if v.shape[1] not in widths else "fits only one of them (an SDXL embedding needs clip_l and clip_g)"
        raise ValueError(f"embedding {e.name!r} ({e.path}) has width {v.shape[1]}; this model's text "
                         f"encoder{'s take' if len(widths) > 1 else ' takes'} {' and '.join(map(str, widths))}, "
                         f"so it {fits}: it is for another model family")
    if len(widths) == 2:
        order = [e.vectors["clip_l"], e.vectors["clip_g"]]
    else:  # an SDXL embedding on a one-encoder model: the part of the matching width
        order = [next((v for v in e.vectors.values() if v.shape[1] == widths[0]), None)]
    for v, w, name in zip(order, widths, encoders):
        if v is None or v.shape[1] != w:
            got = ", ".join(f"{k} {x.shape[1]}" for k, x in e.vectors.items())
            raise ValueError(f"embedding {e.name!r} ({e.path}) has widths {got}; this model's {name} takes {w}, "
                             f"so it is for another model family")
    return order


def add_embeddings(family, models, params, tokenizers: dict, embeddings: list[Embedding]):
    """Add ``embeddings`` as tokens: returns (models, params, tokenizers) with the tokenizers
    copied and extended, each text encoder's token table grown (nothing is changed in place;
    on an error nothing is added).

    ``params``: ``{component: params}`` (numpy or jax arrays).  Raises ValueError (one line)
    for an embedding whose width fits no text encoder of the model, or whose name is
    already a token (a word of the vocabulary, another embedding)."""
    enc = family.prompt
    te = [getattr(models, name) for name in enc.encoders]
    widths = [m.config.hidden_size for m in te]
    seen: dict[str, str] = {}
    vocabs = {t: tokenizers[t].get_vocab() for t in enc.tokenizers}
    rows = []
    for e in embeddings:
        for t in _token_names(e):
            if t in seen:
                raise ValueError(f"embedding {e.name!r}: the name is used twice ({seen[t]} and {e.path}); "
                                 f"rename one of the files")
            seen[t] = e.path
            for tname in enc.tokenizers:
                if t in vocabs[tname] or t + "</w>" in vocabs[tname]:
                    raise ValueError(f"embedding {e.name!r} ({e.path}): {t!r} is already a token of the model's "
                                     f"{tname}; rename the file (A1111 names an embedding after its file)")
        rows.append(_assign(e, widths, list(enc.encoders)))
    tokenizers = dict(tokenizers)
    new_params = dict(params)
    for i, (ename, tname) in enumerate(zip(enc.encoders, enc.tokenizers)):
        tok = copy.deepcopy(tokenizers[tname])
        names = [t for e in embeddings for t in _token_names(e)]
        tok.add_tokens(names)
        ids = tok.convert_tokens_to_ids(names)
        vecs = np.concatenate([r[i] for r in rows]) if rows else np.zeros((0, widths[i]), np.float32)
        p = new_params[ename]
        table = p["text_model"]["embeddings"]["token_embedding"]["embedding"]
        size = max(table.shape[0], max(ids, default=-1) + 1)
        grown = np.zeros((size, table.shape[1]), np.float32)
        grown[:table.shape[0]] = np.asarray(table, np.float32)
        grown[ids] = vecs
        p = copy.copy(p)
        p["text_model"] = {**p["text_model"], "embeddings": {**p["text_model"]["embeddings"],
                                                             "token_embedding": {"embedding": grown.astype(table.dtype)}}}
        new_params[ename] = p
        module = getattr(models, ename)
        models = dataclasses.replace(models, **{ename: module.clone(
            config=dataclasses.replace(module.config, vocab_size=size))})
        tokenizers[tname] = tok
    return models, new_params, tokenizers


def groups_for(tokenizer, counts: dict[str, int]) -> dict[int, tuple[int, ...]]:
    """``{first id: (ids...)}`` of the multi-vector embeddings ``{name: n}`` in ``tokenizer``."""
    out = {}
    for name, n in counts.items():
        if n > 1:
            names = [name] + [f"{name}_{i}" for i in range(1, n)]
            ids = tokenizer.convert_tokens_to_ids(names)
            out[ids[0]] = tuple(ids)
    return out


def expand_plain(text: str, counts: dict[str, int]) -> str:
    """diffusers' ``maybe_convert_prompt``: each multi-vector name -> ``name name_1 ... name_{n-1}``."""
    for name, n in counts.items():
        if n > 1 and name in text:
            text = text.replace(name, " ".join([name] + [f"{name}_{i}" for i in range(1, n)]))
    return text

