"""sd-jax's own checkpoint format, and which format a model path is.

sd-jax's own format is a folder with ``sd_jax.json`` (the family, every component's
config, the scheduler), one folder per tokenizer (``tokenizer/``) and ``params/``, an
orbax checkpoint of ``{"text_encoder": ..., "unet": ..., "vae": ...}``.  It loads straight
onto the devices (no PyTorch-layout conversion), which makes it the fast way to start.
This module reads and writes the folder; :mod:`sd_jax.weights.loader` turns it into a model.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import threading
from typing import Mapping

import jax

from sd_jax import families
from sd_jax.diffusion.samplers import SchedulerConfig, default_scheduler_name
from sd_jax.tokenizer import save_tokenizer
from sd_jax.weights.safetensors_io import CheckpointError

__all__ = ["FORMAT", "detect_format", "read", "write", "pipeline_from_state_dicts"]

FORMAT = "sd-jax"
VERSION = 1


def detect_format(path: str) -> str:
    """``"diffusers"``, ``"sd-jax"`` or ``"single-file"``; a clear error for anything else."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "single-file"
        if path.endswith((".ckpt", ".bin", ".pt", ".pth")):
            raise CheckpointError(
                f"{path} is a pickle checkpoint, which can run code when loaded; re-save it as .safetensors "
                f"(or convert it to a diffusers folder) and load that")
        raise CheckpointError(f"{path} is not a model: expected a diffusers folder, an sd-jax checkpoint folder "
                              f"or a .safetensors single-file checkpoint")
    if not os.path.isdir(path):
        raise CheckpointError(f"model {path!r} not found")
    if os.path.isfile(os.path.join(path, "sd_jax.json")):
        return "sd-jax"
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "diffusers"
    raise CheckpointError(f"{path} has neither model_index.json (diffusers) nor sd_jax.json (sd-jax checkpoint); "
                          f"point --model at the model's top folder")


def read(path: str, *, param_dtype, sharding) -> tuple[dict, dict]:
    """``(sd_jax.json, params)`` of an sd-jax checkpoint; the parameters are restored as
    ``param_dtype`` with ``sharding`` (a ``jax.sharding.Sharding`` for every leaf)."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    with open(os.path.join(path, "sd_jax.json"), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/sd_jax.json is not an sd-jax checkpoint description")
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{path} has no params/ folder; the sd-jax checkpoint is incomplete")
    ckptr = ocp.StandardCheckpointer()
    try:
        structure = ckptr.metadata(params_dir)
        tree = getattr(structure, "item_metadata", structure)
        tree = getattr(tree, "tree", tree)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), param_dtype, sharding=sharding), tree)
        params = ckptr.restore(params_dir, target)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot read the sd-jax checkpoint {path}: {str(e).splitlines()[0]}") from None
    return meta, params


# ----------------------------------------------------------------------------- safe saving
def model_kind(path: str) -> str | None:
    """``"sd-jax"``, ``"diffusers"`` or ``"single-file"`` when ``path`` is itself a model, else None."""
    if os.path.isfile(path):
        return "single-file" if path.endswith(".safetensors") else None
    if os.path.isfile(os.path.join(path, "sd_jax.json")):
        return "sd-jax"
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return "diffusers"
    return None


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_destination(dest: str, sources=()) -> None:
    """Refuse (CheckpointError) a destination that saving a model there could destroy other files
    with: the filesystem root, a home folder, the working directory or any folder above them,
    a source model or a folder holding one, or an existing path that is not itself a model
    (an sd-jax checkpoint or a diffusers folder) or an empty folder.  Nothing is touched."""
    real = os.path.realpath(dest)
    for src in sources:
        if src and _inside(os.path.realpath(src), real):
            what = "is the source model" if os.path.realpath(src) == real else f"holds the source model {src}"
            raise CheckpointError(f"destination {dest} {what}; choose another destination")
    protected = [("the filesystem root", os.sep), ("the working directory", os.getcwd()),
                 ("your home folder", os.path.expanduser("~"))] + [("a home folder", h) for h in _homes()]
    for what, folder in protected:
        folder = os.path.realpath(folder)
        if _inside(folder, real):
            above = "" if folder == real else "a folder above "
            raise CheckpointError(f"destination {dest} is {above}{what}; give a new folder for the model")
    if not os.path.lexists(dest) or (os.path.isdir(dest) and not os.listdir(dest)):
        return
    if model_kind(dest) not in ("sd-jax", "diffusers"):
        kind = "a file" if os.path.isfile(dest) else "a folder that is not a model"
        raise CheckpointError(f"destination {dest} exists and is {kind} (not an sd-jax checkpoint or a diffusers "
                              f"folder); only a model is replaced: give a new or empty folder")


def _homes() -> list[str]:
    """Every user's home folder (where the platform lists them)."""
    try:
        import pwd
        return [p.pw_dir for p in pwd.getpwall() if p.pw_dir and os.path.isdir(p.pw_dir)]
    except (ImportError, OSError):
        return []


_STAGING = re.compile(r"\.tmp-(\d+)$")  # .NAME.tmp-PID beside NAME
_LEGACY_STAGING = re.compile(r"\.tmp-[a-z0-9_]{8}$")  # tempfile.mkdtemp's, from sd-jax <= 0.1.0
_STAGING_CONTENTS = {"model", "old"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def staging_folder(dest: str, pid: int | None = None) -> str:
    """The hidden folder beside ``dest`` a save writes into: ``.NAME.tmp-PID``, the pid telling a
    later save whether the process that made it is gone (see :func:`remove_stale_staging`)."""
    dest = os.path.abspath(dest)
    return os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.tmp-{pid or os.getpid()}")


def remove_stale_staging(dest: str) -> list[str]:
    """Remove the staging folders of saves to ``dest`` whose process is gone (killed, or the
    machine restarted); returns their paths.  Only folders sd-jax names and fills this way
    are touched: ``.NAME.tmp-PID`` holding ``model`` and/or ``old``."""
    dest = os.path.abspath(dest)
    parent, prefix = os.path.dirname(dest), f".{os.path.basename(dest)}"
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(prefix + ".tmp-"):
            continue
        rest, path = entry[len(prefix):], os.path.join(parent, entry)
        m = _STAGING.fullmatch(rest)
        if not (m or _LEGACY_STAGING.fullmatch(rest)) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if m and _alive(int(m.group(1))):
            continue
        if not set(os.listdir(path)) <= _STAGING_CONTENTS:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def writing_model(dest: str, sources=(), pid: int | None = None, primary: bool = True):
    """Yield a new folder to write a model into; when the block completes, it replaces ``dest``
    (an earlier model there is removed only then).  Interrupted or failed, ``dest`` is as it
    was and the staging folder is removed.  See :func:`check_destination` for what ``dest``
    may be.  ``primary`` False (other hosts of a multi-host save): only yield the folder."""
    check_destination(dest, sources)
    final = os.path.abspath(dest)
    work = staging_folder(final, pid)
    staged = os.path.join(work, "model")
    try:  # the staging folder is created inside the try: an interrupt right after still removes it
        if primary:
            remove_stale_staging(final)
            shutil.rmtree(work, ignore_errors=True)  # this process's own, from an earlier failed save
            os.makedirs(staged)
        yield staged
        if primary:
            old = os.path.join(work, "old")
            if os.path.lexists(final):
                os.rename(final, old)
            try:
                os.rename(staged, final)
            except BaseException:
                if os.path.lexists(old) and not os.path.lexists(final):
                    os.rename(old, final)
                raise
    finally:
        if primary:
            shutil.rmtree(work, ignore_errors=True)


def _owner_pid() -> int:
    """Process 0's pid on every host (they write one checkpoint together)."""
    if jax.process_count() == 1:
        return os.getpid()
    import numpy as np
    from jax.experimental import multihost_utils
    return int(multihost_utils.broadcast_one_to_all(np.int32(os.getpid())))


@contextlib.contextmanager
def interrupts_held(raise_after: bool = True):
    """Hold Ctrl-C and SIGTERM while orbax writes, then raise KeyboardInterrupt (if one came
    and ``raise_after``): an interrupt never cuts a save in half, nor lands in orbax's
    threads and event loop (which print a traceback or a warning each)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    saved = {sig: signal.signal(sig, lambda signum, frame: got.append(signum))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if got and raise_after:
        raise KeyboardInterrupt


def write(path: str, meta: dict, params, tokenizers: Mapping[str, object], sources=()) -> None:
    """Write an sd-jax checkpoint: ``meta`` (without ``format``/``version``) as ``sd_jax.json``,
    ``params`` with orbax, each tokenizer into its folder.  Written beside the destination and
    swapped in (:func:`writing_model`: what ``path`` may replace, never a folder of ``sources``),
    so an interrupted save never leaves half a checkpoint."""
    import orbax.checkpoint as ocp
    primary = jax.process_index() == 0
    with writing_model(path, sources, pid=_owner_pid(), primary=primary) as staged:
        if primary:
            for name, tok in tokenizers.items():
                save_tokenizer(tok, os.path.join(staged, name))
        with interrupts_held():
            ckptr = ocp.StandardCheckpointer()
            ckptr.save(os.path.join(staged, "params"), params)
            ckptr.wait_until_finished()
        if primary:
            with open(os.path.join(staged, "sd_jax.json"), "w", encoding="utf-8") as f:
                json.dump({"format": FORMAT, "version": VERSION, **meta}, f, indent=2)


def pipeline_from_state_dicts(cls, configs: dict, state_dicts: dict, tokenizer, scheduler_config: dict, *,
                              dtype, param_dtype, attention, mesh, source=None):
    """``cls`` (a pipeline class) built from diffusers-layout configs and state dicts.  Kept for
    callers of the old API; :func:`sd_jax.weights.loader.load` is the loader."""
    family = families.detect(configs)
    models = families.build_models(family, configs, dtype=dtype, param_dtype=param_dtype, attention=attention)
    params = families.params_from_state_dicts(family, models, state_dicts, param_dtype or dtype)
    name = default_scheduler_name(scheduler_config.get("_class_name", "PNDMScheduler"), scheduler_config)
    return cls(models, params, tokenizer, SchedulerConfig.from_dict(scheduler_config), name, mesh=mesh, source=source)
