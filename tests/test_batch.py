"""``sd-jax batch``: prompt files, grouping and padding, overlap, the manifest, kill and resume,
8 devices.

Fast tests drive :func:`sd_jax.batch.run` with a fake pipeline whose "images" encode their
seed (no model, no compilation; 8 fake CPU devices, from conftest.py); the rest run the tiny
model: ``sd-jax batch`` in subprocesses as a user would (on 1 and on 8 fake CPU devices),
checked against the Python API in-process on one device.
"""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from PIL import Image

from sd_jax import batch, sharding
from sd_jax.batch import PromptFileError
from cli_helpers import assert_user_error, cli_env, ok, run_cli, sd_jax_command
from tiny_models import build_tiny_pipeline

DEFAULTS = {"negative_prompt": "", "seed": 0, "steps": 2, "guidance": 7.5, "guidance_rescale": 0.0,
            "width": 32, "height": 32, "scheduler": "ddim", "clip_skip": None}


# ----------------------------------------------------------------------------- helpers
def manifest(out) -> list[dict]:
    with open(os.path.join(out, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def pngs(out) -> list[str]:
    return sorted(f for f in os.listdir(out) if f.endswith(".png"))


def pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def assert_complete(out, rows):
    """Every row's image exactly once, a one-line-per-image manifest, nothing else left."""
    names = sorted(r.name for r in rows)
    assert pngs(out) == names
    assert sorted(os.listdir(out)) == sorted(names + ["manifest.jsonl", "sd-jax-batch.json"])  # no .tmp-*, no lock
    entries = manifest(out)
    assert sorted(e["file"] for e in entries) == names
    for e in entries:
        row = next(r for r in rows if r.name == e["file"])
        assert (e["prompt"], e["seed"], e["steps"], e["width"], e["height"]) == \
            (row.prompt, row.seed, row.steps, row.width, row.height)
        with Image.open(os.path.join(out, e["file"])) as im:
            im.load()  # not truncated
            assert im.size == (row.width, row.height)


def rows_of(path, text, **defaults):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return batch.make_rows(batch.read_prompt_file(str(path)), {**DEFAULTS, **defaults}, str(path))


# ----------------------------------------------------------------------------- prompt files
def test_prompt_file_formats(tmp_path):
    txt = rows_of(tmp_path / "p.txt", "# a comment\na red circle\n\n  a blue square  \n", seed=10)
    assert [(r.prompt, r.seed, r.line) for r in txt] == [("a red circle", 10, 2), ("a blue square", 11, 4)]
    assert txt[0].name == "000000-a-red-circle-10.png" and txt[1].name == "000001-a-blue-square-11.png"

    jsonl = rows_of(tmp_path / "p.jsonl", '{"prompt": "a", "seed": 5, "negative_prompt": "b", "steps": 3}\n'
                                          '"just a string"\n\n'
                                          '{"prompt": "c", "size": "32x48", "guidance": 3, "name": "c", '
                                          '"scheduler": "Euler-A", "guidance_rescale": 0.5}\n'
                                          '{"prompt": "d", "width": 48, "height": 32, "cfg": 2}\n')
    a, s, c, d = jsonl
    assert (a.seed, a.negative_prompt, a.steps, a.line) == (5, "b", 3, 1)
    assert (s.prompt, s.seed, s.steps) == ("just a string", 1, 2)
    assert (c.width, c.height, c.guidance, c.scheduler, c.name, c.guidance_rescale, c.line) == \
        (32, 48, 3.0, "euler_a", "c.png", 0.5, 4)
    assert (d.width, d.height, d.guidance) == (48, 32, 2.0)
    assert (a.guidance_start, a.guidance_end) == (None, None)  # the model's (generation_defaults.json)

    # the guidance window: a row's own, else the job's (--guidance-start/--guidance-end); recorded
    # in an image's metadata only when set, so images of jobs written before it still match
    w = rows_of(tmp_path / "w.jsonl", '{"prompt": "a", "guidance_end": 0.8}\n{"prompt": "b"}\n', guidance_start=0.1)
    assert [(r.guidance_start, r.guidance_end) for r in w] == [(0.1, 0.8), (0.1, None)]
    assert (w[0].request().guidance_start, w[0].request().guidance_end) == (0.1, 0.8)
    meta = batch._meta(w[0], "m")
    assert (meta["guidance_start"], meta["guidance_end"]) == (0.1, 0.8)
    assert "guidance_end" not in batch._meta(a, "m") and batch._matches(batch._meta(a, "m"), a, "m")
    assert not batch._matches({**meta, "guidance_end": 0.9}, w[0], "m")
    assert a.group != c.group and a.group != d.group and s.group == (2, 32, 32, "ddim", None)

    csv_rows = rows_of(tmp_path / "p.csv", '\ufeffPrompt,seed,steps,guidance,size,negative_prompt,name\r\n'
                                          '"a red, round circle",3,,,,,\r\n'
                                          'a blue square,4,3,2.5,32x48,"blurry, dark",sq\r\n')
    assert [(r.prompt, r.seed, r.steps, r.guidance, r.width, r.height, r.negative_prompt, r.name, r.line)
            for r in csv_rows] == [("a red, round circle", 3, 2, 7.5, 32, 32, "", "000000-a-red-round-circle-3.png", 2),
                                   ("a blue square", 4, 3, 2.5, 32, 48, "blurry, dark", "sq.png", 3)]


@pytest.mark.parametrize("name,text,message", [
    ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', "line 2: not valid JSON"),
    ("p.jsonl", '{"prompt": "a"}\n[1, 2]\n', "line 2: expected a JSON object"),
    ("p.jsonl", '{"prompt": "a", "colour": "red"}\n', "line 1: unknown field(s) colour"),
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "  "}\n', "line 3: empty or missing prompt"),
    ("p.jsonl", '{"prompt": 42}\n', "line 1: prompt must be text, got 42"),
    ("p.jsonl", '{"prompt": "a", "seed": "abc"}\n', "line 1: seed must be an integer"),
    ("p.jsonl", '{"prompt": "a", "seed": 1.5}\n', "line 1: seed must be an integer"),
    ("p.jsonl", '{"prompt": "a", "seed": -1}\n', "line 1: seed must be in"),
    ("p.jsonl", '{"prompt": "a", "steps": 0}\n', "line 1: steps must be at least 1"),
    ("p.jsonl", '{"prompt": "a", "size": "30x32"}\n', "line 1: size '30x32' must be WxH"),
    ("p.jsonl", '{"prompt": "a", "guidance": "lots"}\n', "line 1: guidance must be a number"),
    ("p.jsonl", '{"prompt": "a", "scheduler": "fancy"}\n', "line 1: unknown scheduler 'fancy'"),
    ("p.jsonl", '{"prompt": "a", "guidance_end": 0}\n', "line 1: the guidance window must satisfy"),
    ("p.jsonl", '{"prompt": "a", "guidance_start": "x"}\n', "line 1: guidance_start must be a number"),
    ("p.jsonl", '{"prompt": "a", "name": "x"}\n{"prompt": "b", "name": "X.png"}\n',
     "line 2: output name 'X.png' is already used on line 1"),
    ("p.jsonl", '{"prompt": "a", "name": "../x"}\n', "line 1: name '../x' must be a plain file name"),
    ("p.csv", "text,seed\nhello,1\n", "line 1: the CSV header needs a 'prompt' column"),
    ("p.csv", "prompt,seed\nhello,1\nbye,2,3\n", "line 3: more fields than the header has"),
    ("p.csv", "prompt,seed\nhello,x\n", "line 2: seed must be an integer"),
    ("p.txt", "", "has no prompts"),
    ("p.txt", "# only a comment\n\n", "has no prompts"),
    ("p.yaml", "prompt: a\n", "unknown type '.yaml'"),
])
def test_prompt_file_errors(tmp_path, name, text, message):
    with pytest.raises(PromptFileError) as info:
        rows_of(tmp_path / name, text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert str(info.value).startswith(str(tmp_path / name)) or "prompt file" in str(info.value)


def test_unreadable_prompt_files(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptFileError, match="not UTF-8"):
        batch.read_prompt_file(str(tmp_path / "bin.txt"))
    with pytest.raises(PromptFileError, match="is a folder"):
        batch.read_prompt_file(str(tmp_path))
    with pytest.raises(PromptFileError, match="not found"):
        batch.read_prompt_file(str(tmp_path / "none.txt"))


# ----------------------------------------------------------------------------- batch.run with a fake pipeline
class FakePipe:
    """The pipeline's dispatch contract (resolve / dispatch / compiled_sizes) with no model:
    image = the seed's value in every pixel."""

    def __init__(self, mesh=None, fail_on_call=None):
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.source = "/models/fake"
        self.calls, self.events, self.fail_on_call = [], [], fail_on_call

    def resolve(self, request, output="uint8", loop="scan"):
        return request, ("fake", request.steps, request.width, request.height, request.scheduler, request.clip_skip)

    def compiled_sizes(self, plan):
        return {c["arr"].shape[0] for c in self.calls if c["plan"] == plan}

    def dispatch(self, plan, requests, size=None):
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory (fake)")
        _, steps, width, height = plan[:4]
        imgs = np.stack([np.full((height, width, 3), r.seed % 251, np.uint8) for r in requests])
        size = sharding.padded_size(max(size or 0, len(imgs)), self.mesh)
        arr = sharding.shard_batch(sharding.pad_batch(imgs, size), self.mesh)
        self.calls.append(dict(n=size, steps=steps, size=(width, height), arr=arr, plan=plan,
                               seeds=[r.seed for r in requests]))
        self.events.append(("dispatch", len(self.calls) - 1))
        return arr


def make(n, **kw):
    return batch.make_rows([(i + 1, {"prompt": f"p{i}", **kw}) for i in range(n)], DEFAULTS, "p.txt")


def test_run_groups_pads_and_fills_every_device(tmp_path, monkeypatch):
    # two groups (steps 2: 5 rows, steps 3: 11 rows), interleaved in the file
    raw = [(i + 1, {"prompt": f"p{i}", **({"steps": 3} if i % 2 or i >= 10 else {})}) for i in range(16)]
    rows = batch.make_rows(raw, DEFAULTS, "p.txt")
    assert sum(r.steps == 2 for r in rows) == 5
    pipe = FakePipe()
    real_save = batch.save_png
    monkeypatch.setattr(batch, "save_png", lambda path, img, meta: (
        pipe.events.append(("write", os.path.basename(path))), real_save(path, img, meta)))
    s = batch.run(pipe, rows, str(tmp_path), per_device=2, progress=False)
    # 8 devices x 2: group steps=2 (5 rows) -> one batch padded to 8; steps=3 (11 rows) -> 11 in a batch of 16
    assert [(c["n"], c["steps"], c["arr"].shape[0]) for c in pipe.calls] == [(8, 2, 8), (16, 3, 16)]
    assert s["batches"] == 2 and s["compiled_shapes"] == 2 and s["generated"] == 16 and s["written_here"] == 16
    for c in pipe.calls:
        shards = c["arr"].addressable_shards
        assert len({sh.device for sh in shards}) == 8 and all(sh.data.shape[0] == c["arr"].shape[0] // 8
                                                             for sh in shards)
    first_write = next(i for i, e in enumerate(pipe.events) if e[0] == "write")
    assert pipe.events.index(("dispatch", 1)) < first_write  # batch 1 queued before batch 0's writes
    assert_complete(str(tmp_path), rows)
    for r in rows:
        assert pixels(tmp_path / r.name)[0, 0, 0] == r.seed % 251
    entries = manifest(tmp_path)
    assert [e["row"] for e in entries] == list(range(16))  # tidied into row order
    assert all(e["seconds"] >= 0 and e["model"] == "fake" for e in entries)

    # Same command again: nothing to do. One image deleted: only it comes back.
    pipe2 = FakePipe()
    assert batch.run(pipe2, rows, str(tmp_path), progress=False)["generated"] == 0 and pipe2.calls == []
    os.unlink(tmp_path / rows[3].name)
    s = batch.run(pipe2, rows, str(tmp_path), progress=False)
    assert (s["generated"], s["skipped"]) == (1, 15) and pipe2.calls[0]["seeds"][:1] == [rows[3].seed]
    assert_complete(str(tmp_path), rows)


def test_error_mid_run_keeps_what_was_written_and_resumes(tmp_path):
    rows = make(40)
    with pytest.raises(jax.errors.JaxRuntimeError):
        batch.run(FakePipe(fail_on_call=3), rows, str(tmp_path), progress=False)
    # batches 0 and 1 were collected and written (batch 2 was in flight): each on disk and in the manifest
    done = pngs(tmp_path)
    assert len(done) == 16 and sorted(e["file"] for e in manifest(tmp_path)) == done
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    pipe = FakePipe()
    s = batch.run(pipe, rows, str(tmp_path), progress=False)
    assert (s["generated"], s["skipped"]) == (24, 16)
    assert_complete(str(tmp_path), rows)


def test_recover_repairs_after_a_kill(tmp_path):
    rows = make(6)
    out = str(tmp_path)
    img = np.zeros((32, 32, 3), np.uint8)
    for r in rows[:4]:
        batch.save_png(os.path.join(out, r.name), img, batch._meta(r, "fake"))
    entry = lambda r: {"file": r.name, "row": r.index, **batch._meta(r, "fake"), "seconds": 0.1}  # noqa: E731
    with open(tmp_path / "manifest.jsonl", "w") as f:
        f.write(json.dumps(entry(rows[0])) + "\n")
        f.write(json.dumps(entry(rows[5])) + "\n")  # its image was deleted: not done, entry dropped
        f.write(json.dumps({"file": "other.png", "row": 0}) + "\n")  # another prompt file's image: kept
        f.write(json.dumps(entry(rows[1]))[:30])  # cut by the kill: dropped, image 1 rebuilt from its PNG
    batch.save_png(os.path.join(out, "other.png"), img, {"prompt": "other"})
    (tmp_path / ".tmp-abc123.png").write_bytes(b"\x89PNG half")  # a write cut by the kill
    (tmp_path / "manifest.jsonl.tmp").write_text("half")  # a manifest rewrite cut by the kill
    changed = dataclasses.replace(rows[2], prompt="p2 edited")  # the prompt file changed
    with open(os.path.join(out, rows[3].name), "r+b") as f:  # not a PNG any more
        f.write(b"garbage!")

    done = batch.recover(out, [rows[0], rows[1], changed, rows[3], rows[4], rows[5]],
                         os.path.join(out, "manifest.jsonl"), "fake")
    assert done == {rows[0].name, rows[1].name}
    assert sorted(os.listdir(out)) == sorted([r.name for r in rows[:4]] + ["other.png", "manifest.jsonl"])
    entries = {e["file"]: e for e in manifest(out)}
    assert set(entries) == {rows[0].name, rows[1].name, "other.png"}
    assert entries[rows[0].name]["seconds"] == 0.1 and entries[rows[1].name]["seconds"] is None
    assert entries[rows[1].name]["prompt"] == "p1" and entries[rows[1].name]["seed"] == rows[1].seed
    # a different model: nothing counts as done
    assert batch.recover(out, rows, os.path.join(out, "manifest.jsonl"), "another-model") == set()


# ----------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("batch_model") / "tiny")
    build_tiny_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def pipe1(tiny):
    from sd_jax.pipeline import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(tiny, mesh=sharding.make_mesh(jax.devices()[:1]))


PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green", "white") for s in ("circle", "square", "triangle", "star")]


@pytest.fixture(scope="module")
def reference(pipe1, tmp_path_factory):
    """The 16 rows of PROMPTS (steps 2, 32x32, ddim, seeds 10...), uninterrupted, on one device."""
    d = tmp_path_factory.mktemp("reference")
    rows = rows_of(d / "prompts.txt", "\n".join(PROMPTS) + "\n", seed=10)
    out = str(d / "out")
    s = batch.run(pipe1, rows, out, progress=False)
    assert s["generated"] == 16 and s["batches"] == 16
    return rows, out


def test_batch_command_with_jsonl_and_csv(tiny, pipe1, reference, tmp_path):
    """``sd-jax batch`` from .jsonl and .csv with per-row settings (.txt: the kill-and-resume test);
    the images are those of the Python API with the same settings; the same command again has
    nothing to do."""
    (tmp_path / "p.jsonl").write_text(
        '{"prompt": "a red circle", "seed": 12}\n'
        '{"prompt": "a green star", "seed": 3, "steps": 3, "size": "32x48", "scheduler": "euler", '
        '"guidance": 3.0, "negative_prompt": "blurry", "name": "star"}\n'
        '{"prompt": "a white square", "guidance_rescale": 0.7}\n')
    (tmp_path / "p.csv").write_text('prompt,seed,steps,size,scheduler,guidance,negative_prompt,name\n'
                                    '"a black, small triangle",4,3,32x48,euler,3.0,blurry,tri\n'
                                    'a red square,11,,,,,,\n')
    common = ["--model", tiny, "--steps", 2, "--size", "32x32", "--scheduler", "ddim"]
    p = ok(run_cli("batch", tmp_path / "p.jsonl", "--out", tmp_path / "jsonl", *common))
    assert "3 generated, 0 already done, 3 rows" in p.stderr and "images/s" in p.stderr
    ok(run_cli("batch", tmp_path / "p.csv", "--out", tmp_path / "csv", *common))
    ref_rows, ref_out = reference

    # .jsonl / .csv: per-row settings, checked against the API
    js = {e["file"]: e for e in manifest(tmp_path / "jsonl")}
    assert sorted(js) == ["000000-a-red-circle-12.png", "000002-a-white-square-2.png", "star.png"]
    star = js["star.png"]
    assert (star["seed"], star["steps"], star["width"], star["height"], star["scheduler"], star["guidance"],
            star["negative_prompt"]) == (3, 3, 32, 48, "euler", 3.0, "blurry")
    assert js["000002-a-white-square-2.png"]["guidance_rescale"] == 0.7
    assert all(isinstance(e["seconds"], float) and e["prompt"] for e in js.values())
    want = pipe1("a green star", "blurry", seed=3, num_inference_steps=3, guidance_scale=3.0, height=48, width=32,
                 scheduler="euler", output_type="uint8")[0]
    np.testing.assert_array_equal(pixels(tmp_path / "jsonl" / "star.png"), want)
    want = pipe1("a white square", seed=2, num_inference_steps=2, guidance_rescale=0.7, height=32, width=32,
                 scheduler="ddim", output_type="uint8")[0]
    np.testing.assert_array_equal(pixels(tmp_path / "jsonl" / "000002-a-white-square-2.png"), want)
    cs = {e["file"]: e for e in manifest(tmp_path / "csv")}
    assert sorted(cs) == ["000001-a-red-square-11.png", "tri.png"]
    assert (cs["tri.png"]["prompt"], cs["tri.png"]["height"]) == ("a black, small triangle", 48)
    np.testing.assert_array_equal(pixels(tmp_path / "csv" / "000001-a-red-square-11.png"),
                                  pixels(os.path.join(ref_out, "000001-a-red-square-11.png")))  # row 1, seed 11
    with Image.open(tmp_path / "csv" / "tri.png") as im:
        assert im.size == (32, 48) and "Negative prompt: blurry" in im.text["parameters"]
        assert im.text["AI-generated"] == "true"

    p = ok(run_cli("batch", tmp_path / "p.csv", "--out", tmp_path / "csv", *common))
    assert "0 generated, 2 already done, 2 rows" in p.stderr
    assert sorted(os.listdir(tmp_path / "csv")) == ["000001-a-red-square-11.png", "manifest.jsonl",
                                                    "sd-jax-batch.json", "tri.png"]


def test_batch_command_errors(tiny, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b", "steps": "many"}\n')
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    for args, fragments in [
        ([tmp_path / "empty.txt"], ["has no prompts"]),
        ([tmp_path / "bad.jsonl"], ["bad.jsonl line 2: steps must be an integer"]),
        ([tmp_path / "bin.txt"], ["not UTF-8"]),
        ([tmp_path], ["is a folder"]),
        ([tmp_path / "bad.jsonl", "--batch-size", 0], ["--batch-size"]),
    ]:
        assert_user_error(run_cli("batch", *args, "--out", out, "--model", tiny), *fragments)
    assert not out.exists()


def test_killed_batch_job_resumes_on_8_devices(tiny, reference, tmp_path):
    """``sd-jax batch`` from a .txt file on one device, SIGKILLed once it has written an image, then
    the same command on 8 (fake CPU) devices: the remaining rows are regrouped into batches of 8,
    one per device, and the job ends with every image once, a complete manifest, no temporary
    files, and the images of the uninterrupted one-device run."""
    ref_rows, ref_out = reference
    shutil.copy(os.path.join(os.path.dirname(ref_out), "prompts.txt"), tmp_path / "prompts.txt")
    out = tmp_path / "out"
    args = ["batch", tmp_path / "prompts.txt", "--out", out, "--model", tiny, "--steps", 2, "--size", "32x32",
            "--scheduler", "ddim", "--seed", 10]
    proc = subprocess.Popen(sd_jax_command() + [str(a) for a in args], env=cli_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                with open(out / "manifest.jsonl") as f:
                    if sum(1 for line in f if line.endswith("\n")) >= 1:
                        break
            except FileNotFoundError:
                pass
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    before = [f for f in pngs(out) if not f.startswith(".tmp-")]  # a write cut by the kill may be left
    assert 1 <= len(before) < 16, before
    assert (out / ".sd-jax-batch.lock").read_text().strip() == str(proc.pid)  # stale: it must not block

    p = ok(run_cli(*args, devices=8))
    n = len(before)
    assert f"{16 - n} generated, {n} already done, 16 rows" in p.stderr and "on 8 device(s), batches of 8" in p.stderr
    assert_complete(str(out), ref_rows)
    resumed = [e for e in manifest(out) if e["file"] not in before]
    assert len(resumed) == 16 - n and all(e["batch_size"] == 8 for e in resumed)
    assert max(e["batch"] for e in resumed) == (16 - n - 1) // 8  # full batches of 8 rows
    diffs = {r.name: np.abs(pixels(out / r.name).astype(int) - pixels(os.path.join(ref_out, r.name)).astype(int)).max()
             for r in ref_rows}
    assert max(diffs.values()) <= 1, diffs  # the same computation on each device; at most rounding
