"""The resumable training loop (:func:`run`) that every recipe uses, and :func:`train`, the
text-encoder + UNet recipe (:mod:`sd_jax.train.diffusion`) run by it.  The VAE recipe is
:mod:`sd_jax.train.vae`.  The pieces: settings in :mod:`~sd_jax.train.config`, the compiled
step in :mod:`~sd_jax.train.step`, ``run.json`` and checkpoints in
:mod:`~sd_jax.train.checkpointing`, the loss log in :mod:`~sd_jax.train.log`, the export in
:mod:`~sd_jax.train.export`.

A run lives in one folder (``config.out``)::

    run.json            the settings (a restart with other settings is refused)
    checkpoints/N/      orbax checkpoints (step, params, optimizer state, EMA), last ``keep``
    loss.jsonl          one line per step: step, loss, lr, steps_per_s, time (training seconds
                        so far, across restarts), and task metrics (grad_norm, ...)
    loss.png            the loss curve (needs matplotlib: ``pip install 'sd-jax[train]'``)
    model/              the exported diffusers-format model (at the end)

Determinism and resumption: the batch of step ``k`` depends only on ``(seed, k)``
(:func:`sd_jax.train.data.batches` with ``start_step``) and so does the step's PRNG key
(``fold_in(key(seed), k)``, derived inside the compiled step), so a run that is killed
and restarted resumes from its latest checkpoint and continues exactly as if it had
never stopped: same data, same noise, same losses, same final parameters.

Devices: one ``jax.jit``-compiled step over the data-parallel mesh of
:mod:`sd_jax.sharding` (parameters and optimizer state replicated, the batch split over
every device; XLA inserts the gradient all-reduce).  With ``shard_params``
(``--shard-params``) the state and the frozen parameters are split over the devices by
the name rules of :class:`sd_jax.sharding.ParamRules` instead (fully-sharded data
parallelism: each device holds 1/N; XLA all-gathers each weight where it is used and
reduce-scatters its gradient); the checkpoints are written and restored sharded.  The state is donated to the step,
so it is updated in place.  Mixed precision (``dtype="bf16"``): the models compute in
bfloat16, parameters, optimizer state and the loss stay float32.
"""
from __future__ import annotations

import functools
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from typing import Callable, Iterator

import jax

from sd_jax import sharding
from sd_jax.families import shapes_text_encoder_config as small_text_encoder_config
from sd_jax.families import shapes_unet_config as small_unet_config
from sd_jax.train import data as data_lib
from sd_jax.train import optim
from sd_jax.train.checkpointing import check_run_folder, manager, restore, save, tidy_checkpoints
from sd_jax.train.config import DTYPES, RunConfig, TrainConfig
from sd_jax.train.diffusion import build_diffusion_task, init_params, param_shapes, resolve_configs
from sd_jax.train.export import export_diffusers, scheduler_config
from sd_jax.train.log import plot_log, read_log, say, truncate_log
from sd_jax.train.step import COMPILER_OPTIONS, compile_cheap, init_state, init_state_jit, train_step
from sd_jax.train.task import Task, TrainResult

# The names below the first line are re-exported: they lived here before the split.
__all__ = ["run", "train", "TrainingDiverged", "TrainingInterrupted", "tidy_checkpoints",
           "RunConfig", "TrainConfig", "TrainResult", "Task", "build_diffusion_task", "resolve_configs",
           "check_run_folder", "init_params", "param_shapes", "compile_cheap", "small_text_encoder_config",
           "small_unet_config", "export_diffusers", "scheduler_config", "read_log", "DTYPES", "COMPILER_OPTIONS"]


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run; the message says which checkpoint it resumes from."""


_MATPLOTLIB_NOTICE = []  # said once per process


def _check_matplotlib() -> None:
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None and not _MATPLOTLIB_NOTICE:
        _MATPLOTLIB_NOTICE.append(True)
        say("note: no loss.png without matplotlib (pip install 'sd-jax[train]'); the losses are in loss.jsonl")


def _sigterm_interrupts() -> Callable[[], None]:
    """Make SIGTERM (``kill``, a scheduler's preemption) stop the run as Ctrl-C does, with a
    checkpoint; returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    saved = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, saved)


# --------------------------------------------------------------------------- data

class _Prefetch:
    """Run a (deterministic) batch iterator ``depth`` batches ahead on a thread."""

    def __init__(self, it: Iterator, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._it = it
        self._t = threading.Thread(target=self._work, daemon=True)
        self._t.start()

    def _work(self):
        try:
            for item in self._it:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # re-raised in the training thread
            self._q.put(e)

    def __next__(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._t.join(timeout=5)


# --------------------------------------------------------------------------- the loop

def _export_weights(state, labels) -> dict:
    """The host weights an export writes: the EMA on the trained leaves if there is one."""
    host = jax.tree.map(sharding.to_host, {k: state[k] for k in ("params", "ema") if k in state})
    return optim.ema_params(host["ema"], host["params"], labels) if "ema" in host else host["params"]


def check_shard_params(config: RunConfig, mesh=None) -> None:
    """Refuse ``shard_params`` where there is nothing to split over (checked before a model is loaded)."""
    mesh = mesh if mesh is not None else sharding.make_mesh()
    if config.shard_params and mesh.devices.size == 1:
        raise ValueError("--shard-params splits the parameters over several devices but there is only one; "
                         "leave it out")


def run(config: RunConfig, task: Task, mesh=None) -> TrainResult:
    """Train ``task`` as ``config`` says, resuming from ``config.out``'s latest checkpoint."""

    mesh = mesh if mesh is not None else sharding.make_mesh()
    ndev = mesh.devices.size
    if config.batch_size % ndev:
        raise ValueError(f"batch size {config.batch_size} does not divide over the {ndev} devices; "
                         f"use a multiple of {ndev}")
    check_shard_params(config, mesh)
    opt = config.optim_config(task.trainable)
    rep = sharding.replicated(mesh)
    # The layout of the state (and of the frozen parameters): replicated, or split by name
    # rules over the data axis (--shard-params: each device holds 1/N of it).
    shard = sharding.ParamRules(mesh) if config.shard_params else rep
    os.makedirs(config.out, exist_ok=True)
    check_run_folder(config, task.name, write=True)

    labels = optim.labels_for(task.params, opt.trainable)
    n_train, n_all = optim.count_trainable(task.params, labels)
    n_frozen = sum(x.size for x in jax.tree.leaves(task.frozen))
    frozen = sharding.place(task.frozen, sharding.shardings_for(task.frozen, shard))

    if jax.process_index() == 0:
        tidy_checkpoints(os.path.join(config.out, "checkpoints"), config.keep)
    mngr = manager(config)
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.eval_shape(functools.partial(init_state, opt, rep), task.params)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                sharding.shardings_for(abstract, shard))
        try:
            state = restore(mngr, latest, abstract)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise ValueError(f"cannot resume from {config.out}/checkpoints/{latest}: it does not match this run "
                             f"({str(e).strip().splitlines()[0][:200]}); use another --out") from None
        start = int(state["step"])
        records = truncate_log(config.out, start) if jax.process_index() == 0 else []
    else:
        params = task.init() if task.init is not None else task.params
        # Placed shard by shard: a big model is never whole on one device.
        params = sharding.place(params, sharding.shardings_for(params, shard))
        state = init_state_jit(opt, shard, params)
        del params
        start = 0
        records = []
        if jax.process_index() == 0 and os.path.exists(os.path.join(config.out, "loss.jsonl")):
            os.remove(os.path.join(config.out, "loss.jsonl"))

    sharded = " (state sharded over them)" if config.shard_params else ""
    say(f"{task.name}: training {n_train:,} of {n_all:,} parameters ({n_frozen:,} frozen outside), "
         f"batch {config.batch_size} on {ndev} device(s){sharded}, {config.dtype}, "
         f"{'resuming at step ' + str(start) if start else 'from step 0'} of {config.steps}; run folder {config.out}")
    for note in task.notes:
        say(note)
    _check_matplotlib()

    stop = min(config.steps, config.stop_after or config.steps)
    data = log_file = pbar = t_prev = None
    unlogged: list = []  # (step, device metrics) of finished steps not yet in the log
    # "time" counts wall-clock seconds of training (compilation included) across restarts.
    t0 = time.time() - (records[-1]["time"] if records else 0.0)
    recent: list[float] = []

    def flush(keep: int = 0):
        """Log the finished steps' metrics but the last ``keep`` (fetching them waits for the steps)."""
        nonlocal t_prev
        while len(unlogged) > keep:
            s, m = unlogged[0]
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            now = time.time()
            if t_prev is not None:
                recent.append(now - t_prev)
                del recent[:-20]
            t_prev = now
            sps = len(recent) / sum(recent) if recent else 0.0
            rec = {"step": s, "loss": m.pop("loss"), "lr": optim.lr_at(opt, s - 1), "steps_per_s": round(sps, 4),
                   "time": round(now - t0, 3), **m}
            if not math.isfinite(rec["loss"]):
                raise TrainingDiverged(f"the loss is {rec['loss']} at step {s}; lower --lr (or use --dtype fp32) "
                                       f"and restart from the last checkpoint")
            unlogged.pop(0)
            records.append(rec)
            if log_file is not None:
                log_file.write(json.dumps(rec) + "\n")
            if pbar is not None:
                pbar.update(s - pbar.n)
                pbar.set_postfix({"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "steps/s": f"{sps:.2f}"},
                                 refresh=False)

    restore_sigterm = _sigterm_interrupts()
    try:
        if start < stop:
            data = _Prefetch(data_lib.batches(task.source, config.batch_size, config.seed, start_step=start,
                                              random_flip=config.random_flip, tokenizer=task.tokenize,
                                              time_ids="time_ids" in task.batch_keys))
            if jax.process_index() == 0:
                log_file = open(os.path.join(config.out, "loss.jsonl"), "a", encoding="utf-8")
            if config.progress and jax.process_index() == 0:
                from tqdm.auto import tqdm
                pbar = tqdm(total=config.steps, initial=start, desc=task.name, dynamic_ncols=True, file=sys.stderr)
        for step in range(start, stop):
            host = next(data)
            batch = sharding.shard_batch({k: host[k] for k in task.batch_keys}, mesh)
            with sharding.tracing_for(mesh):
                state, metrics = train_step(task.loss, opt, config.seed, shard, state, frozen, batch)
            unlogged.append((step + 1, metrics))
            flush(keep=1)  # the previous step's metrics: waits for it while this one runs
            if (step + 1) % config.save_every == 0 or step + 1 == stop:
                flush()
                if log_file is not None:
                    log_file.flush()
                save(mngr, step + 1, state)
                if task.on_save is not None:
                    weights = _export_weights(state, labels)
                if jax.process_index() == 0:
                    plot_log(config.out, records)
                    if task.on_save is not None:
                        task.on_save(weights)
        flush()
    except KeyboardInterrupt:
        # Save where we are, if the state is intact and the log has caught up with it (a second
        # Ctrl-C waits for that save).
        message = None
        try:
            if not any(x.is_deleted() for x in jax.tree.leaves(state)):
                flush()
                s = int(state["step"])
                if s > start and s not in mngr.all_steps() and records and records[-1]["step"] == s:
                    if log_file is not None:
                        log_file.flush()
                    save(mngr, s, state, raise_after=False)
                    message = f"interrupted: saved step {s}; run the same command again to resume"
        except Exception:  # noqa: BLE001 - never mask the interrupt
            pass
        if message is None:
            last = mngr.latest_step()
            message = ("interrupted before the first checkpoint; the same command starts again from step 0"
                       if last is None else f"interrupted: saved step {last}; run the same command again to resume")
        say(message)
        raise TrainingInterrupted(message) from None
    finally:
        restore_sigterm()
        if data is not None:
            data.close()
        if pbar is not None:
            pbar.close()
        if log_file is not None:
            log_file.close()
        mngr.wait_until_finished()
        mngr.close()

    finished_steps = int(state["step"])
    finished = finished_steps >= config.steps
    host_state = jax.tree.map(sharding.to_host, state)
    host_params = host_state["params"]
    ema = optim.ema_params(host_state["ema"], host_params, labels) if "ema" in host_state else None
    if jax.process_index() == 0:
        plot_log(config.out, records)
    export_dir = None
    if finished and config.export and task.export is not None:
        export_dir = os.path.join(config.out, task.export_name)
        if jax.process_index() == 0:
            task.export(export_dir, ema if ema is not None else host_params)
            say(f"exported {'the EMA weights' if ema is not None else 'the weights'} to {export_dir}")
    return TrainResult(step=finished_steps, params=host_params, ema=ema, log=records, export_dir=export_dir,
                       finished=finished)


def train(config: TrainConfig, mesh=None) -> TrainResult:
    """Train (or fine-tune) a text encoder + UNet; see :class:`TrainConfig` and the module docstring."""
    check_shard_params(config, mesh)
    config = resolve_configs(config)
    check_run_folder(config, "diffusion")
    return run(config, build_diffusion_task(config), mesh=mesh)
