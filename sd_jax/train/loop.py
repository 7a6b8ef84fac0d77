"""Training loops: text encoder + UNet (:func:`train`) and the shared machinery the VAE
trainer (:mod:`sd_jax.train.vae`) uses too.

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
every device; XLA inserts the gradient all-reduce).  The state is donated to the step,
so it is updated in place.  Mixed precision (``dtype="bf16"``): the models compute in
bfloat16, parameters, optimizer state and the loss stay float32.
"""
from __future__ import annotations

import dataclasses
import functools
import contextlib
import json
import math
import os
import queue
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sd_jax import sharding
from sd_jax.models import clip as clip_lib
from sd_jax.models import unet as unet_lib
from sd_jax.models import vae as vae_lib
from sd_jax.train import data as data_lib
from sd_jax.train import optim
from sd_jax.train.losses import PREDICTION_TYPES, DiffusionLoss, NoiseSchedule

__all__ = ["RunConfig", "TrainConfig", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "Task", "run", "train",
           "build_diffusion_task", "resolve_configs", "check_run_folder", "init_params", "param_shapes",
           "compile_cheap",
           "small_text_encoder_config", "small_unet_config", "export_diffusers", "scheduler_config",
           "read_log", "tidy_checkpoints", "DTYPES"]

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}

# Settings that may change when a run is restarted (everything else must match run.json).
RESTART_MAY_CHANGE = ("out", "progress", "save_every", "keep", "stop_after", "export")


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the run; the message says which checkpoint it resumes from."""


# --------------------------------------------------------------------------- configuration

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings every training run has (the diffusion and VAE configs extend it).

    Steps count batches; with ``grad_accum = k`` the optimizer updates every ``k``
    batches (see :mod:`sd_jax.train.optim`).  ``batch_size`` is the global batch (split
    over the devices; it must divide by their number).  ``data``: a folder of images with
    captions (:class:`sd_jax.train.data.ImageCaptionFolder`), or None for the synthetic
    shapes; ``skip_bad_images``: train without its unreadable images instead of refusing.
    ``stop_after``: return after that many steps (checkpoint saved, no export), as if
    killed there -- for tests and for training in slices.
    """
    out: str
    steps: int = 1000
    batch_size: int = 8
    seed: int = 0
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "cosine"
    final_lr_ratio: float = 0.0
    weight_decay: float = 1e-2
    clip_norm: float | None = 1.0
    grad_accum: int = 1
    ema: float = 0.0
    dtype: str = "fp32"
    remat: bool = False
    save_every: int = 500
    keep: int = 3
    data: str | None = None
    skip_bad_images: bool = False
    size: int = 64
    random_flip: bool = False
    max_shapes: int = 1
    export: bool = True
    progress: bool = True
    stop_after: int | None = None

    def __post_init__(self):
        if not self.out:
            raise ValueError("an output folder is needed (--out DIR)")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not supported for training; use bf16 or fp32")
        if self.save_every < 1:
            raise ValueError(f"save-every must be at least 1, got {self.save_every}")
        if self.keep < 1:
            raise ValueError(f"keep must be at least 1, got {self.keep}")
        if self.size < 8 or self.size % 8:
            raise ValueError(f"size must be a multiple of 8, got {self.size}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be at least 1, got {self.stop_after}")
        if self.data is not None and not os.path.isdir(self.data):
            raise ValueError(f"data folder {self.data!r} not found")
        self.optim_config(("x",))  # validates the optimizer settings

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def optim_config(self, trainable) -> optim.OptimConfig:
        return optim.OptimConfig(lr=self.lr, steps=self.steps, warmup=self.warmup, schedule=self.schedule,
                                 final_lr_ratio=self.final_lr_ratio, weight_decay=self.weight_decay,
                                 clip_norm=self.clip_norm or None, grad_accum=self.grad_accum, ema=self.ema,
                                 trainable=tuple(trainable))


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Text-encoder + UNet training (from scratch or fine-tuning).

    From scratch (``model`` None): ``vae`` (a trained VAE: its run folder or a diffusers
    ``vae/`` folder) is required; the text encoder and UNet are built from
    ``text_encoder_config`` / ``unet_config`` (default: the small shapes model,
    :func:`small_text_encoder_config` / :func:`small_unet_config`) with the shapes
    tokenizer (``tokenizer``: another CLIP tokenizer folder).  Fine-tuning: ``model`` is
    a diffusers folder or an sd-jax checkpoint; ``vae`` may replace its VAE.

    ``train``: components (``unet``, ``text_encoder``) or regexes over parameter paths
    (see :mod:`sd_jax.train.optim`); default: both from scratch, ``unet`` when
    fine-tuning.  ``prediction_type``: None = the model's scheduler config (epsilon from
    scratch).  ``snr_gamma``: min-SNR-gamma weighting (e.g. 5.0), None = off.
    """
    model: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    text_encoder_config: clip_lib.CLIPTextConfig | None = None
    unet_config: unet_lib.UNetConfig | None = None
    train: tuple[str, ...] | None = None
    prediction_type: str | None = None
    snr_gamma: float | None = None
    caption_dropout: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.prediction_type is not None and self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {self.prediction_type!r}; "
                             f"use one of {', '.join(PREDICTION_TYPES)}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"snr gamma must be positive, got {self.snr_gamma}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption dropout must be in [0, 1), got {self.caption_dropout}")
        for name in ("model", "vae", "tokenizer"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ValueError(f"{name} {path!r} not found")
        if self.model is None and self.vae is None:
            raise ValueError("training from scratch needs a trained VAE (--vae DIR; train one with "
                             "`sd-jax train vae`), or start from a model (--model)")


# --------------------------------------------------------------------------- small model

def small_text_encoder_config(vocab_size: int = 873, **overrides) -> clip_lib.CLIPTextConfig:
    """The shapes model's text encoder: 4 layers of width 128, 77 positions (0.91M parameters, 3.7 MB)."""
    base = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    base.update(overrides)
    return clip_lib.CLIPTextConfig(**base)


def small_unet_config(sample_size: int = 16, latent_channels: int = 4, cross_attention_dim: int = 128,
                      **overrides) -> unet_lib.UNetConfig:
    """The shapes model's UNet: 3 levels (16x16, 8x8, 4x4 latents), widths 32/64/128, one
    ResNet per level, cross-attention (4 heads) at the two lower levels and in the middle
    (4.2M parameters, 17 MB: with the VAE and text encoder the model is 23 MB in float32)."""
    base = dict(sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels,
                block_out_channels=(32, 64, 128), layers_per_block=1,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=16, cross_attention_dim=cross_attention_dim, attention_head_dim=4)
    base.update(overrides)
    return unet_lib.UNetConfig(**base)


# --------------------------------------------------------------------------- tasks

@dataclasses.dataclass
class Task:
    """What a training loop needs from a recipe.

    ``params``: the tree the optimizer sees (``{"text_encoder": ..., "unet": ...}``), or
    its ``jax.ShapeDtypeStruct`` tree with ``init`` computing it (called only when the
    run does not resume from a checkpoint); ``trainable``: the freezing patterns over it;
    ``frozen``: parameters the loss reads but nobody trains (the VAE), not checkpointed;
    ``loss``: a hashable ``(params | frozen, batch, key) -> (loss, metrics)``; ``source``
    + ``tokenize``: the data; ``batch_keys``: the arrays of a batch the loss needs;
    ``export(folder, params)`` writes the final model.
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


# --------------------------------------------------------------------------- the compiled step

_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _constrain(tree, shard):
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, shard), tree)


def _init_state(opt: optim.OptimConfig, shard, params):
    labels = optim.labels_for(params, opt.trainable)
    tx = optim.make_optimizer(opt, labels)
    params = jax.tree.map(lambda p: jnp.copy(p.astype(jnp.float32)) if jnp.issubdtype(p.dtype, jnp.floating)
                          else jnp.copy(p), params)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    if opt.ema:
        state["ema"] = optim.ema_init(params, labels)
    return _constrain(state, shard)


_init_state_jit = jax.jit(_init_state, static_argnums=(0, 1))


# Extra XLA options for compiling the train step, e.g. {"xla_backend_optimization_level": 0}:
# on CPU that compiles ~2.5x faster and runs ~2.5x slower, a good trade only for tiny
# models trained a few steps (the tests set it).
COMPILER_OPTIONS: dict = {}


@functools.lru_cache(maxsize=None)
def _train_step_jit(options: tuple):
    return jax.jit(_train_step_fn, static_argnums=(0, 1, 2, 3), donate_argnums=(4,),
                   compiler_options=dict(options) or None)


def _train_step(*args):
    return _train_step_jit(tuple(sorted(COMPILER_OPTIONS.items())))(*args)


def _train_step_fn(loss, opt: optim.OptimConfig, seed: int, shard, state, frozen, batch):
    """One batch: gradients, optimizer update, EMA.  Static arguments are hashable, so runs
    with equal settings (and equal shapes and shardings) reuse the compiled program."""
    labels = optim.labels_for(state["params"], opt.trainable)
    tx = optim.make_optimizer(opt, labels)
    key = jax.random.fold_in(jax.random.key(seed), state["step"])

    def objective(p):
        # Frozen leaves behind stop_gradient: XLA does not compute their gradients at all.
        p = jax.tree.map(lambda x, lab: x if lab == optim.TRAIN else jax.lax.stop_gradient(x), p, labels)
        return loss({**p, **frozen}, batch, key)

    (value, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    step = state["step"] + 1
    new = {"step": step, "params": params, "opt_state": opt_state}
    if opt.ema:
        k = opt.grad_accum
        ema = optim.ema_update(state["ema"], params, labels, opt.ema, step // k - 1)
        if k > 1:  # only after the batches that complete an update
            ema = jax.tree.map(lambda a, b: jnp.where(step % k == 0, a, b), ema, state["ema"])
        new["ema"] = ema
    metrics = {"loss": value, **metrics, "grad_norm": _global_norm(grads)}
    return _constrain(new, shard), _constrain(metrics, shard)


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


# --------------------------------------------------------------------------- logging

def read_log(out: str) -> list[dict]:
    """The records of ``out/loss.jsonl``."""
    path = os.path.join(out, "loss.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _truncate_log(out: str, step: int) -> list[dict]:
    """Drop the records after ``step`` (written after the checkpoint we resume from)."""
    records = [r for r in read_log(out) if r["step"] <= step]
    with open(os.path.join(out, "loss.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def plot_log(out: str, records: list[dict]) -> str | None:
    """Write ``out/loss.png`` (loss, its running mean and the learning rate); None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not records:
        return None
    steps = np.array([r["step"] for r in records])
    loss = np.array([r["loss"] for r in records], np.float64)
    w = max(1, min(len(loss) // 20, 100))
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(steps, loss, color="C0", alpha=0.3, lw=0.8, label="loss")
    ax.plot(steps[w - 1:], smooth, color="C0", lw=1.8, label=f"running mean ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if loss.min() > 0 and loss.max() / loss.min() > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in records], color="C1", lw=1, label="learning rate")
    ax2.set_ylabel("learning rate", color="C1")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path)
    plt.close(fig)
    return path


_MATPLOTLIB_NOTICE = []  # said once per process


def _check_matplotlib() -> None:
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None and not _MATPLOTLIB_NOTICE:
        _MATPLOTLIB_NOTICE.append(True)
        _say("note: no loss.png without matplotlib (pip install 'sd-jax[train]'); the losses are in loss.jsonl")


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- run folder

def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))


# What a run writes in its folder besides run.json: a folder holding one of these but no
# run.json of sd-jax's is someone else's, and is not written into.
RESERVED = ("loss.jsonl", "loss.png", "checkpoints", "model", "vae")


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


def _manager(config: RunConfig):
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


@contextlib.contextmanager
def _interrupts_held(raise_after: bool = True):
    """Hold Ctrl-C and SIGTERM while a checkpoint is written, then raise KeyboardInterrupt
    (if one came and ``raise_after``): an interrupt never cuts a save in half, nor lands in
    orbax's threads (which print a traceback each)."""
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


def _sigterm_interrupts() -> Callable[[], None]:
    """Make SIGTERM (``kill``, a scheduler's preemption) stop the run as Ctrl-C does, with a
    checkpoint; returns the function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    saved = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, saved)


def _save(mngr, step: int, state, raise_after: bool = True) -> None:
    import orbax.checkpoint as ocp
    with _interrupts_held(raise_after):
        mngr.save(step, args=ocp.args.PyTreeSave(state), force=True)


def _restore(mngr, step: int, abstract):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_utils
    return mngr.restore(step, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=checkpoint_utils.construct_restore_args(abstract)))


# --------------------------------------------------------------------------- the loop

def run(config: RunConfig, task: Task, mesh=None) -> TrainResult:
    """Train ``task`` as ``config`` says, resuming from ``config.out``'s latest checkpoint."""

    mesh = mesh if mesh is not None else sharding.make_mesh()
    ndev = mesh.devices.size
    if config.batch_size % ndev:
        raise ValueError(f"batch size {config.batch_size} does not divide over the {ndev} devices; "
                         f"use a multiple of {ndev}")
    opt = config.optim_config(task.trainable)
    rep = sharding.replicated(mesh)
    os.makedirs(config.out, exist_ok=True)
    check_run_folder(config, task.name, write=True)

    labels = optim.labels_for(task.params, opt.trainable)
    n_train, n_all = optim.count_trainable(task.params, labels)
    n_frozen = sum(x.size for x in jax.tree.leaves(task.frozen))
    frozen = sharding.replicate(task.frozen, mesh)

    if jax.process_index() == 0:
        tidy_checkpoints(os.path.join(config.out, "checkpoints"), config.keep)
    mngr = _manager(config)
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.eval_shape(functools.partial(_init_state, opt, rep), task.params)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
        try:
            state = _restore(mngr, latest, abstract)
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise ValueError(f"cannot resume from {config.out}/checkpoints/{latest}: it does not match this run "
                             f"({str(e).strip().splitlines()[0][:200]}); use another --out") from None
        start = int(state["step"])
        records = _truncate_log(config.out, start) if jax.process_index() == 0 else []
    else:
        params = sharding.replicate(task.init() if task.init is not None else task.params, mesh)
        state = _init_state_jit(opt, rep, params)
        del params
        start = 0
        records = []
        if jax.process_index() == 0 and os.path.exists(os.path.join(config.out, "loss.jsonl")):
            os.remove(os.path.join(config.out, "loss.jsonl"))

    _say(f"{task.name}: training {n_train:,} of {n_all:,} parameters ({n_frozen:,} frozen outside), "
         f"batch {config.batch_size} on {ndev} device(s), {config.dtype}, "
         f"{'resuming at step ' + str(start) if start else 'from step 0'} of {config.steps}; run folder {config.out}")
    for note in task.notes:
        _say(note)
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
                                              random_flip=config.random_flip, tokenizer=task.tokenize))
            if jax.process_index() == 0:
                log_file = open(os.path.join(config.out, "loss.jsonl"), "a", encoding="utf-8")
            if config.progress and jax.process_index() == 0:
                from tqdm.auto import tqdm
                pbar = tqdm(total=config.steps, initial=start, desc=task.name, dynamic_ncols=True, file=sys.stderr)
        for step in range(start, stop):
            host = next(data)
            batch = sharding.shard_batch({k: host[k] for k in task.batch_keys}, mesh)
            state, metrics = _train_step(task.loss, opt, config.seed, rep, state, frozen, batch)
            unlogged.append((step + 1, metrics))
            flush(keep=1)  # the previous step's metrics: waits for it while this one runs
            if (step + 1) % config.save_every == 0 or step + 1 == stop:
                flush()
                if log_file is not None:
                    log_file.flush()
                _save(mngr, step + 1, state)
                if jax.process_index() == 0:
                    plot_log(config.out, records)
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
                    _save(mngr, s, state, raise_after=False)
                    message = f"interrupted: saved step {s}; run the same command again to resume"
        except Exception:  # noqa: BLE001 - never mask the interrupt
            pass
        if message is None:
            last = mngr.latest_step()
            message = ("interrupted before the first checkpoint; the same command starts again from step 0"
                       if last is None else f"interrupted: saved step {last}; run the same command again to resume")
        _say(message)
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
            _say(f"exported {'the EMA weights' if ema is not None else 'the weights'} to {export_dir}")
    return TrainResult(step=finished_steps, params=host_params, ema=ema, log=records, export_dir=export_dir,
                       finished=finished)


# --------------------------------------------------------------------------- diffusion task

def _unwrap(p):
    return p["params"] if isinstance(p, dict) and set(p) == {"params"} else p


def resolve_vae(path: str) -> str:
    """A VAE run folder (``vae/`` inside), a diffusers model (``vae/`` inside) or a ``vae/`` folder."""
    for cand in (os.path.join(path, "vae"), os.path.join(path, "model", "vae"), path):
        if os.path.isfile(os.path.join(cand, "config.json")):
            return cand
    raise ValueError(f"no VAE in {path!r}: expected a VAE run folder or a diffusers vae/ folder (with config.json)")


def scheduler_config(schedule: NoiseSchedule, prediction_type: str) -> dict:
    """The ``scheduler/scheduler_config.json`` of an exported model (DPM-Solver++ 2M)."""
    return {
        "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.42.1",
        "num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end, "beta_schedule": schedule.beta_schedule, "trained_betas": None,
        "prediction_type": prediction_type, "solver_order": 2, "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
        "use_karras_sigmas": False, "final_sigmas_type": "zero", "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "variance_type": None,
        # "trailing" starts sampling at t = T - 1 (pure noise), which a small model needs.
        "timestep_spacing": "trailing", "steps_offset": 1,
        "rescale_betas_zero_snr": schedule.rescale_betas_zero_snr,
    }


def export_diffusers(folder: str, *, text_encoder, unet, vae, params: dict, vae_params, tokenizer_dir: str | None,
                     schedule: NoiseSchedule, prediction_type: str) -> None:
    """Write a diffusers-format model folder with each model's ``save``."""
    from sd_jax.data.tokenizer import write_tokenizer
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(folder)
    f32 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float32), tree)  # noqa: E731
    clip_lib.save(os.path.join(folder, "text_encoder"), text_encoder.config, f32(params["text_encoder"]))
    unet_lib.save(os.path.join(folder, "unet"), unet.config, f32(params["unet"]))
    vae_lib.save(os.path.join(folder, "vae"), vae.config, f32(vae_params))
    if tokenizer_dir is None:
        write_tokenizer(os.path.join(folder, "tokenizer"))
    else:
        shutil.copytree(tokenizer_dir, os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
        json.dump(scheduler_config(schedule, prediction_type), f, indent=2)
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def _load_model(path: str):
    """(text encoder config, unet config, vae config, params, tokenizer folder, scheduler dict) of a model."""
    from sd_jax.weights import checkpoint
    from sd_jax.weights.diffusers import read_config
    fmt = checkpoint.detect_format(path)
    if fmt == "diffusers":
        te, te_p = clip_lib.load(os.path.join(path, "text_encoder"), dtype=jnp.float32)
        un, un_p = unet_lib.load(os.path.join(path, "unet"), dtype=jnp.float32)
        va, va_p = vae_lib.load(os.path.join(path, "vae"), dtype=jnp.float32)
        sched = read_config(os.path.join(path, "scheduler"), "scheduler_config.json")
        return (te.config, un.config, va.config, {"text_encoder": _unwrap(te_p), "unet": _unwrap(un_p)},
                _unwrap(va_p), os.path.join(path, "tokenizer"), sched)
    if fmt == "sd-jax":
        from sd_jax.pipeline import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=jnp.float32)
        p = jax.device_get(pipe.params)
        return (pipe.models.text_encoder.config, pipe.models.unet.config, pipe.models.vae.config,
                {"text_encoder": _unwrap(p["text_encoder"]), "unet": _unwrap(p["unet"])}, _unwrap(p["vae"]),
                os.path.join(path, "tokenizer"), dataclasses.asdict(pipe.scheduler_config))
    raise ValueError(f"{path} is a single-file checkpoint; convert it to a diffusers folder first "
                     f"(`sd-jax convert {path} DIR --to diffusers`)")


def compile_cheap(fn, *args):
    """``jax.jit(fn)`` compiled for ``args``, for functions run once or a few times
    (initialisation, calibration): on CPU without LLVM optimisations, which compiles ~2x
    faster; the program runs slower, which does not matter for these."""
    lowered = jax.jit(fn).lower(*args)
    opts = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else {}
    return lowered.compile(compiler_options=opts)


def run_once(fn, *args):
    """``jax.jit(fn)(*args)`` compiled by :func:`compile_cheap`."""
    return compile_cheap(fn, *args)(*args)


def _init_fn(te_cfg, unet_cfg):
    def init(key):
        te = clip_lib.CLIPTextModel(te_cfg)
        un = unet_lib.UNet2DConditionModel(unet_cfg)
        return {"text_encoder": te.init_params(jax.random.fold_in(key, 1)),
                "unet": un.init(jax.random.fold_in(key, 2), *un.dummy_inputs())["params"]}
    return init


@functools.lru_cache(maxsize=4)
def _compiled_init(te_cfg, unet_cfg):
    return compile_cheap(_init_fn(te_cfg, unet_cfg), jax.random.key(0))


def init_params(te_cfg, unet_cfg, seed: int) -> dict:
    """Random ``{"text_encoder": ..., "unet": ...}`` parameters (float32) from the models' own initialisers."""
    return _compiled_init(te_cfg, unet_cfg)(jax.random.key(seed))


def param_shapes(te_cfg, unet_cfg) -> dict:
    """The ``jax.ShapeDtypeStruct`` tree of :func:`init_params` (nothing computed)."""
    return jax.eval_shape(_init_fn(te_cfg, unet_cfg), jax.random.key(0))


def build_diffusion_task(config: TrainConfig) -> Task:
    """Models, parameters, loss, data and export of a text-encoder + UNet run."""
    from sd_jax.tokenizer import load_tokenizer, tokenize
    dt = config.compute_dtype
    notes = []
    init = None
    if config.model is not None:
        te_cfg, unet_cfg, vae_cfg, params, vae_params, tok_dir, sched = _load_model(config.model)
        schedule = NoiseSchedule.from_dict(sched)
        prediction_type = config.prediction_type or sched.get("prediction_type", "epsilon")
        trainable = config.train or ("unet",)
        if config.text_encoder_config is not None or config.unet_config is not None:
            raise ValueError("model configs cannot be given when fine-tuning a model (--model)")
    else:
        schedule = NoiseSchedule()
        prediction_type = config.prediction_type or "epsilon"
        trainable = config.train or ("text_encoder", "unet")
        tok_dir = config.tokenizer
        sched = None
    if config.tokenizer is not None:
        tok_dir = config.tokenizer
    if tok_dir is None:
        from sd_jax.data.tokenizer import write_tokenizer
        tok_dir = os.path.join(config.out, "tokenizer")
        if jax.process_index() == 0:
            os.makedirs(config.out, exist_ok=True)
            write_tokenizer(tok_dir)
    tokenizer = load_tokenizer(tok_dir)

    if config.vae is not None:
        vae_model, vae_p = vae_lib.load(resolve_vae(config.vae), dtype=jnp.float32)
        vae_cfg, vae_params = vae_model.config, _unwrap(vae_p)
    factor = vae_cfg.downscale_factor

    if config.model is None:
        te_cfg = config.text_encoder_config or small_text_encoder_config(len(tokenizer))
        unet_cfg = config.unet_config or small_unet_config(config.size // factor, vae_cfg.latent_channels,
                                                           te_cfg.hidden_size)
        if te_cfg.vocab_size < len(tokenizer):
            raise ValueError(f"the text encoder's vocabulary ({te_cfg.vocab_size}) is smaller than the "
                             f"tokenizer's ({len(tokenizer)})")
        params = param_shapes(te_cfg, unet_cfg)
        init = functools.partial(init_params, te_cfg, unet_cfg, config.seed)
    if unet_cfg.in_channels != vae_cfg.latent_channels or unet_cfg.out_channels != vae_cfg.latent_channels:
        raise ValueError(f"the UNet takes {unet_cfg.in_channels} channels but the VAE makes "
                         f"{vae_cfg.latent_channels}-channel latents")
    cross = unet_cfg.cross_dims[0]
    if cross != te_cfg.hidden_size:
        raise ValueError(f"the UNet's cross_attention_dim {cross} differs from the text encoder's width "
                         f"{te_cfg.hidden_size}")
    need = factor * 2 ** (len(unet_cfg.block_out_channels) - 1)
    if config.size % need:
        raise ValueError(f"size {config.size} must be a multiple of {need} for this VAE and UNet")

    te = clip_lib.CLIPTextModel(te_cfg, dtype=dt, param_dtype=jnp.float32)
    un = unet_lib.UNet2DConditionModel(unet_cfg, dtype=dt, param_dtype=jnp.float32)
    va = vae_lib.AutoencoderKL(vae_cfg, dtype=dt, param_dtype=jnp.float32)
    max_len = te_cfg.max_position_embeddings
    empty = tuple(int(i) for i in tokenize(tokenizer, [""], max_len)[0])
    loss = DiffusionLoss(te, un, va, schedule=schedule, prediction_type=prediction_type,
                         snr_gamma=config.snr_gamma, caption_dropout=config.caption_dropout, empty_ids=empty,
                         remat=config.remat)
    if config.data is not None:
        source = data_lib.ImageCaptionFolder(config.data, config.size, skip_bad=config.skip_bad_images)
        notes.append(source.summary())
    else:
        source = data_lib.SyntheticShapes(config.seed, config.size, "train", config.max_shapes)
    export_tok = None if (config.model is None and config.tokenizer is None) else tok_dir

    def export(folder, p):
        export_diffusers(folder, text_encoder=te, unet=un, vae=va, params=p, vae_params=vae_params,
                         tokenizer_dir=export_tok, schedule=schedule, prediction_type=prediction_type)

    return Task(name="diffusion", params=params, trainable=tuple(trainable), frozen={"vae": vae_params},
                loss=loss, source=source, batch_keys=("pixels", "input_ids"), export=export,
                tokenize=lambda captions: tokenize(tokenizer, captions, max_len), init=init, notes=tuple(notes))


def resolve_configs(config: TrainConfig) -> TrainConfig:
    """``config`` with the default (preset) model configs of a from-scratch run filled in,
    so that ``run.json`` records the architecture and a resumed run cannot silently get
    another one."""
    if config.model is not None or (config.text_encoder_config and config.unet_config):
        return config
    from sd_jax.weights.diffusers import read_config
    if config.tokenizer is not None:
        from sd_jax.tokenizer import load_tokenizer
        vocab = len(load_tokenizer(config.tokenizer))
    else:
        from sd_jax.data.tokenizer import vocab_size
        vocab = vocab_size()
    try:
        vae_cfg = vae_lib.VAEConfig.from_dict(read_config(resolve_vae(config.vae)))
    except ValueError as e:
        raise ValueError(f"cannot use the VAE in {config.vae!r}: {str(e).splitlines()[0]}") from None
    te = config.text_encoder_config or small_text_encoder_config(vocab)
    un = config.unet_config or small_unet_config(config.size // vae_cfg.downscale_factor, vae_cfg.latent_channels,
                                                 te.hidden_size)
    return dataclasses.replace(config, text_encoder_config=te, unet_config=un)


def train(config: TrainConfig, mesh=None) -> TrainResult:
    """Train (or fine-tune) a text encoder + UNet; see :class:`TrainConfig` and the module docstring."""
    config = resolve_configs(config)
    check_run_folder(config, "diffusion")
    return run(config, build_diffusion_task(config), mesh=mesh)
