"""The LoRAs applied to a pipeline: its base parameters kept, the merged ones in ``pipe.params``.

Generation's compiled function takes the parameters as an argument, so replacing the
merged kernels (same shapes, dtypes and shardings) never recompiles it, and generation
with LoRAs runs at the base model's speed.  The base parameters are kept as they were
loaded: unloading every LoRA puts those very arrays back (bit for bit).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from sd_jax import sharding
from sd_jax.lora import loading, merge


class LoraSet:
    """The LoRAs of one pipeline, in load order, each with its weight (the pipeline's
    :meth:`load_lora` / :meth:`set_lora_weights` / :meth:`unload_lora` call these)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.base = None          # the parameters before any LoRA
        self._merged = None       # what this set last put in pipe.params
        self.loras: dict[str, tuple[loading.Lora, dict, float]] = {}  # name -> (lora, device factors, weight)

    # ------------------------------------------------------------------ reading
    def model_description(self) -> str:
        fam = self.pipe.family
        return f"{fam.description} (family {fam.name})"

    def read(self, path_or_name: str, *, lora_dir: str | None = None, allow_partial: bool = False,
             name: str | None = None) -> loading.Lora:
        """Read and match a LoRA against this pipeline's model, without applying it."""
        path = loading.resolve(path_or_name, lora_dir)
        return loading.read(path, self._base_params(), model=self.model_description(),
                            cross_attention_dim=self.pipe.models.unet.config.cross_attention_dim,
                            allow_partial=allow_partial, name=name)

    def _base_params(self):
        if self.base is None or self.pipe.params is not self._merged:
            # first LoRA, or the pipeline's parameters were replaced since: those are the base now
            self.base, self.loras, self._merged = self.pipe.params, {}, None
        return self.base

    # ------------------------------------------------------------------ changing the set
    def load(self, path_or_name: str, weight: float = 1.0, *, lora_dir: str | None = None,
             allow_partial: bool = False, name: str | None = None) -> loading.Lora:
        """Read, match and merge a LoRA (replacing one of the same name); nothing changes on error."""
        weight = _check_weight(weight)
        lora = self.read(path_or_name, lora_dir=lora_dir, allow_partial=allow_partial, name=name)
        factors = sharding.replicate([m.record.factors for m in lora.matches], self.pipe.mesh)
        self.loras[lora.name] = (lora, factors, weight)
        try:
            self._apply()
        except BaseException:
            del self.loras[lora.name]
            raise
        return lora

    def set_weights(self, weights) -> None:
        """``{name: weight}`` or a list of weights in load order; names not given keep theirs."""
        if not isinstance(weights, dict):
            weights = list(weights)
            if len(weights) != len(self.loras):
                raise loading.LoraError(f"{len(weights)} weights given for {len(self.loras)} LoRAs")
            weights = dict(zip(self.loras, weights))
        unknown = [n for n in weights if n not in self.loras]
        if unknown:
            raise loading.LoraError(f"no LoRA named {unknown[0]!r} is loaded (loaded: {', '.join(self.loras) or 'none'})")
        checked = {n: _check_weight(w) for n, w in weights.items()}
        for n, w in checked.items():
            lora, factors, _ = self.loras[n]
            self.loras[n] = (lora, factors, w)
        self._apply()

    def unload(self, name: str | None = None) -> None:
        """Remove one LoRA (by name) or all; with none left the base parameters are back."""
        if name is not None:
            if name not in self.loras:
                raise loading.LoraError(f"no LoRA named {name!r} is loaded (loaded: {', '.join(self.loras) or 'none'})")
            del self.loras[name]
        else:
            self.loras.clear()
        self._apply()

    def use(self, specs, *, lora_dir: str | None = None, allow_partial: bool = False) -> None:
        """Make the set exactly ``specs``: ``[(path or name, weight), ...]`` (as a prompt's
        ``<lora:name:w>`` tags give them).  LoRAs already loaded are kept, not read again;
        everything is read before anything changes."""
        self._base_params()
        wanted = {}
        for spec, w in specs:
            path = loading.resolve(spec, lora_dir)
            wanted[path] = _check_weight(w)
        by_path = {lora.path: n for n, (lora, _, _) in self.loras.items()}
        new = {p: self.read(p, allow_partial=allow_partial) for p in wanted if p not in by_path}
        kept = {}
        for p, w in wanted.items():
            if p in by_path:
                lora, factors, _ = self.loras[by_path[p]]
            else:
                lora = new[p]
                factors = sharding.replicate([m.record.factors for m in lora.matches], self.pipe.mesh)
            kept[lora.name] = (lora, factors, w)
        self.loras = kept
        self._apply()

    @property
    def weights(self) -> dict[str, float]:
        return {n: w for n, (_, _, w) in self.loras.items()}

    # ------------------------------------------------------------------ merging
    def _apply(self) -> None:
        base = self._base_params() if self.base is None else self.base
        by_target: dict[tuple, list] = {}
        for lora, factors, w in self.loras.values():
            for m, f in zip(lora.matches, factors):
                by_target.setdefault((m.component, m.path), []).append((m.record, f, w))
        params = base
        for (comp, path), contribs in by_target.items():
            kernel = _get(base[comp], path + ("kernel",))
            acc = kernel.astype(jnp.float32)
            for record, f, w in contribs:
                acc = merge.add_delta(acc, kernel, f, np.float32(record.scale), np.float32(w), kind=record.kind)
            new = acc.astype(kernel.dtype)
            params = _set(params, (comp,) + path + ("kernel",), new)
        self._merged = params
        self.pipe.params = params


def _check_weight(w) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise loading.LoraError(f"a LoRA weight must be a number, got {w!r}") from None
    if not math.isfinite(w):
        raise loading.LoraError(f"a LoRA weight must be finite, got {w}")
    return w


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple, value) -> dict:
    """A copy of ``tree`` with the leaf at ``path`` replaced (only the dicts along it are copied)."""
    out = dict(tree)
    out[path[0]] = value if len(path) == 1 else _set(tree[path[0]], path[1:], value)
    return out

