"""A run folder's settings (``run.json``) and its orbax checkpoints (``checkpoints/N/``)."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from sd_jax.train.config import RESTART_MAY_CHANGE, RunConfig

__all__ = ["check_run_folder", "manager", "save", "restore"]

def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))


def check_run_folder(config: RunConfig, name: str, write: bool = False) -> None:
    """Refuse to resume a run folder started with other settings (``run.json``); with
    ``write``, record this run's settings there."""
    path = os.path.join(config.out, "run.json")
    mine = {"task": name, "config": _jsonable(dataclasses.asdict(config))}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            theirs = json.load(f)
        if theirs.get("task") != name:
            raise ValueError(f"{config.out} holds a {theirs.get('task')!r} run, not {name!r}; use another --out")
        old, new = theirs.get("config", {}), mine["config"]
        diff = sorted(k for k in set(old) | set(new) if k not in RESTART_MAY_CHANGE and old.get(k) != new.get(k))
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            raise ValueError(f"{config.out} was started with other settings ({what}); resume with the same "
                             f"settings or use another --out")
    if write and jax.process_index() == 0:
        os.makedirs(config.out, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(mine, f, indent=2)


def manager(config: RunConfig):
    """An orbax CheckpointManager for ``out/checkpoints`` keeping the last ``keep`` steps.

    Saving is synchronous (the state is donated to the next step right after) and writes
    each replicated array once, from one device (orbax's default "replica-parallel"
    saving slices every array over the replicas: one small compilation per shape and
    device, slow with many devices on one host).
    """
    import orbax.checkpoint as ocp
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (jax.Array, th.ArrayHandler(use_replica_parallel=False)),
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry)
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    handlers.add(None, ocp.args.PyTreeSave, handler)
    handlers.add(None, ocp.args.PyTreeRestore, handler)
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(config.out, "checkpoints")), options=options,
                                 handler_registry=handlers)


def save(mngr, step: int, state) -> None:
    import orbax.checkpoint as ocp
    mngr.save(step, args=ocp.args.PyTreeSave(state), force=True)


def restore(mngr, step: int, abstract):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_utils
    return mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=checkpoint_utils.construct_restore_args(abstract)))
