"""High-throughput, resumable batch generation: ``sd-jax batch PROMPTS --out DIR``.

* Rows come from ``.txt`` (one prompt a line; blank lines and ``#`` comments skipped),
  ``.jsonl`` (one JSON object a line, or a JSON string) or ``.csv`` (a header row) with
  the fields ``prompt`` and optionally ``negative_prompt``, ``seed``, ``steps``,
  ``guidance``, ``guidance_rescale``, ``guidance_start``, ``guidance_end``, ``size`` (WxH) or ``width`` + ``height``,
  ``scheduler``, ``name`` (the output file name).  A row without a seed gets
  ``--seed`` + its index; a row without a name gets ``{index:06d}-{prompt slug}-{seed}.png``.
* ``control``: the row's ControlNet images, ``KIND:IMAGE[:SCALE]`` as the CLI's ``--control``,
  one per ControlNet of the job (``--controlnet``), separated by ``;`` (or a JSON list); image
  paths are relative to the prompt file.  Rows that differ only in control images and scales
  share a compiled function (they are arguments); a row without one runs without ControlNet.
* Rows are grouped by their static settings (steps, size, scheduler), so each group
  compiles once; each call fills every device of every host (``per_device`` rows on
  each), and a group's last, partial batch is padded so it reuses a compiled shape.
* Host work overlaps device work: batch k+1 is queued on the devices before batch k's
  images are copied back; a thread pool encodes and writes the PNGs while the devices
  compute the next batches.
* Every image is written atomically (``.tmp-*.png``, fsync, rename) under its
  deterministic name, and then recorded in ``manifest.jsonl`` (prompt, seed, settings,
  file, timing).  Killed at any moment and started again with the same command, the
  job deletes leftover temporary files, repairs the manifest (a cut last line is
  dropped; an image written just before the kill gets its entry back from the PNG's
  metadata), skips what is done, and finishes with every image present exactly once.
* The folder remembers its job in ``sd-jax-batch.json`` (the model, the default settings and a
  hash of the rows): a changed job is refused, saying what changed, unless ``replace``
  (``--replace``), which makes the folder the new job's and generates again the images whose
  recorded settings differ from their row's.  A ``manifest.jsonl`` or job file sd-jax did not
  write is refused, never overwritten.
* One job at a time: the running job holds an ``fcntl.flock`` on ``.sd-jax-batch.lock`` (with
  its pid, for the message another job gets); the OS drops it when the job dies, so the file a
  killed job leaves blocks nothing.  Manifest lines are appended with one ``write`` each
  (``O_APPEND``) and the manifest is rewritten only under the lock.
* Multi-host: every process runs the same SPMD program over the global mesh and writes
  the images that its own devices computed, recording them in its own manifest part
  ``manifest.p{i}.jsonl``; process 0 merges the parts into ``manifest.jsonl`` at the
  end (``--out`` on a shared filesystem gives one complete manifest).  A row counts as
  done when any process has its image.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import csv
import dataclasses
import errno
import fcntl
import glob
import functools
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time

import numpy as np

from sd_jax import sharding
from sd_jax.images import TMP_PREFIX, model_name, read_metadata, save_png
from sd_jax.lora import prompts as lora_prompts
from sd_jax.request import (GUIDANCE_WINDOW, Chunk, Dispatcher, GenerationRequest, RequestError,
                            canonical_scheduler, parse_size)

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_rescale", "guidance_start",
          "guidance_end", "size", "width", "height", "scheduler", "name", "control")
ALIASES = {"negative": "negative_prompt", "cfg": "guidance", "cfg_scale": "guidance", "guidance_scale": "guidance",
           "file": "name", "output": "name", "num_inference_steps": "steps", "sampler": "scheduler",
           "rescale": "guidance_rescale"}
MANIFEST = "manifest.jsonl"
JOB_FILE = "sd-jax-batch.json"  # what defines the folder's images: a changed job is refused
LOCK_FILE = ".sd-jax-batch.lock"  # flock'ed by the running job; holds its pid
JOB_KIND = "sd-jax batch job"
# The settings an image is checked against on resume (its own metadata or manifest entry).
_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_rescale", "width", "height",
             "scheduler", "clip_skip", "model")
# ... and these, absent from an image's record where they have their defaults
_CHECKED = _SETTINGS + ("controlnets", "guess_mode", "guidance_start", "guidance_end")


class PromptFileError(ValueError):
    """A prompt file that cannot be used (the message names the file and the line)."""


class OutputFolderError(OSError):
    """The output folder cannot be used as it is: in use, another job's, holding files sd-jax did
    not write, not writable, or full.  ``str()`` is the one-line message naming the path."""


@dataclasses.dataclass(frozen=True)
class Row:
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance: float
    guidance_rescale: float
    width: int
    height: int
    scheduler: str
    name: str
    clip_skip: int | None = None
    line: int = 0
    timestep_spacing: str | None = None  # --timestep-spacing (None: the scheduler config's)
    control: tuple = ()  # RowControl entries, one per ControlNet of the job (or none)
    guess_mode: bool = False
    guidance_start: float | None = None  # the guided steps' window (fractions of the steps; None: the model's)
    guidance_end: float | None = None

    def request(self) -> GenerationRequest:
        """This row as the request every entry point hands to the dispatcher."""
        from sd_jax.request import Control
        control = tuple(Control(c.controlnet, _control_image(c.kind, c.path), c.scale) for c in self.control)
        return GenerationRequest(self.prompt, self.negative_prompt, seed=self.seed, steps=self.steps,
                                 guidance=self.guidance, guidance_rescale=self.guidance_rescale,
                                 guidance_start=self.guidance_start, guidance_end=self.guidance_end, width=self.width,
                                 height=self.height, scheduler=self.scheduler, clip_skip=self.clip_skip,
                                 timestep_spacing=self.timestep_spacing,
                                 control=control, guess_mode=self.guess_mode and bool(control))

    @property
    def group(self):
        """The static settings: rows of one group share a compiled function."""
        return (self.steps, self.width, self.height, self.scheduler, self.clip_skip)


@dataclasses.dataclass(frozen=True)
class RowControl:
    """One ControlNet's part in a row: the ControlNet's name, the kind (``canny``: edges computed),
    the image's path (resolved) and as the prompt file gives it, the conditioning scale."""
    controlnet: str
    kind: str
    path: str
    given: str
    scale: float

    def meta(self) -> dict:
        """The ``controlnets`` metadata entry (as ``sd-jax generate`` writes it; A1111 parameters)."""
        return {"module": self.kind, "model": self.controlnet, "weight": self.scale, "image": self.given,
                "guidance_start": 0.0, "guidance_end": 1.0}


@functools.lru_cache(maxsize=16)
def _canny(path: str):
    from sd_jax.control import canny
    return canny(path)


def _control_image(kind: str, path: str):
    """A row's control image: canny edges of ``path`` (cached: a row is resolved more than once), or the path."""
    return _canny(path) if kind == "canny" else path


def _row_controls(value, folder: str, controlnets) -> tuple:
    """A row's ``control`` field (``;``-separated ``KIND:IMAGE[:SCALE]`` entries or a list of
    them) -> RowControl entries; ValueError (one line) for a bad entry or image."""
    from PIL import Image

    from sd_jax.control import parse_control
    value = "" if value is None else value
    entries = value if isinstance(value, list) else [e for e in str(value).split(";") if e.strip()] \
        if isinstance(value, str) else None
    if entries is None or not all(isinstance(e, str) for e in entries):
        raise ValueError(f"control must be KIND:IMAGE[:SCALE] entries separated by ';', got {value!r}")
    if not entries:
        return ()
    if not controlnets:
        raise ValueError("a control needs a ControlNet: give --controlnet PATH (one per control entry)")
    if len(entries) != len(controlnets):
        raise ValueError(f"{len(entries)} control entr{'y' if len(entries) == 1 else 'ies'} for "
                         f"{len(controlnets)} --controlnet; give one KIND:IMAGE[:SCALE] per ControlNet, "
                         f"separated by ';'")
    out = []
    for name, entry in zip(controlnets, entries):
        kind, given, scale = parse_control(entry.strip())
        path = os.path.join(folder, os.path.expanduser(given))
        if not os.path.isfile(path):
            raise ValueError(f"control image {given!r}: no such file {path!r} (paths are relative to the prompt file)")
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as e:
            raise ValueError(f"control image {given!r} is not a readable image ({e})") from None
        out.append(RowControl(name, kind, os.path.abspath(path), given, scale))
    return tuple(out)


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "image"


# ----------------------------------------------------------------------------- prompt files
def read_prompt_file(path: str) -> list[tuple[int, dict]]:
    """(line number, raw row dict) for every row; a clear error naming the bad line."""
    if os.path.isdir(path):
        raise PromptFileError(f"prompt file {path!r} is a folder")
    if not os.path.exists(path):
        raise PromptFileError(f"prompt file {path!r} not found")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".jsonl", ".csv", ".txt", ""):
        raise PromptFileError(f"prompt file {path!r}: unknown type {ext!r}; use .txt, .jsonl or .csv")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's byte-order mark
            text = f.read()
    except UnicodeDecodeError as e:
        raise PromptFileError(f"cannot read prompt file {path!r}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise PromptFileError(f"cannot read prompt file {path!r}: {e.strerror or e}") from None
    rows: list[tuple[int, dict]] = []
    if ext == ".jsonl":
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path} line {ln}: not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                obj = {"prompt": obj}
            if not isinstance(obj, dict):
                raise PromptFileError(f"{path} line {ln}: expected a JSON object with a \"prompt\" (or a string)")
            rows.append((ln, obj))
    elif ext == ".csv":
        reader = csv.DictReader(io.StringIO(text), restkey="\0extra")
        try:
            header = reader.fieldnames
            if not header or "prompt" not in [h.strip().lower() for h in header if h]:
                raise PromptFileError(f"{path} line 1: the CSV header needs a 'prompt' column")
            for rec in reader:
                if "\0extra" in rec:
                    raise PromptFileError(f"{path} line {reader.line_num}: more fields than the header has")
                rec = {k.strip().lower(): v.strip() for k, v in rec.items() if k and v is not None and v.strip()}
                if rec:  # a blank line
                    rows.append((reader.line_num, rec))
        except csv.Error as e:
            raise PromptFileError(f"{path} line {reader.line_num}: not valid CSV ({e})") from None
    else:
        for ln, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((ln, {"prompt": line.strip()}))
    if not rows:
        raise PromptFileError(f"prompt file {path!r} has no prompts")
    return rows


def _int(value, what: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return int(value) if not isinstance(value, str) else int(value.strip())
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _float(value, what: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not np.isfinite(x):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return x


def make_rows(raw: list[tuple[int, dict]], defaults: dict, path: str, schedulers=None, controlnets=(),
              guess_mode: bool = False) -> list[Row]:
    """Rows from :func:`read_prompt_file`'s output, every field checked (errors name the line).
    ``controlnets``: the names of the job's ControlNets, which a row's ``control`` entries
    steer, in order (``guess_mode`` for them all).

    ``defaults``: ``negative_prompt, seed, steps, guidance, guidance_rescale, width, height,
    scheduler`` and optionally ``clip_skip``.  ``schedulers``: the sampler names allowed (a
    collection), or a function ``name -> canonical name`` raising ``ValueError`` for an unknown
    one; default: every sampler (:func:`sd_jax.commands.check_scheduler`).
    """
    canonical = canonical_scheduler
    if schedulers is None:
        check_scheduler = canonical
    elif callable(schedulers):
        check_scheduler = schedulers
    else:
        allowed = {canonical(n) for n in schedulers}

        def check_scheduler(name):
            key = canonical(name)
            if key not in allowed:
                raise ValueError(f"scheduler {name!r} is not allowed here; choose one of {', '.join(sorted(allowed))}")
            return key
    rows, names = [], {}
    for i, (ln, rec) in enumerate(raw):
        where = f"{path} line {ln}"
        rec = {ALIASES.get(str(k).strip().lower(), str(k).strip().lower()): v for k, v in rec.items()}
        unknown = set(rec) - set(FIELDS)
        if unknown:
            raise PromptFileError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                                  f"known: {', '.join(FIELDS)}")
        prompt = rec.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise PromptFileError(f"{where}: prompt must be text, got {prompt!r}")
        if prompt is None or not prompt.strip():
            raise PromptFileError(f"{where}: empty or missing prompt")
        neg = rec.get("negative_prompt", defaults["negative_prompt"])
        if neg is None:
            neg = ""
        if not isinstance(neg, str):
            raise PromptFileError(f"{where}: negative_prompt must be text, got {neg!r}")
        try:
            seed = _int(rec.get("seed", defaults["seed"] + i), "seed")
            steps = _int(rec.get("steps", defaults["steps"]), "steps")
            guidance = _float(rec.get("guidance", defaults["guidance"]), "guidance")
            rescale = _float(rec.get("guidance_rescale", defaults["guidance_rescale"]), "guidance_rescale")
            g0, g1 = (None if rec.get(k, defaults.get(k)) is None else _float(rec.get(k, defaults.get(k)), k)
                      for k in GUIDANCE_WINDOW)  # None: the model's
            if "size" in rec:
                if "width" in rec or "height" in rec:
                    raise ValueError("give size or width and height, not both")
                w, h = parse_size(str(rec["size"]))
            else:
                w = _int(rec.get("width", defaults["width"]), "width")
                h = _int(rec.get("height", defaults["height"]), "height")
                parse_size(f"{w}x{h}")
            sched = check_scheduler(str(rec.get("scheduler", defaults["scheduler"])))
            control = _row_controls(rec.get("control", ""), os.path.dirname(os.path.abspath(path)), controlnets)
        except ValueError as e:
            raise PromptFileError(f"{where}: {e}") from None
        row = Row(i, prompt, neg, seed, steps, guidance, rescale, w, h, sched, "", defaults.get("clip_skip"), ln,
                  defaults.get("timestep_spacing"), control, guess_mode, g0, g1)
        try:
            row.request()  # the checks every request gets (steps, seed range, finite guidance, ...)
        except RequestError as e:
            raise PromptFileError(f"{where}: {e}") from None
        name = rec.get("name")
        if name is None:
            name = f"{i:06d}-{_slug(prompt)}-{seed}"
        name = str(name).strip()
        if not name or "/" in name or "\\" in name or name.startswith(".") or "\0" in name:
            raise PromptFileError(f"{where}: name {name!r} must be a plain file name (no folders, not hidden)")
        name = name if name.lower().endswith(".png") else name + ".png"
        key = name.lower()  # unique on case-insensitive filesystems too
        if key in names:
            raise PromptFileError(f"{where}: output name {name!r} is already used on line {names[key]}")
        names[key] = ln
        rows.append(dataclasses.replace(row, name=name))
    return rows


# ----------------------------------------------------------------------------- the output folder: writing, lock
def _write_error(path: str, e: OSError) -> OutputFolderError:
    """``e`` (from writing ``path``) as one line that names the path and the fix."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (f"no space left on the disk to write {path!r}: free some space, then run the same command "
               f"again to resume")
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        msg = f"cannot write {path!r} ({e.strerror}): choose a writable --out"
    else:
        msg = f"cannot write {path!r}: {e.strerror or e}"
    err = OutputFolderError(msg)
    err.errno = e.errno
    return err


@contextlib.contextmanager
def _writing(path: str):
    """An ``OSError`` raised inside names ``path`` (a full disk's ``ENOSPC`` names no file)."""
    try:
        yield
    except OutputFolderError:
        raise
    except OSError as e:
        raise _write_error(path, e) from None


def check_writable(out: str) -> None:
    """Fail (naming the folder) unless files can be created in ``out``, or in the nearest existing
    folder above it when ``out`` does not exist yet; creates nothing that stays."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputFolderError(f"--out {out!r} exists and is not a folder")
    folder = os.path.abspath(out)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        where = "" if folder == os.path.abspath(out) else f" (in {folder!r})"
        raise OutputFolderError(f"--out {out!r} is not writable{where}: {e.strerror or e}; "
                                f"choose a writable folder") from None


def _lock_name(process: int, nproc: int) -> str:
    return LOCK_FILE if nproc == 1 else f".sd-jax-batch.p{process}.lock"


def _busy(out: str, pid: int | None) -> OutputFolderError:
    who = f"pid {pid}" if pid else "another process"
    return OutputFolderError(f"--out {out!r} is in use by {who} (another sd-jax batch job); wait for it to "
                             f"end or choose another --out")


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class FolderLock:
    """An exclusive lock on a batch folder: ``fcntl.flock`` on a lock file that holds the pid.

    The OS drops a flock when its holder dies, so the file a killed job leaves behind blocks
    nothing: the next job takes it over.  ``wait``: seconds to retry a held lock before giving up
    (rides out :func:`lock_holder`'s instant probe by a job starting up).
    """

    def __init__(self, out: str, name: str = LOCK_FILE):
        self.out, self.path, self.fd = out, os.path.join(out, name), None

    def acquire(self, wait: float = 2.0) -> FolderLock:
        deadline = time.monotonic() + wait
        while True:
            with _writing(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise _busy(self.out, holder) from None
                time.sleep(0.05)
                continue
            try:  # the last holder may have removed the file between our open and flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            with _writing(self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still holding it; a waiter then sees another inode and retries
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_holder(out: str) -> int | None:
    """The pid holding ``out``'s lock (0 if unknown), or None when no job holds it."""
    path = os.path.join(out, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _read_pid(fd) or 0
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the job file, reserved files
# Command-line flags of the job settings, for messages.
_FLAGS = {"negative_prompt": "--negative", "seed": "--seed", "steps": "--steps", "guidance": "--guidance",
          "guidance_rescale": "--rescale", "size": "--size", "scheduler": "--scheduler", "clip_skip": "--clip-skip",
          "dtype": "--dtype", "watermark": "--no-watermark", "unet": "--unet", "refiner": "--refiner",
          "refiner_switch": "--refiner-switch", "loras": "--lora", "prompt_loras": "the prompts' <lora:...> files",
          "timestep_spacing": "--timestep-spacing", "controlnets": "--controlnet", "guess_mode": "--guess-mode",
          "guidance_start": "--guidance-start", "guidance_end": "--guidance-end"}


def make_job(model: str, settings: dict, rows: list) -> dict:
    """The job file's contents: what defines a folder's images.  ``settings``: the job-wide
    defaults (None = the model's own); ``rows``: JSON-able rows, hashed in order."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return {"kind": JOB_KIND, "version": 1, "model": model, "settings": dict(settings), "rows": len(rows),
            "rows_sha256": digest}


def job_of_rows(model: str, rows: list[Row]) -> dict:
    """The job of :func:`run` called without one: the model and every row's resolved settings."""
    return make_job(model, {}, [{"name": r.name, **_meta(r, model)} for r in rows])


def job_of_args(args, model: str, raw: list[tuple[int, dict]], loras=(), tagged=()) -> dict:
    """The job of an ``sd-jax batch`` command, known before the model is loaded: the model's name,
    the flags that set row defaults, and the prompt file's rows (not their line numbers);
    ``loras``: the ``--lora`` (file, weight)s, ``tagged``: the files the rows' ``<lora:...>``
    tags name, each recorded with its hash and size (a changed LoRA file is a changed job)."""
    settings = {"negative_prompt": args.negative, "seed": args.seed, "steps": args.steps or 30,
                "guidance": args.guidance if args.guidance is not None else 7.5, "guidance_rescale": args.rescale,
                "size": f"{args.size[0]}x{args.size[1]}" if args.size else None, "scheduler": args.scheduler,
                "clip_skip": args.clip_skip, "dtype": args.dtype}
    if getattr(args, "no_watermark", False):   # only when set, so jobs written before the flag stay the same
        settings["watermark"] = False
    if getattr(args, "unet", None):
        settings["unet"] = os.path.abspath(args.unet)
    if getattr(args, "timestep_spacing", None):  # (absent otherwise: older jobs stay the same)
        settings["timestep_spacing"] = args.timestep_spacing
    for name, default in GUIDANCE_WINDOW.items():  # (the same)
        if getattr(args, name, None) not in (None, default):
            settings[name] = getattr(args, name)
    if getattr(args, "refiner", None):  # (absent otherwise: jobs written before refiners stay the same)
        settings["refiner"] = os.path.basename(os.path.normpath(args.refiner))
        settings["refiner_switch"] = 0.8 if args.refiner_switch is None else args.refiner_switch
    if loras or tagged:  # (absent otherwise: jobs written before LoRAs stay the same)
        from sd_jax.lora.prompts import file_record
        settings["loras"] = [file_record(f, w) for f, w in loras]
        settings["prompt_loras"] = [file_record(f) for f in tagged]
    if getattr(args, "controlnet", None):  # (absent otherwise: jobs written before ControlNets stay the same)
        settings["controlnets"] = [os.path.abspath(p) for p in args.controlnet]
        settings["guess_mode"] = bool(args.guess_mode)
    return make_job(model, settings, [rec for _, rec in raw])


def read_job(out: str) -> dict | None:
    """The folder's job file (None if there is none); refuses one sd-jax did not write."""
    path = os.path.join(out, JOB_FILE)
    if not os.path.lexists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            job = json.load(f)
    except (OSError, ValueError):
        job = None
    if not isinstance(job, dict) or job.get("kind") != JOB_KIND:
        raise OutputFolderError(f"{path!r} was not written by sd-jax (it is where sd-jax records a batch "
                                f"job's settings): move it away or choose another --out")
    return job


def job_changes(old: dict, new: dict) -> list[str]:
    """What differs between two jobs, in words (empty: the same job)."""
    show = lambda v: "(default)" if v is None else repr(v) if isinstance(v, str) else str(v)  # noqa: E731
    changes = []
    if old.get("model") != new.get("model"):
        changes.append(f"model {show(old.get('model'))} -> {show(new.get('model'))}")
    a, b = old.get("settings") or {}, new.get("settings") or {}
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            changes.append(f"{_FLAGS.get(k, k)} {show(a.get(k))} -> {show(b.get(k))}")
    if old.get("rows_sha256") != new.get("rows_sha256"):
        n, m = old.get("rows"), new.get("rows")
        changes.append(f"the prompt rows ({n} -> {m} rows)" if n != m else "the prompt rows (other contents)")
    return changes


def _changed_job_error(out: str, changes: list[str]) -> OutputFolderError:
    return OutputFolderError(f"--out {out!r} holds the images of another job ({'; '.join(changes)}): use a new "
                             f"--out, or add --replace to generate the changed images again in this folder")


def check_job(out: str, job: dict, replace: bool = False) -> bool:
    """Whether ``job`` differs from the one ``out`` was made with (True: none recorded); a
    changed job is refused unless ``replace``."""
    old = read_job(out)
    if old is None:
        return True
    changes = job_changes(old, job)
    if changes and not replace:
        raise _changed_job_error(out, changes)
    return bool(changes)


def write_job(out: str, job: dict) -> None:
    _write_atomic(os.path.join(out, JOB_FILE), json.dumps(job, indent=1, sort_keys=True) + "\n")


def _is_sd_jax_manifest(path: str) -> bool:
    """Every line a JSON entry sd-jax wrote (a last line cut by a kill aside)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return False
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # unterminated: cut by a kill
                continue
            return False
        if not (isinstance(e, dict) and e.get("generator") == "sd-jax" and isinstance(e.get("file"), str)):
            return False
    return True


def check_reserved_files(out: str) -> dict | None:
    """Refuse a folder whose reserved files sd-jax did not write: a ``manifest.jsonl`` with no job
    file beside it must hold nothing but sd-jax entries (a folder of an sd-jax from before job
    files); returns the job file's contents (None if there is none)."""
    job = read_job(out)
    path = os.path.join(out, MANIFEST)
    if job is None and os.path.lexists(path) and not _is_sd_jax_manifest(path):
        raise OutputFolderError(f"{path!r} was not written by sd-jax (sd-jax lists its images there): move it "
                                f"away or choose another --out")
    return job


def check_out(out: str, job: dict, replace: bool = False) -> None:
    """Everything about ``--out`` that is checked before the model is loaded: a folder (or none
    yet), writable, not in use, no reserved file of someone else's, the same job (or ``replace``)."""
    check_writable(out)
    if not os.path.isdir(out):
        return
    holder = lock_holder(out)
    if holder is not None:
        raise _busy(out, holder)
    check_reserved_files(out)
    check_job(out, job, replace)


def _legacy_changes(out: str, manifest: str, rows: list[Row], model: str) -> list[str]:
    """A folder with no job file (an earlier sd-jax's): its manifest's entries for this job's
    names, where their settings differ, in words."""
    entries = _read_manifest(manifest)
    for r in rows:
        e = entries.get(r.name)
        if e is not None and os.path.isfile(os.path.join(out, r.name)) and not _matches(e, r, model):
            want = _meta(r, model)
            diff = [f"{k} {e.get(k)!r} -> {want.get(k)!r}" for k in _CHECKED if e.get(k) != want.get(k)]
            return [f"{r.name}: {', '.join(diff)}"]
    return []


# ----------------------------------------------------------------------------- manifest writing
class ManifestWriter:
    """Appends one JSON line per image: the whole line in one ``os.write`` to a file opened with
    ``O_APPEND``, so lines of several writers never interleave and a kill cuts at most the last."""

    def __init__(self, path: str):
        self.path = path
        with _writing(path):
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def append(self, entry: dict) -> None:
        data = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with _writing(self.path):
            n = os.write(self.fd, data)
            if n != len(data):  # a regular file writes less only when the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ----------------------------------------------------------------------------- manifest and recovery
def _manifest_path(out: str, process: int, nproc: int) -> str:
    return os.path.join(out, MANIFEST if nproc == 1 else f"manifest.p{process}.jsonl")


def _read_manifest(path: str) -> dict[str, dict]:
    entries = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill is dropped (and the image kept)
                    continue
                if isinstance(e, dict) and isinstance(e.get("file"), str):
                    entries[e["file"]] = e
    return entries


def _write_atomic(path: str, text: str) -> None:
    """``path`` holds ``text`` or what it held before: written to ``path.tmp``, fsynced, renamed."""
    tmp = path + ".tmp"
    with _writing(path):
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _write_jsonl_atomic(path: str, entries) -> None:
    _write_atomic(path, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def _order(e: dict):
    row = e.get("row")
    return (row if isinstance(row, int) else float("inf"), e["file"])


def _meta(row: Row, model: str) -> dict:
    meta = {"prompt": row.prompt, "negative_prompt": row.negative_prompt, "seed": row.seed, "steps": row.steps,
            "guidance": row.guidance, "guidance_rescale": row.guidance_rescale, "width": row.width,
            "height": row.height, "scheduler": row.scheduler, "clip_skip": row.clip_skip, "model": model,
            "generator": "sd-jax", **({"timestep_spacing": row.timestep_spacing} if row.timestep_spacing else {})}
    for name, default in GUIDANCE_WINDOW.items():  # (the same: only when set)
        if getattr(row, name) not in (None, default):
            meta[name] = getattr(row, name)
    if row.control:  # (absent otherwise: rows without ControlNet keep the metadata they had)
        meta["controlnets"] = [c.meta() for c in row.control]
        if row.guess_mode:
            meta["guess_mode"] = True
    return meta


def _matches(entry: dict, row: Row, model: str) -> bool:
    want = _meta(row, model)
    return all(entry.get(k) == want.get(k) for k in _CHECKED)


def recover(out: str, rows: list[Row], manifest: str, model: str, other_manifests=(), primary: bool = True) -> set[str]:
    """Clean up after a kill; returns the names of the rows already done.

    Deletes temporary files, then rewrites ``manifest`` (atomically) to hold exactly one
    entry for each finished image it is responsible for: its own entries whose image
    exists, and entries rebuilt from the PNG metadata of images that no manifest records
    (killed between the rename and the manifest line).  ``other_manifests`` (multi-host:
    the other processes' parts and the merged manifest) are read, never written.  Only the
    ``primary`` process (the one that writes the job file and the merged manifest) deletes
    their temporary files: another host's recovery runs while it may be writing them.
    """
    own_tmp = [os.path.basename(manifest) + ".tmp"] + ([f"{MANIFEST}.tmp", f"{JOB_FILE}.tmp"] if primary else [])
    for pattern in [f"{TMP_PREFIX}*.png"] + own_tmp:
        for tmp in glob.glob(os.path.join(glob.escape(out), pattern)):
            try:
                os.unlink(tmp)
            except FileNotFoundError:  # another process of the job got it first
                pass
    own = _read_manifest(manifest)
    others: dict[str, dict] = {}
    for m in other_manifests:
        others.update(_read_manifest(m))
    wanted = {r.name: r for r in rows}
    done, keep = set(), []
    for name, row in wanted.items():
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        e = own.get(name) or others.get(name)
        if e is None or not _matches(e, row, model):
            try:
                meta = read_metadata(path)
            except Exception:  # noqa: BLE001 - not a readable PNG: generate it again
                meta = {}
            if not _matches(meta, row, model):
                continue  # another job's image, or the row changed: generate it again (replacing it)
            e = {"file": name, "row": row.index, **meta, "seconds": None}
            own[name] = e  # rebuilt: this process records it
        done.add(name)
        if name in own:
            keep.append(own[name])
    # Entries of images of other prompt files written into the same folder stay, while they exist.
    keep += [e for n, e in own.items() if n not in wanted and os.path.isfile(os.path.join(out, n))]
    _write_jsonl_atomic(manifest, sorted(keep, key=_order))
    return done


# ----------------------------------------------------------------------------- the job
def run(pipe, rows: list[Row], out: str, *, per_device: int = 1, progress: bool = True,
        write_threads: int = 4, job: dict | None = None, replace: bool = False,
        lora_dir: str | None = None) -> dict:
    """Generate every row whose image is not already in ``out``; returns a summary dict.

    Every process of a multi-host job calls this with the same rows.  The folder is locked
    while the job runs (:class:`FolderLock`), and remembers its job in ``sd-jax-batch.json``:
    ``job`` (default: :func:`job_of_rows`) must be the one the folder was made with, unless
    ``replace``, which makes the folder this job's (images whose settings differ are made again).
    Rows whose prompts name other ``<lora:name:w>`` tags (looked up in ``lora_dir``) run in
    groups, one after the other, each with the pipeline's LoRAs plus its tags.
    """
    import jax
    if per_device < 1:
        raise ValueError(f"per_device must be at least 1, got {per_device}")
    t_start = time.perf_counter()
    with _writing(out):
        os.makedirs(out, exist_ok=True)
    pid, nproc = jax.process_index(), jax.process_count()
    model = model_name(pipe.source)
    job = job if job is not None else job_of_rows(model, rows)
    with FolderLock(out, _lock_name(pid, nproc)):
        old = check_reserved_files(out)
        changes = (job_changes(old, job) if old is not None
                   else _legacy_changes(out, os.path.join(out, MANIFEST), rows, model))
        if changes and not replace:
            raise _changed_job_error(out, changes)
        if (old is None or changes) and pid == 0:
            write_job(out, job)
        if nproc > 1:  # the job file is complete before any host looks at the folder's files
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("sd-jax batch: job file written")
        return _generate(pipe, rows, out, model, per_device, progress, write_threads, t_start, lora_dir)


def _generate(pipe, rows, out, model, per_device, progress, write_threads, t_start, lora_dir=None) -> dict:
    """:func:`run`'s work, in a folder it has locked and checked."""
    import jax
    from tqdm import tqdm
    pid, nproc = jax.process_index(), jax.process_count()
    manifest = _manifest_path(out, pid, nproc)
    others = [] if nproc == 1 else [os.path.join(out, MANIFEST)] + [
        _manifest_path(out, p, nproc) for p in range(nproc) if p != pid]
    done = recover(out, rows, manifest, model, others, primary=pid == 0)
    if nproc > 1:  # every process must run the same batches: a row is done if any host has its image
        from jax.experimental import multihost_utils
        flags = np.array([r.name in done for r in rows], np.int32)
        gathered = np.asarray(multihost_utils.process_allgather(flags)).reshape(nproc, len(rows))
        done = {r.name for r, f in zip(rows, gathered.any(axis=0)) if f}
    todo = [r for r in rows if r.name not in done]
    refiner = getattr(pipe, "metadata", None) or {}  # an SDXLEnsemble's refiner and switch (A1111's fields)

    ndev = pipe.mesh.devices.size
    batch_size = ndev * per_device  # images per device call, over all devices
    batches, shapes = 0, set()
    bar = tqdm(total=len(todo), unit="img", disable=not progress or pid != 0 or not todo, file=sys.stderr,
               mininterval=0.5, smoothing=0.1,  # images/s (never s/image) and the time left:
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")
    written = 0
    first_batch_seconds = None
    t0 = time.perf_counter()
    mf = ManifestWriter(manifest)
    writes: collections.deque = collections.deque()  # futures of PNG writes, oldest first
    max_pending = max(2 * batch_size, write_threads)  # bounds the host memory held by images to write

    def write(row: Row, img: np.ndarray, seconds: float, batch_index: int, batch_size: int, nsfw=None,
              loras=None) -> dict:
        path = os.path.join(out, row.name)
        # the safety checker's flag, where it ran: in the PNG's metadata and the manifest
        meta = _meta(row, model) if nsfw is None else {**_meta(row, model), "nsfw_content_detected": nsfw}
        meta.update(loras or {})
        meta.update(refiner)
        with _writing(path):
            save_png(path, img, meta)
        return {"file": row.name, "row": row.index, **meta, "seconds": round(seconds, 4),
                "batch": batch_index, "batch_size": batch_size}

    def record(limit: int) -> None:
        """Manifest lines for finished writes, oldest first; wait while more than ``limit`` are pending."""
        nonlocal written
        while writes and (len(writes) > limit or writes[0].done()):
            entry = writes.popleft().result()  # a failed write (disk full, ...) raises here
            mf.append(entry)  # in the kernel at once: enough for a killed process; the PNG itself is fsynced
            written += 1

    last_ready = t0

    def collect(k: int, call: Chunk, pool, group: list, loras: dict | None) -> None:
        """Wait for a dispatched call, copy this host's rows back and queue their writes."""
        nonlocal last_ready, first_batch_seconds
        brows = [group[i] for i, _ in call.items]
        idx, data = sharding.local_rows(call.out)  # blocks until this call is computed
        flags = None if call.flags is None else sharding.local_rows(call.flags)[1]
        t_ready = time.perf_counter()
        busy = t_ready - max(call.dispatched_at, last_ready)  # device time of this call (it queued behind the last)
        last_ready = t_ready
        if first_batch_seconds is None:
            first_batch_seconds = t_ready - t0  # includes compilation
        for j, i in enumerate(idx):
            if i < len(brows):
                writes.append(pool.submit(write, brows[i], data[j], busy / len(brows), k, call.size,
                                          None if flags is None else bool(flags[j]), loras))
        bar.update(len(brows))
        shapes.add((call.plan, call.size))

    pool = cf.ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="sd-jax-write")
    try:
        # The dispatcher queues call k+1 on the devices before handing back call k.  Rows naming
        # other <lora:...> tags run group after group (the LoRAs are arguments: no recompilation).
        for tags, group in lora_prompts.group_rows(todo):
            with lora_prompts.applied(pipe, tags, lora_dir):
                weights = pipe.loras.weights if hasattr(pipe, "loras") else {}  # (test doubles have none)
                loras = {"loras": weights, "lora_hashes": lora_prompts.loaded_hashes(pipe)} if weights else None
                for call in Dispatcher(pipe, batch_size=batch_size, output="uint8").run(
                        [r.request() for r in group]):
                    collect(batches, call, pool, group, loras)
                    record(max_pending)
                    batches += 1
        record(0)
    finally:
        pool.shutdown(wait=True)  # a write in progress finishes (atomically) even on an error
        while writes:  # record what was written before an error; a failed write's image is absent
            fu = writes.popleft()
            if fu.exception() is None:
                with contextlib.suppress(OSError):  # the error being raised says more
                    mf.append(fu.result())
                    written += 1
        mf.close()
        bar.close()
    elapsed = time.perf_counter() - t0

    if nproc == 1:  # tidy: the manifest in row order
        _write_jsonl_atomic(manifest, sorted(_read_manifest(manifest).values(), key=_order))
    else:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("sd_jax_batch_done")
        if pid == 0:
            merged = _read_manifest(os.path.join(out, MANIFEST))
            for p in range(nproc):
                merged.update(_read_manifest(_manifest_path(out, p, nproc)))
            merged = {n: e for n, e in merged.items() if os.path.isfile(os.path.join(out, n))}
            _write_jsonl_atomic(os.path.join(out, MANIFEST), sorted(merged.values(), key=_order))
    return {"rows": len(rows), "skipped": len(rows) - len(todo), "generated": len(todo), "written_here": written,
            "seconds": elapsed, "total_seconds": time.perf_counter() - t_start,
            "first_batch_seconds": first_batch_seconds,
            "images_per_second": len(todo) / elapsed if todo and elapsed > 0 else 0.0,
            "batches": batches, "compiled_shapes": len(shapes), "devices": ndev, "batch_size": batch_size}
