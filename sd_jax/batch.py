"""High-throughput, resumable batch generation: ``sd-jax batch PROMPTS --out DIR``.

* Rows come from ``.txt`` (one prompt a line; blank lines and ``#`` comments skipped),
  ``.jsonl`` (one JSON object a line, or a JSON string) or ``.csv`` (a header row) with
  the fields ``prompt`` and optionally ``negative_prompt``, ``seed``, ``steps``,
  ``guidance``, ``guidance_rescale``, ``size`` (WxH) or ``width`` + ``height``,
  ``scheduler``, ``name`` (the output file name).  A row without a seed gets
  ``--seed`` + its index; a row without a name gets ``{index:06d}-{prompt slug}-{seed}.png``.
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
  An image whose recorded settings differ from its row's (the prompt file or the model
  changed) is generated again.
* Multi-host: every process runs the same SPMD program over the global mesh and writes
  the images that its own devices computed, recording them in its own manifest part
  ``manifest.p{i}.jsonl``; process 0 merges the parts into ``manifest.jsonl`` at the
  end (``--out`` on a shared filesystem gives one complete manifest).  A row counts as
  done when any process has its image.
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import csv
import dataclasses
import glob
import io
import json
import os
import re
import sys
import time

import numpy as np

from sd_jax import sharding
from sd_jax.images import TMP_PREFIX, read_metadata, save_png

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_rescale", "size", "width", "height",
          "scheduler", "name")
ALIASES = {"negative": "negative_prompt", "cfg": "guidance", "cfg_scale": "guidance", "guidance_scale": "guidance",
           "file": "name", "output": "name", "num_inference_steps": "steps", "sampler": "scheduler",
           "rescale": "guidance_rescale"}
MANIFEST = "manifest.jsonl"
# The settings an image is checked against on resume (its own metadata or manifest entry).
_SETTINGS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "guidance_rescale", "width", "height",
             "scheduler", "clip_skip", "model")


class PromptFileError(ValueError):
    """A prompt file that cannot be used (the message names the file and the line)."""


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

    @property
    def group(self):
        """The static settings: rows of one group share a compiled function."""
        return (self.steps, self.width, self.height, self.scheduler, self.clip_skip)


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


def make_rows(raw: list[tuple[int, dict]], defaults: dict, path: str, schedulers=None) -> list[Row]:
    """Rows from :func:`read_prompt_file`'s output, every field checked (errors name the line).

    ``defaults``: ``negative_prompt, seed, steps, guidance, guidance_rescale, width, height,
    scheduler`` and optionally ``clip_skip``.  ``schedulers``: the sampler names allowed (a
    collection), or a function ``name -> canonical name`` raising ``ValueError`` for an unknown
    one; default: every sampler (:func:`sd_jax.commands.check_scheduler`).
    """
    from sd_jax.cli import parse_size
    from sd_jax.commands import check_scheduler as canonical
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
        if not isinstance(prompt, str) or not prompt.strip():
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
            if "size" in rec:
                if "width" in rec or "height" in rec:
                    raise ValueError("give size or width and height, not both")
                w, h = parse_size(str(rec["size"]))
            else:
                w = _int(rec.get("width", defaults["width"]), "width")
                h = _int(rec.get("height", defaults["height"]), "height")
                parse_size(f"{w}x{h}")
            sched = check_scheduler(str(rec.get("scheduler", defaults["scheduler"])))
        except ValueError as e:
            raise PromptFileError(f"{where}: {e}") from None
        if steps < 1:
            raise PromptFileError(f"{where}: steps must be at least 1, got {steps}")
        if not 0 <= seed < 2**32:
            raise PromptFileError(f"{where}: seed must be in [0, 2**32), got {seed}")
        if not 0.0 <= rescale <= 1.0:
            raise PromptFileError(f"{where}: guidance_rescale must be in [0, 1], got {rescale}")
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
        rows.append(Row(i, prompt, neg, seed, steps, guidance, rescale, w, h, sched, name,
                        defaults.get("clip_skip"), ln))
    return rows


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


def _write_jsonl_atomic(path: str, entries) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _order(e: dict):
    row = e.get("row")
    return (row if isinstance(row, int) else float("inf"), e["file"])


def _meta(row: Row, model: str) -> dict:
    return {"prompt": row.prompt, "negative_prompt": row.negative_prompt, "seed": row.seed, "steps": row.steps,
            "guidance": row.guidance, "guidance_rescale": row.guidance_rescale, "width": row.width,
            "height": row.height, "scheduler": row.scheduler, "clip_skip": row.clip_skip, "model": model,
            "generator": "sd-jax"}


def _matches(entry: dict, row: Row, model: str) -> bool:
    want = _meta(row, model)
    return all(entry.get(k) == want[k] for k in _SETTINGS)


def recover(out: str, rows: list[Row], manifest: str, model: str, other_manifests=()) -> set[str]:
    """Clean up after a kill; returns the names of the rows already done.

    Deletes temporary files, then rewrites ``manifest`` (atomically) to hold exactly one
    entry for each finished image it is responsible for: its own entries whose image
    exists, and entries rebuilt from the PNG metadata of images that no manifest records
    (killed between the rename and the manifest line).  ``other_manifests`` (multi-host:
    the other processes' parts and the merged manifest) are read, never written.
    """
    for pattern in (f"{TMP_PREFIX}*.png", "manifest*.jsonl.tmp"):
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
def _batch_sizes(ndev: int, per_device: int) -> list[int]:
    """Batch sizes a group may use: ndev * (1, 2, 4, ... < per_device, per_device)."""
    k, out = 1, []
    while k < per_device:
        out.append(ndev * k)
        k *= 2
    return out + [ndev * per_device]


def run(pipe, rows: list[Row], out: str, *, per_device: int = 1, progress: bool = True,
        write_threads: int = 4) -> dict:
    """Generate every row whose image is not already in ``out``; returns a summary dict.

    Every process of a multi-host job calls this with the same rows.
    """
    import jax
    from tqdm import tqdm
    if per_device < 1:
        raise ValueError(f"per_device must be at least 1, got {per_device}")
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    pid, nproc = jax.process_index(), jax.process_count()
    model = _model_name(pipe)
    manifest = _manifest_path(out, pid, nproc)
    others = [] if nproc == 1 else [os.path.join(out, MANIFEST)] + [
        _manifest_path(out, p, nproc) for p in range(nproc) if p != pid]
    done = recover(out, rows, manifest, model, others)
    if nproc > 1:  # every process must run the same batches: a row is done if any host has its image
        from jax.experimental import multihost_utils
        flags = np.array([r.name in done for r in rows], np.int32)
        gathered = np.asarray(multihost_utils.process_allgather(flags)).reshape(nproc, len(rows))
        done = {r.name for r, f in zip(rows, gathered.any(axis=0)) if f}
    todo = [r for r in rows if r.name not in done]

    ndev = pipe.mesh.devices.size
    sizes = _batch_sizes(ndev, per_device)
    groups: dict = {}
    for r in todo:
        groups.setdefault(r.group, []).append(r)
    batches = [g[i:i + sizes[-1]] for g in groups.values() for i in range(0, len(g), sizes[-1])]
    shapes = {(b[0].group, next(s for s in sizes if s >= len(b))) for b in batches}

    bar = tqdm(total=len(todo), unit="img", disable=not progress or pid != 0 or not todo, file=sys.stderr,
               mininterval=0.5, smoothing=0.1,  # images/s (never s/image) and the time left:
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")
    written = 0
    first_batch_seconds = None
    t0 = time.perf_counter()
    mf = open(manifest, "a", encoding="utf-8")
    writes: collections.deque = collections.deque()  # futures of PNG writes, oldest first
    max_pending = max(2 * sizes[-1], write_threads)  # bounds the host memory held by images to write

    def write(row: Row, img: np.ndarray, seconds: float, batch_index: int, batch_size: int) -> dict:
        save_png(os.path.join(out, row.name), img, _meta(row, model))
        return {"file": row.name, "row": row.index, **_meta(row, model), "seconds": round(seconds, 4),
                "batch": batch_index, "batch_size": batch_size}

    def record(limit: int) -> None:
        """Manifest lines for finished writes, oldest first; wait while more than ``limit`` are pending."""
        nonlocal written
        n = 0
        while writes and (len(writes) > limit or writes[0].done()):
            entry = writes.popleft().result()  # a failed write (disk full, ...) raises here
            mf.write(json.dumps(entry, sort_keys=True) + "\n")
            written += 1
            n += 1
        if n:
            mf.flush()  # enough for a killed process; the PNG itself is fsynced

    def dispatch(brows: list[Row]):
        size = next(s for s in sizes if s >= len(brows))
        padded = brows + [brows[-1]] * (size - len(brows))  # same shape as a full batch: no new compile
        r0 = brows[0]
        arr, _ = pipe.generate_async(
            [r.prompt for r in padded], [r.negative_prompt for r in padded], seed=[r.seed for r in padded],
            num_inference_steps=r0.steps, guidance_scale=[r.guidance for r in padded],
            guidance_rescale=[r.guidance_rescale for r in padded], height=r0.height, width=r0.width,
            scheduler=r0.scheduler, clip_skip=r0.clip_skip)
        return arr, size

    last_ready = t0

    def collect(item, pool) -> None:
        """Wait for a dispatched batch, copy this host's rows back and queue their writes."""
        nonlocal last_ready, first_batch_seconds
        k, brows, arr, size, t_dispatch = item
        idx, data = sharding.local_rows(arr)  # blocks until this batch is computed
        t_ready = time.perf_counter()
        busy = t_ready - max(t_dispatch, last_ready)  # device time of this batch (it queued behind the last)
        last_ready = t_ready
        if first_batch_seconds is None:
            first_batch_seconds = t_ready - t0  # includes compilation
        for j, i in enumerate(idx):
            if i < len(brows):
                writes.append(pool.submit(write, brows[i], data[j], busy / len(brows), k, size))
        bar.update(len(brows))

    pool = cf.ThreadPoolExecutor(max_workers=write_threads, thread_name_prefix="sd-jax-write")
    try:
        inflight: collections.deque = collections.deque()
        for k, brows in enumerate(batches):
            arr, size = dispatch(brows)
            inflight.append((k, brows, arr, size, time.perf_counter()))
            # Keep one batch queued behind the running one; collect the older one meanwhile.
            while len(inflight) > 1:
                collect(inflight.popleft(), pool)
            record(max_pending)
        while inflight:
            collect(inflight.popleft(), pool)
        record(0)
    finally:
        pool.shutdown(wait=True)  # a write in progress finishes (atomically) even on an error
        while writes:  # record what was written before an error; a failed write's image is absent
            fu = writes.popleft()
            if fu.exception() is None:
                mf.write(json.dumps(fu.result(), sort_keys=True) + "\n")
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
            "batches": len(batches), "compiled_shapes": len(shapes), "devices": ndev, "batch_size": sizes[-1]}


def _model_name(pipe) -> str:
    from sd_jax.commands import model_name
    return model_name(pipe)


def run_from_args(args) -> int:
    import jax

    from sd_jax.commands import UsageError, check_generation_args, check_size, load, settings
    from sd_jax.memory import check_generation
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    check_generation_args(args)
    raw = read_prompt_file(args.prompts)
    make_rows(raw, settings(args), args.prompts)  # a bad row fails before the (slow) model load
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a folder")
    pipe = load(args)
    if pipe.models.unet.config.in_channels == 9:
        raise UsageError(f"{args.model or 'the model'} is an inpainting model (9 input channels); "
                         f"batch does text-to-image only")
    rows = make_rows(raw, settings(args, pipe), args.prompts)
    pipe.memory_check = not args.no_memory_check
    ndev = pipe.mesh.devices.size
    per_device = -(-(args.batch_size or ndev) // ndev)
    seen = set()
    for r in rows:  # every sampler and size is checked before the first image
        if (r.scheduler, r.steps) not in seen:
            seen.add((r.scheduler, r.steps))
            try:
                pipe.sampler(r.scheduler, r.steps)
            except ValueError as e:
                raise PromptFileError(f"{args.prompts} line {r.line}: {e}") from None
        try:
            check_size(pipe, r.width, r.height, "size")
            if (r.width, r.height) not in seen:  # fits in memory, checked before the first image
                seen.add((r.width, r.height))
                check_generation(pipe, ndev * per_device, r.height, r.width)
        except ValueError as e:
            raise PromptFileError(f"{args.prompts} line {r.line}: {e}") from None
    s = run(pipe, rows, args.out, per_device=per_device, progress=not args.no_progress)
    if jax.process_index() == 0:
        rate = f"{s['images_per_second']:.2f} images/s" if s["generated"] else "nothing to do"
        first = (f" (first batch, with compilation: {s['first_batch_seconds']:.1f}s)"
                 if s["first_batch_seconds"] is not None else "")
        print(f"{s['generated']} generated, {s['skipped']} already done, {s['rows']} rows in {args.out}; "
              f"{s['seconds']:.1f}s{first}, {rate} on {ndev} device(s), batches of {s['batch_size']}",
              file=sys.stderr)
    return 0
