"""PyTorch state dict <-> Flax parameter tree, checked against the model's own shapes.

Flax parameter paths mirror the diffusers / transformers key names: a PyTorch key
``down_blocks.0.attentions.1.proj_in.weight`` is the Flax path
``("down_blocks_0", "attentions_1", "proj_in", "kernel")``.  Numbered list items
(``.0``) become a ``_0`` suffix on the list's name, which is how ``flax.linen``
names submodules kept in a list.  Leaves are renamed and transposed by layer kind:

==========  ==================  ==================================
PyTorch     Flax                transform
==========  ==================  ==================================
weight 2-D  kernel (in, out)    transpose
weight 4-D  kernel (h, w, i, o) (o, i, h, w) -> (h, w, i, o)
weight 1-D  scale               (LayerNorm / GroupNorm)
weight 2-D  embedding           none (nn.Embed)
bias        bias                none
==========  ==================  ==================================

A 1x1 convolution stored where the model has a dense layer (and back) is reshaped,
since old checkpoints store some projections as 1x1 convs.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from sd_jax.weights.safetensors_io import CheckpointError

# Names of module lists in diffusers / transformers models: ``name.N`` <-> ``name_N``.
LIST_NAMES = frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
    "transformer_blocks", "layers", "to_out", "net",
})
_NUMBERED = re.compile(r"^(.*)_(\d+)$")


def torch_key_to_path(key: str) -> tuple[str, ...]:
    parts: list[str] = []
    for p in key.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts)


def path_to_torch_key(path: Iterable[str]) -> str:
    out = []
    for p in path:
        m = _NUMBERED.match(p)
        out.append(f"{m.group(1)}.{m.group(2)}" if m and m.group(1) in LIST_NAMES else p)
    return ".".join(out)


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return tree


def _to_flax(arr: np.ndarray, leaf: str, target_shape: tuple) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 4 and len(target_shape) == 2:      # 1x1 conv stored, dense wanted
            arr = arr[:, :, 0, 0]
        if arr.ndim == 2 and len(target_shape) == 4:      # dense stored, 1x1 conv wanted
            arr = arr[:, :, None, None]
        if arr.ndim == 4:
            return arr.transpose(2, 3, 1, 0)
        if arr.ndim == 2:
            return arr.T
    return arr


def _to_torch(arr: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel":
        if arr.ndim == 4:
            return arr.transpose(3, 2, 0, 1)
        if arr.ndim == 2:
            return arr.T
    return arr


def _torch_shape(flax_shape: tuple, leaf: str, stored_ndim: int) -> tuple:
    """A Flax parameter's shape in the PyTorch layout, as the checkpoint would store it."""
    s = tuple(flax_shape)
    if leaf != "kernel":
        return s
    if len(s) == 4:                                    # (h, w, i, o) -> (o, i, h, w)
        s = (s[3], s[2], s[0], s[1])
        return s[:2] if stored_ndim == 2 and s[2:] == (1, 1) else s   # 1x1 conv stored as a dense
    if len(s) == 2:
        return s[::-1] + ((1, 1) if stored_ndim == 4 else ())         # dense stored as a 1x1 conv
    return s


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], shapes, *, what: str,
                         rename: Callable[[str], str | None] | None = None, dtype=None) -> dict:
    """Convert a flat PyTorch-named state dict into a Flax parameter tree.

    Args:
      state_dict: key -> array (numpy, any float dtype).
      shapes: the model's parameter tree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)["params"]``).
      what: the component's name, for error messages ("unet", "vae", ...).
      rename: maps an old/alternative key to the canonical one, or None to drop a buffer.
      dtype: the parameter dtype; defaults to each target's dtype.

    Raises:
      CheckpointError: naming every missing, unexpected and mis-shaped key.
    """
    target = flatten(shapes)
    out, unexpected, mismatched, misshaped = {}, [], [], set()
    for key, arr in state_dict.items():
        key = rename(key) if rename else key
        if key is None:
            continue
        path = torch_key_to_path(key)
        leaf = path[-1]
        cands = {"weight": ("kernel", "scale", "embedding")}.get(leaf, (leaf,))
        tpath = next((path[:-1] + (c,) for c in cands if path[:-1] + (c,) in target), None)
        if tpath is None:
            unexpected.append(key)
            continue
        want = target[tpath]
        val = _to_flax(np.asarray(arr), tpath[-1], tuple(want.shape))
        if tuple(val.shape) != tuple(want.shape):
            # Both shapes as the checkpoint stores them (PyTorch's layout), listed once: not as missing.
            wanted = _torch_shape(tuple(want.shape), tpath[-1], np.ndim(arr))
            mismatched.append(f"{key} {tuple(np.shape(arr))} (model wants {wanted})")
            misshaped.add(tpath)
            continue
        out[tpath] = np.asarray(val, dtype=dtype or want.dtype)
    torch_leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
    missing = [path_to_torch_key(p[:-1] + (torch_leaf.get(p[-1], p[-1]),)) for p in target
               if p not in out and p not in misshaped]
    if missing or unexpected or mismatched:
        def few(xs):
            return ", ".join(xs[:4]) + (f" ... (+{len(xs) - 4} more)" if len(xs) > 4 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} with the wrong shape: {few(mismatched)}")
        raise CheckpointError(
            f"{what} weights do not match its config ({'; '.join(parts)}); "
            f"check that config.json belongs to these weights")
    return unflatten(out)


def params_to_state_dict(params, dtype=None) -> dict[str, np.ndarray]:
    """The inverse of :func:`state_dict_to_params`: canonical diffusers/transformers keys."""
    out = {}
    for path, v in flatten(params).items():
        leaf = path[-1]
        name = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
        arr = _to_torch(np.asarray(jax.device_get(v)), leaf)
        out[path_to_torch_key(path[:-1] + (name,))] = np.ascontiguousarray(
            arr if dtype is None else arr.astype(dtype))
    return out
