"""The LoRA recipe (``sd-jax train lora``): low-rank adapters trained on a frozen model.

LoRA (Hu et al. 2021, arXiv:2106.09685): a targeted layer's kernel ``W`` (PyTorch layout
``out x in[, kh, kw]``) is used as ``W + (alpha / rank) * up @ down`` with ``down``
``(rank, in[, kh, kw])`` and ``up`` ``(out, rank[, 1, 1])`` (a convolution's ``down`` is a
convolution with the layer's kernel size and ``up`` a 1x1 one: LoCon).  ``down`` starts as
PEFT's (Kaiming-uniform with ``a = sqrt(5)``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``),
``up`` at zero, so training starts from the base model exactly.

Generic over the loss: the recipe is the fine-tuning task (:func:`sd_jax.train.diffusion.
build_diffusion_task`) with its parameters moved out of the optimizer into the frozen
inputs of the step, and its loss wrapped by :class:`LoraLoss`, which merges the adapters into
the targeted kernels inside the differentiated function.  Whatever that loss supports
(models, prediction types, min-SNR, remat) works with LoRA, SDXL included (its task,
:mod:`sd_jax.train.sdxl`, runs both text encoders inside the step: ``te`` adapts both, written
as ``lora_te1_`` / ``lora_te2_`` and ``text_encoder.`` / ``text_encoder_2.``; the UNet in
kohya's SGM block names).  The optimizer, the EMA and the
checkpoints hold only the factors; the base is not checkpointed (it is the ``--model``) and
can be stored in bfloat16 (``base_dtype="bf16"``: half its memory; merged kernels are
computed in float32).

Targets (``targets``, comma-separated in the CLI): see :data:`TARGETS`.  The result, at
every checkpoint and at the end, is ``OUT/lora/pytorch_lora_weights.safetensors``
(diffusers / PEFT: ``pipe.load_lora_weights(OUT + "/lora")``) and ``OUT/lora/NAME.safetensors``
(kohya / A1111, ``NAME`` the run folder's name), written by :mod:`sd_jax.lora.saving`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sd_jax.lora import merge, saving
from sd_jax.lora.state import _get, _set  # the pipeline's merge walks parameter trees the same way
from sd_jax.lora.targets import TargetTable
from sd_jax.train.checkpointing import check_run_folder
from sd_jax.train.config import TrainConfig
from sd_jax.train.diffusion import build_diffusion_task
from sd_jax.train.loop import run
from sd_jax.train.step import compile_cheap
from sd_jax.train.task import Task

__all__ = ["TARGETS", "BASE_DTYPES", "LoraTrainConfig", "LoraLoss", "select_targets", "lora_shapes", "init_lora",
           "build_lora_task", "train_lora", "lora_folder", "kohya_file_name"]

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# name -> (components, regex over a kernel's layer path "down_blocks_0/attentions_0/...").
TARGETS: dict[str, tuple[tuple[str, ...], str]] = {
    "attn": (("unet",), r"(^|/)attn\d+/(to_q|to_k|to_v|to_out_0)$"),       # PEFT's diffusers default
    "ff": (("unet",), r"(^|/)ff/net_(0/proj|2)$"),
    "proj": (("unet",), r"(^|/)attentions_\d+/(proj_in|proj_out)$"),
    "conv": (("unet",), r"(^|/)(resnets_\d+/(conv1|conv2|conv_shortcut)|(down|up)samplers_0/conv)$"),  # LoCon
    "te": (TEXT_ENCODERS, r"(^|/)(self_attn/(q_proj|k_proj|v_proj|out_proj)|mlp/fc[12])$"),
}
BASE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig(TrainConfig):
    """A LoRA run on ``model`` (required): ``rank``, ``alpha`` (None = rank: scale 1),
    ``targets`` (names of :data:`TARGETS`), ``base_dtype`` (``"fp32"`` or ``"bf16"``: how the
    frozen base is stored).  The other settings are :class:`~sd_jax.train.config.TrainConfig`'s;
    ``train`` does not apply (the adapters are what is trained)."""
    rank: int = 4
    alpha: float | None = None
    targets: tuple[str, ...] = ("attn",)
    base_dtype: str = "fp32"

    def __post_init__(self):
        if self.model is None:
            raise ValueError("LoRA training needs a model to adapt: --model DIR")
        super().__post_init__()
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"the LoRA rank must be a whole number of at least 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"the LoRA alpha must be positive, got {self.alpha}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            what = f"unknown LoRA target {unknown[0]!r}" if unknown else "no LoRA targets given"
            raise ValueError(f"{what}; choose from {', '.join(TARGETS)} (comma-separated)")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"unknown base dtype {self.base_dtype!r}; use {' or '.join(BASE_DTYPES)}")
        if self.train is not None:
            raise ValueError("a LoRA run trains the adapters only; choose the layers with targets (--targets), "
                             "not train (--train)")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def alpha_value(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


def select_targets(table: TargetTable, targets) -> tuple[tuple[str, tuple], ...]:
    """``((component, layer path), ...)`` of the model's kernels the named targets adapt, sorted."""
    found = set()
    for name in targets:
        comps, pattern = TARGETS[name]
        rx = re.compile(pattern)
        hits = {(c, p) for c in comps if c in table.kernels for p in table.kernels[c] if rx.search("/".join(p))}
        if not hits:
            raise ValueError(f"LoRA target {name!r} matches no layer of this model")
        found |= hits
    return tuple(sorted(found))


def _factor_shapes(kernel_shape: tuple, rank: int) -> tuple[tuple, tuple]:
    """(down, up) shapes, PyTorch layout, of a layer whose Flax kernel has ``kernel_shape``."""
    w = merge.torch_shape(kernel_shape)
    return (rank,) + w[1:], (w[0], rank) + ((1, 1) if len(w) == 4 else ())


def lora_shapes(table: TargetTable, targets, rank: int) -> dict:
    """The nested ``{component: {...path...: {"down", "up"}}}`` ``ShapeDtypeStruct`` tree (float32)."""
    tree: dict = {}
    for comp, path in targets:
        down, up = _factor_shapes(table.kernels[comp][path].shape, rank)
        node = {"down": jax.ShapeDtypeStruct(down, jnp.float32), "up": jax.ShapeDtypeStruct(up, jnp.float32)}
        parent = tree
        for k in (comp,) + path[:-1]:
            parent = parent.setdefault(k, {})
        parent[path[-1]] = node
    return tree


def init_lora(shapes: dict, seed: int) -> dict:
    """The factors at the start: ``down`` as PEFT's ``kaiming_uniform_(a=sqrt(5))``
    (``U(+-1/sqrt(fan_in))``, ``fan_in = in * kh * kw``), ``up`` zero.  Each layer's key is
    folded from the run's seed and the layer's position, so a run's start depends on ``seed`` only."""
    # one compiled program for every layer (eagerly, each factor shape would compile its own)
    return compile_cheap(functools.partial(_init_lora, shapes, seed))()


def _init_lora(shapes: dict, seed: int) -> dict:
    key = jax.random.fold_in(jax.random.key(seed), 0x10A)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, s) in enumerate(flat):
        if path[-1].key == "up":
            out.append(jnp.zeros(s.shape, s.dtype))
        else:
            bound = 1.0 / np.sqrt(np.prod(s.shape[1:]))
            out.append(jax.random.uniform(jax.random.fold_in(key, i), s.shape, s.dtype, -bound, bound))
    return jax.tree_util.tree_unflatten(treedef, out)


@dataclasses.dataclass(frozen=True)
class LoraLoss:
    """``loss(params, batch, key)`` of ``base`` (any loss over ``{component: params}``) with
    ``params["lora"]``'s adapters merged into the ``targets`` kernels: ``W + scale * up @ down``
    (float32).  Only the adapters receive gradients when the base parameters are frozen inputs."""
    base: Any
    targets: tuple[tuple[str, tuple], ...]
    scale: float

    def merge(self, params) -> dict:
        """``params`` without ``"lora"``, its targeted kernels replaced by the merged float32 ones."""
        lora = params["lora"]
        merged = {k: v for k, v in params.items() if k != "lora"}
        for comp, path in self.targets:
            f = _get(lora[comp], path)
            kernel = _get(merged[comp], path + ("kernel",))
            d = merge.to_flax(merge.delta("lora", f, merge.torch_shape(kernel.shape)))
            merged = _set(merged, (comp,) + path + ("kernel",), kernel.astype(jnp.float32) + self.scale * d)
        return merged

    def __call__(self, params, batch, key):
        return self.base(self.merge(params), batch, key)


def lora_folder(out: str) -> str:
    return os.path.join(out, "lora")


def kohya_file_name(out: str) -> str:
    """The kohya file's name: the run folder's (A1111 calls a LoRA by its file name)."""
    name = os.path.basename(os.path.normpath(os.path.abspath(out))) or "lora"
    return (name if name != "pytorch_lora_weights" else "lora") + ".safetensors"


def _writer(config: LoraTrainConfig, table: TargetTable):
    def write(folder: str, params: dict) -> None:
        factors = jax.tree.map(lambda x: np.asarray(x, np.float32), params["lora"])
        os.makedirs(folder, exist_ok=True)
        saving.save_peft(os.path.join(folder, saving.PEFT_FILE), table, factors, config.rank, config.alpha_value)
        saving.save_kohya(os.path.join(folder, kohya_file_name(config.out)), table, factors, config.rank,
                          config.alpha_value)
    return write


def build_lora_task(config: LoraTrainConfig) -> Task:
    """The fine-tuning task of ``config.model`` turned into a LoRA task (see the module docstring)."""
    base = build_diffusion_task(config)
    params = base.params                       # the model's components (host float32 arrays)
    table = TargetTable(params)
    targets = select_targets(table, config.targets)
    dt = BASE_DTYPES[config.base_dtype]
    stored = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    shapes = {"lora": lora_shapes(table, targets, config.rank)}
    n_lora = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    notes = base.notes + (f"LoRA rank {config.rank}, alpha {config.alpha_value:g} on {len(targets)} layers "
                          f"({', '.join(config.targets)}): {n_lora:,} parameters; base stored in {config.base_dtype}",)
    write = _writer(config, table)
    return dataclasses.replace(
        base, name="lora", params=shapes, trainable=("lora",), frozen={**stored, **base.frozen},
        loss=LoraLoss(base.loss, targets, float(config.scale)), init=functools.partial(
            lambda s, seed: {"lora": init_lora(s["lora"], seed)}, shapes, config.seed),
        export=write, export_name="lora", notes=notes, on_save=lambda params: write(lora_folder(config.out), params))


def train_lora(config: LoraTrainConfig, mesh=None):
    """Train a LoRA as ``config`` says (resuming from ``config.out``); returns the
    :class:`~sd_jax.train.task.TrainResult` (its ``params``: ``{"lora": factors}``)."""
    check_run_folder(config, "lora")
    return run(config, build_lora_task(config), mesh=mesh)
