"""The weight change of each LoRA format, and merging it into a kernel on the devices.

All formulas work in PyTorch's layout (``out, in[, kh, kw]``), where the papers and the
files state them; the kernel is moved to it and back (a transpose: exact).

* LoRA / LoCon (Hu et al. 2021, arXiv:2106.09685): ``dW = up @ down``; with a Tucker core
  (LyCORIS ``lora_mid``), ``dW[i,j,k,l] = sum_nm mid[n,m,k,l] up[i,n] down[m,j]``.
* LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv:2108.06098; LyCORIS):
  ``dW = (w1a @ w1b) * (w2a @ w2b)`` (element-wise), or with Tucker cores
  ``einsum("ijkl,jr,ip->prkl", t, wb, wa)`` for each half.
* LoKr (Yeh et al. 2023, LyCORIS, arXiv:2309.14859): ``dW = w1 kron w2`` with each side
  whole or ``a @ b`` (or a Tucker core for ``w2``).
* DoRA (Liu et al. 2024, arXiv:2402.09353): ``W' = m * (W + s dW) / ||W + s dW||``, the norm
  over every axis but the one ``m`` (``dora_scale``) lies along (the output axis, or the
  input axis in older LyCORIS files), plus float32 epsilon as LyCORIS; its change is
  ``W' - W``.

Each change is multiplied by its scale (alpha / rank) and the user's weight:
``W' = W + sum_i weight_i * scale_i * dW_i`` in float32, cast back to the kernel's dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

EPS = float(jnp.finfo(jnp.float32).eps)


def to_torch(kernel):
    """A Flax kernel ((in, out) or (kh, kw, in, out)) in PyTorch's layout."""
    return kernel.T if kernel.ndim == 2 else kernel.transpose(3, 2, 0, 1)


def to_flax(w):
    return w.T if w.ndim == 2 else w.transpose(2, 3, 1, 0)


def torch_shape(kernel_shape: tuple) -> tuple:
    s = tuple(kernel_shape)
    return s[::-1] if len(s) == 2 else (s[3], s[2], s[0], s[1])


def _tucker(t, wa, wb):
    return jnp.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def delta(kind: str, f: dict, shape: tuple):
    """The (unscaled) weight change of one layer, reshaped to ``shape`` (PyTorch layout)."""
    if kind == "lora":
        up = f["up"].reshape(f["up"].shape[0], -1)
        down = f["down"].reshape(f["down"].shape[0], -1)
        d = jnp.einsum("nmkl,in,mj->ijkl", f["mid"], up, down) if "mid" in f else up @ down
    elif kind == "loha":
        halves = []
        for i in ("1", "2"):
            a, b, t = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"], f.get(f"hada_t{i}")
            halves.append(a @ b if t is None else _tucker(t, a, b))
        d = halves[0].reshape(shape) * halves[1].reshape(shape)
    elif kind == "lokr":
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_w2" in f:
            w2 = f["lokr_w2"]
        elif "lokr_t2" in f:
            w2 = jnp.einsum("ijkl,ip,jr->prkl", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
        if len(shape) == 4 and w2.ndim == 2:  # a conv's w2 stored flat: (out2, in2 * kh * kw)
            w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
        w1 = w1.reshape(w1.shape + (1,) * (w2.ndim - w1.ndim))
        d = jnp.kron(w1, w2)
    else:
        raise ValueError(f"unknown LoRA kind {kind!r}")
    return d.reshape(shape)


def delta_size(kind: str, f: dict) -> tuple[int, int]:
    """(rows, elements) of :func:`delta`'s result before reshaping, from the factor shapes alone
    (no tracing: a file's layers are checked against the model before anything is merged)."""
    s = {k: tuple(np.shape(v)) for k, v in f.items()}
    prod = lambda t: int(np.prod(t))
    if kind == "lora":
        rows = s["up"][0]
        cols = s["down"][1] * prod(s["mid"][2:]) if "mid" in s else prod(s["down"][1:])
    elif kind == "loha":
        if "hada_t1" in s:
            rows, cols = s["hada_w1_a"][1], s["hada_w1_b"][1] * prod(s["hada_t1"][2:])
        else:
            rows, cols = s["hada_w1_a"][0], s["hada_w1_b"][1]
    else:
        w1 = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            w2 = s["lokr_w2"]
        elif "lokr_t2" in s:
            w2 = (s["lokr_w2_a"][1], s["lokr_w2_b"][1]) + s["lokr_t2"][2:]
        else:
            w2 = (s["lokr_w2_a"][0], s["lokr_w2_b"][1])
        rows, cols = w1[0] * w2[0], prod(w1[1:]) * prod(w2[1:])
    return rows, rows * cols


def weight_decompose(w, d, m):
    """DoRA: the change that takes ``w`` to ``m * (w + d) / ||w + d||`` (PyTorch layout)."""
    merged = w + d
    out_axis = m.shape[0] == merged.shape[0] and m.size == merged.shape[0]
    if out_axis:
        norm = jnp.linalg.norm(merged.reshape(merged.shape[0], -1), axis=1)
        norm = norm.reshape((-1,) + (1,) * (merged.ndim - 1))
    else:
        norm = jnp.linalg.norm(jnp.swapaxes(merged, 0, 1).reshape(merged.shape[1], -1), axis=1)
        norm = norm.reshape((1, -1) + (1,) * (merged.ndim - 2))
    return m.reshape(norm.shape) * merged / (norm + EPS) - w


def _dora_key(f: dict):
    return "dora_scale" if "dora_scale" in f else "magnitude" if "magnitude" in f else None


def layer_delta(kind: str, f: dict, scale, w, shape: tuple):
    """One LoRA's scaled change of a layer whose PyTorch-layout weight is ``w``."""
    d = delta(kind, f, shape) * scale
    key = _dora_key(f)
    return weight_decompose(w, d, f[key]) if key else d


@functools.partial(jax.jit, static_argnames=("kind",))
def add_delta(acc, kernel, factors: dict, scale, weight, kind: str):
    """``acc + weight * scale * dW`` (float32, Flax layout) for one LoRA of a layer whose base
    kernel is ``kernel`` (DoRA normalises against it).

    One call per LoRA and layer, so the compiled function depends on that LoRA's factor shapes
    only: another LoRA of the same rank, a second LoRA on the layer, or new weights (``scale``
    and ``weight`` are traced float32 scalars) reuse it."""
    shape = torch_shape(kernel.shape)
    if _dora_key(factors) is None:   # linear in one factor: scale that (small) one, not the product
        return acc + to_flax(delta(kind, _scaled(kind, factors, weight * scale), shape))
    w = to_torch(kernel.astype(jnp.float32))
    return acc + to_flax(weight * layer_delta(kind, factors, scale, w, shape))


def _scaled(kind: str, f: dict, c) -> dict:
    """``f`` with one factor multiplied by ``c``, so that ``delta(kind, result) == c * delta(kind, f)``:
    a scale applied to a rank-r factor costs r * (in + out) multiplications instead of the full
    layer's (on SD 1.5's biggest layers, 3x the merge's time when done after the product)."""
    name = {"lora": "up", "loha": "hada_w1_a"}.get(kind) or ("lokr_w1" if "lokr_w1" in f else "lokr_w1_a")
    return {**f, name: f[name] * c}
