"""High-throughput, resumable batch generation: ``sd-jax batch PROMPTS --out DIR``.

* Rows come from ``.txt`` (one prompt a line), ``.jsonl`` or ``.csv`` (columns
  ``prompt``, and optionally ``negative_prompt``, ``seed``, ``steps``, ``guidance``,
  ``size`` (WxH), ``scheduler``, ``name``).
* Rows are grouped by their static settings (steps, size, scheduler) so each compiled
  function is reused; each call fills every device of every host.
* Host work overlaps device work: batch k+1 is dispatched before batch k's images
  are copied back, encoded and written by a thread pool.
* Every image is written atomically (temporary file, then rename) under a
  deterministic name, then recorded in ``manifest.jsonl``.  Killed at any moment and
  started again, the job skips what is on disk, repairs the manifest, and finishes
  with every image present exactly once.
* Multi-host: every process runs the same SPMD program; each writes the images that
  its own devices computed, and its own manifest part (``manifest.p{i}.jsonl``),
  merged by process 0 at the end.
"""
from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import glob
import json
import os
import re
import sys
import time

import numpy as np

from sd_jax import sharding
from sd_jax.images import read_metadata, save_png

FIELDS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "scheduler", "name", "guidance_rescale")
ALIASES = {"negative": "negative_prompt", "cfg": "guidance", "guidance_scale": "guidance", "file": "name",
           "output": "name", "num_inference_steps": "steps", "sampler": "scheduler"}


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

    @property
    def group(self):
        return (self.steps, self.width, self.height, self.scheduler)


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "image"


def read_prompt_file(path: str) -> list[tuple[int, dict]]:
    """(line number, raw row dict) for every row; a clear error naming the bad line."""
    from sd_jax.weights.safetensors_io import CheckpointError  # noqa: F401  (same error family: ValueError)
    if not os.path.isfile(path):
        raise ValueError(f"prompt file {path!r} not found")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (UnicodeDecodeError, OSError) as e:
        raise ValueError(f"cannot read prompt file {path!r}: {e}") from None
    ext = os.path.splitext(path)[1].lower()
    rows: list[tuple[int, dict]] = []
    if ext == ".jsonl":
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {ln}: not valid JSON ({e.msg})") from None
            if isinstance(obj, str):
                obj = {"prompt": obj}
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {ln}: expected a JSON object with a \"prompt\"")
            rows.append((ln, obj))
    elif ext == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in [h.strip().lower() for h in reader.fieldnames]:
            raise ValueError(f"{path} line 1: the CSV header needs a 'prompt' column")
        for i, rec in enumerate(reader):
            if None in rec:
                raise ValueError(f"{path} line {reader.line_num}: more fields than the header has")
            rows.append((reader.line_num, {k.strip().lower(): v for k, v in rec.items() if v not in (None, "")}))
    elif ext in (".txt", ""):
        for ln, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((ln, {"prompt": line.strip()}))
    else:
        raise ValueError(f"prompt file {path!r}: unknown type {ext!r}; use .txt, .jsonl or .csv")
    if not rows:
        raise ValueError(f"prompt file {path!r} has no prompts")
    return rows


def make_rows(raw: list[tuple[int, dict]], defaults: dict, path: str, valid_schedulers) -> list[Row]:
    from sd_jax.cli import parse_size
    rows, names = [], set()
    for i, (ln, rec) in enumerate(raw):
        rec = {ALIASES.get(k, k): v for k, v in rec.items()}
        unknown = set(rec) - set(FIELDS) - {"width", "height"}
        if unknown:
            raise ValueError(f"{path} line {ln}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(FIELDS)}")
        prompt = rec.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path} line {ln}: empty or missing prompt")
        try:
            seed = int(rec.get("seed", defaults["seed"] + i))
            steps = int(rec.get("steps", defaults["steps"]))
            guidance = float(rec.get("guidance", defaults["guidance"]))
            rescale = float(rec.get("guidance_rescale", defaults["guidance_rescale"]))
            if "size" in rec:
                w, h = parse_size(str(rec["size"]))
            else:
                w, h = int(rec.get("width", defaults["width"])), int(rec.get("height", defaults["height"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} line {ln}: {e}") from None
        if steps < 1 or not 0 <= seed < 2**32 or w % 8 or h % 8 or w <= 0 or h <= 0:
            raise ValueError(f"{path} line {ln}: steps must be >= 1, seed in [0, 2**32), size multiples of 8")
        sched = rec.get("scheduler", defaults["scheduler"])
        if sched not in valid_schedulers:
            raise ValueError(f"{path} line {ln}: unknown scheduler {sched!r}; choose one of {', '.join(sorted(valid_schedulers))}")
        name = rec.get("name") or f"{i:06d}-{_slug(prompt)}-{seed}"
        name = os.path.basename(str(name))
        name = name if name.lower().endswith(".png") else name + ".png"
        if name in names:
            raise ValueError(f"{path} line {ln}: output name {name!r} is used twice")
        names.add(name)
        rows.append(Row(i, prompt, str(rec.get("negative_prompt", defaults["negative_prompt"]) or ""), seed, steps,
                        guidance, rescale, w, h, sched, name))
    return rows


def _manifest_path(out: str, process: int, nproc: int) -> str:
    return os.path.join(out, "manifest.jsonl" if nproc == 1 else f"manifest.p{process}.jsonl")


def _read_manifest(path: str) -> dict[str, dict]:
    entries = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)  # a line cut by a kill is simply dropped
                except json.JSONDecodeError:
                    continue
                if isinstance(e, dict) and "file" in e:
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


def recover(out: str, rows: list[Row], manifest: str) -> set[str]:
    """Clean up after a kill; returns the names already done. The manifest is rewritten
    to hold exactly one entry for each finished image."""
    for tmp in glob.glob(os.path.join(out, ".tmp-*.png")):
        os.unlink(tmp)
    entries = _read_manifest(manifest)
    wanted = {r.name: r for r in rows}
    done = set()
    fixed = []
    for name, row in wanted.items():
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        e = entries.get(name)
        if e is None:  # killed between the rename and the manifest line: rebuild it from the PNG
            try:
                meta = read_metadata(path)
            except Exception:  # unreadable -> regenerate it
                os.unlink(path)
                continue
            e = {"file": name, "row": row.index, **meta, "seconds": None}
        fixed.append(e)
        done.add(name)
    fixed += [e for n, e in entries.items() if n not in wanted]  # entries of other rows stay
    _write_jsonl_atomic(manifest, sorted(fixed, key=lambda e: (e.get("row", -1), e["file"])))
    return done


def _meta(row: Row, model: str) -> dict:
    return {"prompt": row.prompt, "negative_prompt": row.negative_prompt, "seed": row.seed, "steps": row.steps,
            "guidance": row.guidance, "guidance_rescale": row.guidance_rescale, "width": row.width,
            "height": row.height, "scheduler": row.scheduler, "model": model, "generator": "sd-jax"}


def run(pipe, rows: list[Row], out: str, *, per_device: int = 1, progress: bool = True) -> dict:
    """Generate every row not already on disk. Returns a summary dict."""
    import jax
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    pid, nproc = jax.process_index(), jax.process_count()
    manifest = _manifest_path(out, pid, nproc)
    done = recover(out, rows, manifest)
    if nproc > 1:  # every process must run the same batches: take process 0's view
        from jax.experimental import multihost_utils
        flags = np.array([r.name in done for r in rows], np.int32)
        done_all = multihost_utils.broadcast_one_to_all(flags)
        # a row is done only if its image is written, by whichever host owned it
        done = {r.name for r, f in zip(rows, np.asarray(done_all)) if f}
    todo = [r for r in rows if r.name not in done]
    model = os.path.basename(os.path.normpath(pipe.source or ""))
    step = pipe.mesh.devices.size * per_device
    groups: dict = {}
    for r in todo:
        groups.setdefault(r.group, []).append(r)
    batches = [g[i:i + step] for g in groups.values() for i in range(0, len(g), step)]

    t0 = time.perf_counter()
    written = 0
    bar = tqdm(total=len(todo), unit="img", disable=not progress or pid != 0, file=sys.stderr)
    mf = open(manifest, "a", encoding="utf-8")

    def write(row: Row, img: np.ndarray, seconds: float):
        save_png(os.path.join(out, row.name), img, _meta(row, model))
        return {"file": row.name, "row": row.index, **_meta(row, model), "seconds": round(seconds, 4)}

    pending = None  # (rows, device array, dispatch time)

    def drain(item, pool):
        nonlocal written
        brows, arr, t_dispatch = item
        idx, data = sharding.local_rows(arr)  # blocks until this batch is computed
        per_image = (time.perf_counter() - t_dispatch) / max(len(brows), 1)
        futs = [pool.submit(write, brows[i], data[j], per_image) for j, i in enumerate(idx) if i < len(brows)]
        for fu in futs:
            entry = fu.result()
            mf.write(json.dumps(entry, sort_keys=True) + "\n")
            mf.flush()
            os.fsync(mf.fileno())
            written += 1
        bar.update(len(brows))

    try:
        with cf.ThreadPoolExecutor(max_workers=4) as pool:
            for brows in batches:
                r0 = brows[0]
                arr, _ = pipe.generate_async(
                    [r.prompt for r in brows], [r.negative_prompt for r in brows], seed=[r.seed for r in brows],
                    num_inference_steps=r0.steps, guidance_scale=[r.guidance for r in brows],
                    guidance_rescale=[r.guidance_rescale for r in brows], height=r0.height, width=r0.width,
                    scheduler=r0.scheduler)
                if pending is not None:  # the device is busy with `arr`: write the previous batch now
                    drain(pending, pool)
                pending = (brows, arr, time.perf_counter())
            if pending is not None:
                drain(pending, pool)
    finally:
        mf.close()
        bar.close()
    elapsed = time.perf_counter() - t0
    if nproc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("sd_jax_batch_done")
        if pid == 0:
            merged = {}
            for p in range(nproc):
                merged.update(_read_manifest(_manifest_path(out, p, nproc)))
            _write_jsonl_atomic(os.path.join(out, "manifest.jsonl"),
                                sorted(merged.values(), key=lambda e: (e.get("row", -1), e["file"])))
    return {"rows": len(rows), "skipped": len(rows) - len(todo), "generated": len(todo), "written_here": written,
            "seconds": elapsed, "images_per_second": len(todo) / elapsed if todo and elapsed > 0 else 0.0,
            "batches": len(batches), "compiled_shapes": len(groups)}


def run_from_args(args) -> int:
    from sd_jax.commands import load, settings
    from sd_jax.diffusion.samplers import SCHEDULERS
    raw = read_prompt_file(args.prompts)  # fail on a bad file before loading the model
    pipe = load(args)
    defaults = settings(args, pipe)
    valid = set(SCHEDULERS) | {f"{k}_karras" for k in SCHEDULERS}
    rows = make_rows(raw, defaults, args.prompts, valid)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    per_device = max(1, (args.batch_size or pipe.mesh.devices.size) // pipe.mesh.devices.size)
    s = run(pipe, rows, args.out, per_device=per_device)
    print(f"{s['generated']} generated, {s['skipped']} already done, {s['rows']} rows; "
          f"{s['seconds']:.1f}s, {s['images_per_second']:.2f} images/s over {pipe.mesh.devices.size} device(s)",
          file=sys.stderr)
    return 0
