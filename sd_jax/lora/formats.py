"""LoRA files -> one record per adapted layer, whatever the format.

A LoRA file is a flat ``{key: tensor}`` dict.  Each key is ``<layer name><suffix>``; the
suffix says which factor it is and so which format the layer uses:

=======================================  ==============  =====================================
suffix                                   kind            format
=======================================  ==============  =====================================
``.lora_down/.lora_up/.lora_mid.weight``  ``lora``        kohya / A1111 (LoCon: conv shapes;
                                                          ``lora_mid``: LyCORIS Tucker)
``.lora_A.weight`` / ``.lora_B.weight``   ``lora``        diffusers / PEFT
``.down.weight`` / ``.up.weight``         ``lora``        diffusers' attention processors
                                                          (``to_q_lora``, ``.lora.``,
                                                          ``.lora_linear_layer.``)
``.hada_w1_a`` ... ``.hada_t2``           ``loha``        LyCORIS LoHa
``.lokr_w1`` ... ``.lokr_t2``             ``lokr``        LyCORIS LoKr
``.alpha``                                (scale)         alpha / rank; absent: scale 1
``.dora_scale``                           (DoRA)          kohya / LyCORIS weight decomposition
=======================================  ==============  =====================================

Layer names come in two spellings: kohya's (``lora_unet_`` / ``lora_te_`` / ``lora_te1_`` /
``lora_te2_`` + the module path with ``_`` for ``.``) and dotted (``unet.`` /
``text_encoder.`` / ``text_encoder_2.`` + the module path).  :mod:`sd_jax.lora.targets`
maps them onto sd-jax's parameter paths.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np

# (suffix, factor name), longest suffixes first so ``.lora_down.weight`` wins over ``.down.weight``.
SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".dora_scale", "dora_scale"), (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"), (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".lokr_t2", "lokr_t2"),
)
KINDS = {"lora": ("down", "up"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
         "lokr": ()}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                  "lora_te_": "text_encoder"}
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}


@dataclasses.dataclass
class LayerRecord:
    """The factors of one adapted layer, as stored (numpy, PyTorch layout).

    name: the layer's name in the file (``lora_unet_down_blocks_0_..._to_q``, ``unet.down_blocks.0...``);
    component: ``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``, or None (not said: the UNet
      for dotted names, as diffusers' oldest files);  kind: ``"lora"``, ``"loha"`` or ``"lokr"``;
    factors: ``{factor name: float32 array}``;  alpha: float or None;  keys: the file's keys.
    """
    name: str
    component: str | None
    module: str            # the module path without the component prefix (``_`` or ``.`` separated)
    dotted: bool
    kind: str
    factors: dict
    alpha: float | None
    keys: list
    format: str

    @property
    def rank(self) -> int | None:
        f = self.factors
        if self.kind == "lora":
            return int(f["down"].shape[0])
        if self.kind == "loha":
            return int(f["hada_w1_b"].shape[0])
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in f:
                return int(f[k].shape[0])
        return None

    @property
    def scale(self) -> float:
        """alpha / rank (A1111's rule): 1 without alpha, and for a LoKr with no factorised matrix."""
        r = self.rank
        return 1.0 if self.alpha is None or r is None else float(self.alpha) / r


def _split(key: str):
    for suffix, factor in SUFFIXES:
        if key.endswith(suffix):
            return key[:-len(suffix)], factor
    return None, None


def _kind(factors: dict) -> str | None:
    if "down" in factors and "up" in factors:
        return "lora"
    if all(k in factors for k in KINDS["loha"]):
        return "loha"
    if ("lokr_w1" in factors or {"lokr_w1_a", "lokr_w1_b"} <= factors.keys()) and \
            ("lokr_w2" in factors or {"lokr_w2_a", "lokr_w2_b"} <= factors.keys()):
        return "lokr"
    return None


def _component(name: str):
    """(component, module path, dotted) of a layer name."""
    for prefix, comp in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            return comp, name[len(prefix):], False
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for prefix, comp in DOTTED_PREFIXES.items():
        if name.startswith(prefix):
            return comp, name[len(prefix):], True
    return None, name, "." in name


def _format(name: str, factors: dict, kind: str, dotted: bool) -> str:
    if kind == "loha":
        return "LyCORIS LoHa"
    if kind == "lokr":
        return "LyCORIS LoKr"
    if not dotted:
        return "kohya LoCon" if np.ndim(factors["down"]) == 4 and np.shape(factors["down"])[2:] != (1, 1) \
            else "kohya"
    if "_lora" in name.rsplit(".", 1)[-1] or name.endswith((".lora", ".lora_linear_layer")):
        return "diffusers attention processor"
    return "diffusers/PEFT"


def parse(state_dict: dict, metadata: dict | None = None):
    """``(records, unknown keys)``: one :class:`LayerRecord` per layer the file adapts, and the
    keys that are not part of any (unknown suffixes, incomplete factor sets).

    ``metadata``: the file's safetensors metadata; diffusers writes the PEFT config there
    (``lora_adapter_metadata``: ``lora_alpha``, ``r``, ``alpha_pattern``), which gives the
    alphas of a PEFT file that stores none."""
    groups: dict[str, dict] = {}
    keys_of: dict[str, list] = {}
    unknown = []
    for key, arr in state_dict.items():
        name, factor = _split(key)
        if name is None:
            unknown.append(key)
            continue
        groups.setdefault(name, {})[factor] = arr
        keys_of.setdefault(name, []).append(key)
    peft_alpha = _peft_alphas(metadata)
    records = []
    for name, g in groups.items():
        alpha = g.pop("alpha", None)
        kind = _kind(g)
        if kind is None:
            unknown.extend(keys_of[name])
            continue
        comp, module, dotted = _component(name)
        factors = {k: np.asarray(v, np.float32) for k, v in g.items()}
        if alpha is not None:
            alpha = float(np.asarray(alpha, np.float32).reshape(-1)[0])
        elif dotted and kind == "lora":
            alpha = peft_alpha(comp or "unet", module, int(factors["down"].shape[0]))
        records.append(LayerRecord(name, comp, module, dotted, kind, factors, alpha, keys_of[name],
                                   _format(name, factors, kind, dotted)))
    return records, unknown


def _peft_alphas(metadata: dict | None):
    """A function ``(component, module, rank) -> alpha or None`` from diffusers' metadata."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        meta = {}

    def alpha(comp, module, rank):
        if f"{comp}.lora_alpha" not in meta:
            return None
        pattern = meta.get(f"{comp}.alpha_pattern") or {}
        for k, v in pattern.items():  # PEFT matches a pattern at the end of the module name
            if module == k or module.endswith("." + k):
                return float(v)
        return float(meta[f"{comp}.lora_alpha"])
    return alpha
