"""A run folder's settings (``run.json``) and its orbax checkpoints (``checkpoints/N/``)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import numpy as np

from sd_jax.train.config import RESTART_MAY_CHANGE, RunConfig
from sd_jax.weights.checkpoint import interrupts_held

__all__ = ["RESERVED", "check_run_folder", "manager", "save", "restore", "tidy_checkpoints", "interrupts_held"]


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))


# What a run writes in its folder besides run.json: a folder holding one of these but no
# run.json of sd-jax's is someone else's, and is not written into.
RESERVED = ("loss.jsonl", "loss.png", "checkpoints", "model", "vae", "lora")


def _read_run_json(path: str) -> dict | None:
    """run.json's contents if sd-jax wrote it (``task`` and ``config``), else None."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("task"), str) and isinstance(data.get("config"), dict)
    return data if ok else None


def check_run_folder(config: RunConfig, name: str, write: bool = False) -> None:
    """Refuse to resume a run folder started with other settings (``run.json``), and a folder
    whose ``run.json`` or reserved files (:data:`RESERVED`) sd-jax did not write; with
    ``write``, record this run's settings there."""
    path = os.path.join(config.out, "run.json")
    mine = {"task": name, "config": _jsonable(dataclasses.asdict(config))}
    if os.path.lexists(path):
        theirs = _read_run_json(path)
        if theirs is None:
            raise ValueError(f"{path} was not written by sd-jax training; use another --out (or move that file)")
    else:
        theirs = None
        if os.path.isdir(config.out):
            found = sorted(set(os.listdir(config.out)) & set(RESERVED))
            if found:
                raise ValueError(f"{config.out} holds {', '.join(found)} but no run.json of sd-jax's: not a run "
                                 f"folder, and those would be replaced; use another --out")
    if theirs is not None:
        if theirs.get("task") != name:
            raise ValueError(f"{config.out} holds a {theirs.get('task')!r} run, not {name!r}; use another --out")
        # A setting added since the run started counts as its default.
        defaults = _jsonable({f.name: f.default for f in dataclasses.fields(config)
                              if f.default is not dataclasses.MISSING})
        old, new = {**defaults, **theirs["config"]}, mine["config"]
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


_ORBAX_TMP = re.compile(r"\d+\.orbax-checkpoint-tmp.*")


def tidy_checkpoints(folder: str, keep: int) -> list[str]:
    """Remove what an interrupted run can leave in its ``checkpoints/`` folder: orbax's
    unfinished ``N.orbax-checkpoint-tmp*`` folders (orbax would warn about them at the next
    save) and finished checkpoints beyond the newest ``keep``.  Returns the removed paths."""
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    steps = sorted((int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(folder, n))), reverse=True)
    doomed = [n for n in names if _ORBAX_TMP.fullmatch(n)] + [str(s) for s in steps[keep:]]
    for n in doomed:
        shutil.rmtree(os.path.join(folder, n), ignore_errors=True)
    return [os.path.join(folder, n) for n in doomed]


def save(mngr, step: int, state, raise_after: bool = True) -> None:
    import orbax.checkpoint as ocp
    with interrupts_held(raise_after):
        mngr.save(step, args=ocp.args.PyTreeSave(state), force=True)


def restore(mngr, step: int, abstract):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_utils
    return mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=checkpoint_utils.construct_restore_args(abstract)))
