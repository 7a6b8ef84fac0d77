"""What a training loop needs from a recipe (:class:`Task`) and what a run ends with
(:class:`TrainResult`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

__all__ = ["Task", "TrainResult"]

@dataclasses.dataclass
class Task:
    """What a training loop needs from a recipe.

    ``params``: the tree the optimizer sees (``{"text_encoder": ..., "unet": ...}``), or
    its ``jax.ShapeDtypeStruct`` tree with ``init`` computing it (called only when the
    run does not resume from a checkpoint); ``trainable``: the freezing patterns over it;
    ``frozen``: parameters the loss reads but nobody trains (the VAE), not checkpointed;
    ``loss``: a hashable ``(params | frozen, batch, key) -> (loss, metrics)``; ``source``
    + ``tokenize``: the data; ``batch_keys``: the arrays of a batch the loss needs;
    ``export(folder, params)`` writes the final model; ``on_save(params)``, if given, is
    called (on process 0) after every checkpoint with the weights an export would write.
    """
    name: str
    params: dict
    trainable: tuple[str, ...]
    frozen: dict
    loss: Any
    source: Any
    batch_keys: tuple[str, ...]
    export: Callable[[str, dict], None] | None = None
    tokenize: Callable[[list[str]], np.ndarray] | None = None
    init: Callable[[], dict] | None = None
    export_name: str = "model"
    notes: tuple[str, ...] = ()
    on_save: Callable[[dict], None] | None = None


@dataclasses.dataclass
class TrainResult:
    """The state a run ended in (host arrays): ``params``; ``ema`` (the full tree, EMA on the
    trained leaves) or None; ``log`` (the loss.jsonl records); ``export_dir`` or None;
    ``finished`` (False when it returned at ``stop_after``)."""
    step: int
    params: dict
    ema: dict | None
    log: list[dict]
    export_dir: str | None
    finished: bool
