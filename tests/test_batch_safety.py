"""``sd-jax batch`` never silently replaces or loses a user's files: the folder remembers its
job (``sd-jax-batch.json``) and refuses a changed one unless ``--replace``; one job at a time
holds the folder's lock; a ``manifest.jsonl`` sd-jax did not write is refused; write errors
(read-only folder, full disk) are one line naming the path.

Fast tests drive :func:`sd_jax.batch.run` with test_batch's fake pipeline; the CLI tests run the
shipped model at 64x64 with 2 steps.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from sd_jax import batch, cli, commands
from sd_jax.batch import OutputFolderError
from cli_helpers import assert_user_error, cli_env, ok, run_cli, sd_jax_command
from test_batch import FakePipe, assert_complete, make, manifest

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")
FLAGS = ["--model", SHIPPED, "--size", "64x64", "--no-progress"]
PROMPTS = "a red circle\na blue square\na green star\n"


def snapshot(out) -> dict:
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}


# ----------------------------------------------------------------------------- the job file (fake pipeline)
def test_changed_job_is_refused_and_replace_makes_it_again(tmp_path):
    rows = make(6)
    batch.run(FakePipe(), rows, str(tmp_path), progress=False)
    job = json.loads((tmp_path / "sd-jax-batch.json").read_text())
    assert job["model"] == "fake" and job["rows"] == 6
    before = snapshot(tmp_path)

    changed = make(6, steps=3)
    with pytest.raises(OutputFolderError) as info:
        batch.run(FakePipe(), changed, str(tmp_path), progress=False)
    assert "holds the images of another job" in str(info.value) and "--replace" in str(info.value)
    assert snapshot(tmp_path) == before  # nothing replaced, no lock file left

    pipe = FakePipe()
    s = batch.run(pipe, changed, str(tmp_path), progress=False, replace=True)
    assert s["generated"] == 6 and all(c["steps"] == 3 for c in pipe.calls)
    assert_complete(str(tmp_path), changed)
    assert {e["steps"] for e in manifest(tmp_path)} == {3}
    # the folder is now the new job's: the same call again has nothing to do, the old one is refused
    assert batch.run(FakePipe(), changed, str(tmp_path), progress=False)["generated"] == 0
    with pytest.raises(OutputFolderError):
        batch.run(FakePipe(), rows, str(tmp_path), progress=False)


def test_job_changes_say_what_changed():
    class Args:
        negative, seed, steps, guidance, rescale, size, scheduler, clip_skip, dtype = "", 0, 2, None, 0.0, None, None, \
            None, "fp32"
    raw = [(1, {"prompt": "a"}), (2, {"prompt": "b"})]
    old = batch.job_of_args(Args, "m", raw)
    Args.steps, Args.size = 3, (64, 64)
    assert batch.job_changes(old, batch.job_of_args(Args, "m", raw)) == ["--size (default) -> '64x64'",
                                                                         "--steps 2 -> 3"]
    assert batch.job_changes(old, batch.job_of_args(Args, "m2", raw[:1]))[0] == "model 'm' -> 'm2'"
    assert batch.job_changes(old, batch.job_of_args(Args, "m", raw[:1]))[-1] == "the prompt rows (2 -> 1 rows)"
    # line numbers (a comment added to a .txt) do not change the job
    Args.steps, Args.size = 2, None
    assert batch.job_changes(old, batch.job_of_args(Args, "m", [(5, {"prompt": "a"}), (9, {"prompt": "b"})])) == []


def test_folder_of_an_earlier_sd_jax_is_adopted_unless_its_images_differ(tmp_path):
    """No job file (sd-jax before job files): its manifest of sd-jax entries is accepted; a job
    whose rows have other settings than the manifest records is refused all the same."""
    rows = make(4)
    batch.run(FakePipe(), rows, str(tmp_path), progress=False)
    os.unlink(tmp_path / "sd-jax-batch.json")
    assert batch.run(FakePipe(), rows, str(tmp_path), progress=False)["generated"] == 0
    assert (tmp_path / "sd-jax-batch.json").is_file()  # adopted

    os.unlink(tmp_path / "sd-jax-batch.json")
    before = snapshot(tmp_path)
    with pytest.raises(OutputFolderError, match=r"000000-p0-0.png: steps 2 -> 3.*--replace"):
        batch.run(FakePipe(), make(4, steps=3), str(tmp_path), progress=False)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- reserved files
@pytest.mark.parametrize("name,text", [
    ("manifest.jsonl", "my notes about these images\n"),
    ("manifest.jsonl", '{"file": "a.png", "rating": 5}\n'),  # JSON, but not sd-jax's
    ("sd-jax-batch.json", '{"job": "mine"}\n'),
])
def test_reserved_files_of_the_user_are_refused(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(OutputFolderError, match=f"{name}' was not written by sd-jax"):
        batch.run(FakePipe(), make(2), str(tmp_path), progress=False)
    assert os.listdir(tmp_path) == [name] and (tmp_path / name).read_text() == text


def test_cli_refuses_a_foreign_manifest_before_loading_the_model(tmp_path):
    (tmp_path / "p.txt").write_text(PROMPTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.jsonl").write_text("my notes\n")
    assert_user_error(run_cli("batch", tmp_path / "p.txt", "--out", out, *FLAGS),
                      "manifest.jsonl' was not written by sd-jax", "move it away")
    assert os.listdir(out) == ["manifest.jsonl"] and (out / "manifest.jsonl").read_text() == "my notes\n"


# ----------------------------------------------------------------------------- the lock
def test_lock_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    out = str(tmp_path)
    lock_path = os.path.join(out, batch.LOCK_FILE)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({lock_path!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "os.write(fd, b'%d\\n' % os.getpid())\n"
                               "print('locked', flush=True)\n"
                               "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert batch.lock_holder(out) == holder.pid
        with pytest.raises(OutputFolderError, match=f"is in use by pid {holder.pid} "):
            batch.FolderLock(out).acquire(wait=0.2)
        with pytest.raises(OutputFolderError, match=f"is in use by pid {holder.pid} "):
            batch.run(FakePipe(), make(2), out, progress=False)
        assert os.listdir(out) == [batch.LOCK_FILE]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    assert open(lock_path).read().strip() == str(holder.pid)  # the dead holder's file stays ...
    assert batch.lock_holder(out) is None  # ... and holds nothing
    rows = make(3)
    assert batch.run(FakePipe(), rows, out, progress=False)["generated"] == 3
    assert_complete(out, rows)  # the lock file was taken over, then removed


def test_lock_is_exclusive_within_a_process_too(tmp_path):
    with batch.FolderLock(str(tmp_path)):
        with pytest.raises(OutputFolderError, match=f"in use by pid {os.getpid()} "):
            batch.FolderLock(str(tmp_path)).acquire(wait=0)
    with batch.FolderLock(str(tmp_path)):  # released: free again
        pass
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- manifest writing, write errors
def test_manifest_appends_from_several_writers_never_interleave(tmp_path):
    path = str(tmp_path / "manifest.jsonl")
    writers = [batch.ManifestWriter(path) for _ in range(4)]
    big = "x" * 5000  # longer than a buffered file's chunk: a buffered writer would split it

    def append(w, k):
        for i in range(100):
            w.append({"file": f"{k}-{i}.png", "prompt": big})

    threads = [threading.Thread(target=append, args=(w, k)) for k, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in writers:
        w.close()
    with open(path) as f:
        files = [json.loads(line)["file"] for line in f]
    assert sorted(files) == sorted(f"{k}-{i}.png" for k in range(4) for i in range(100))


def test_full_disk_names_the_path(tmp_path, monkeypatch):
    path = str(tmp_path / "manifest.jsonl")
    w = batch.ManifestWriter(path)
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OutputFolderError) as info:
        w.append({"file": "a.png"})
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:3]))  # a short write: the disk filled
    with pytest.raises(OutputFolderError) as short:
        w.append({"file": "a.png"})
    monkeypatch.setattr(os, "write", real_write)
    w.close()
    for e in (info.value, short.value):
        msg = commands.describe_error(e, "batch")
        assert msg == str(e) and "\n" not in msg and e.errno == errno.ENOSPC
        assert msg.startswith(f"no space left on the disk to write {path!r}")

    # the end-of-job rewrite: the old manifest stays whole, no temporary file is left
    (tmp_path / "manifest.jsonl").write_text('{"file": "a.png"}\n')

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OutputFolderError, match="no space left on the disk to write .*manifest.jsonl'"):
        batch._write_jsonl_atomic(path, [{"file": "b.png"}])
    assert os.listdir(tmp_path) == ["manifest.jsonl"] and "a.png" in (tmp_path / "manifest.jsonl").read_text()


def test_full_disk_while_writing_an_image_names_it(tmp_path, monkeypatch):
    rows = make(3)

    def save_png(path, img, meta):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what PIL's write raises: no file name

    monkeypatch.setattr(batch, "save_png", save_png)
    with pytest.raises(OutputFolderError) as info:
        batch.run(FakePipe(), rows, str(tmp_path), progress=False)
    assert str(tmp_path / rows[0].name) in str(info.value) and "run the same command again" in str(info.value)
    assert not (tmp_path / batch.LOCK_FILE).exists()


def test_read_only_out_fails_before_the_model_is_loaded(tmp_path, monkeypatch, capsys):
    """A read-only folder (EROFS: a read-only mount; the tests may run as root, for whom chmod
    does not stop writes), or a new --out inside one: one line naming the folder, no model load."""
    (tmp_path / "p.txt").write_text(PROMPTS)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def open_(path, flags, *a, **k):
        if os.path.abspath(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *a, **k)

    def load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(commands, "load", load)
    for out, where in [(ro, f"--out {str(ro)!r} is not writable: Read-only file system"),
                       (ro / "new" / "out", f"is not writable (in {str(ro)!r}): Read-only file system")]:
        assert cli.main(["batch", str(tmp_path / "p.txt"), "--out", str(out), "--model", SHIPPED]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sd-jax: error: ") and where in err, err
    assert os.listdir(ro) == []


# ----------------------------------------------------------------------------- the CLI, two jobs at once
def test_two_jobs_on_one_folder_and_a_changed_job(tmp_path):
    """Two ``sd-jax batch`` at once on one --out: one finishes, the other refuses naming its pid,
    and the manifest has one line per image.  Then the same folder with --steps 3: refused before
    the model is loaded, nothing replaced; with --replace the images are made again."""
    (tmp_path / "p.txt").write_text(PROMPTS)
    out = tmp_path / "out"
    args = ["batch", tmp_path / "p.txt", "--out", out, *FLAGS, "--steps", 2]
    procs = [subprocess.Popen(sd_jax_command() + [str(a) for a in args], env=cli_env(1), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=400)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    winner = next(i for i, r in enumerate(results) if "3 generated" in r.stderr)
    ok(results[winner])
    assert "3 generated, 0 already done, 3 rows" in results[winner].stderr
    other = results[1 - winner]
    if other.returncode == 0:  # it started after the winner had finished: nothing left to do
        assert "0 generated, 3 already done" in other.stderr, other.stderr
    else:  # they overlapped: refused, naming the winner
        assert_user_error(other, f"is in use by pid {procs[winner].pid} ")
    entries = manifest(out)
    assert len(entries) == 3 and len({e["file"] for e in entries}) == 3
    assert sorted(os.listdir(out)) == sorted([e["file"] for e in entries] + ["manifest.jsonl", "sd-jax-batch.json"])

    before = snapshot(out)
    changed = ["batch", tmp_path / "p.txt", "--out", out, *FLAGS, "--steps", 3]
    assert_user_error(run_cli(*changed), "holds the images of another job (--steps 2 -> 3)", "--replace")
    assert snapshot(out) == before
    p = ok(run_cli(*changed, "--replace"))
    assert "3 generated, 0 already done" in p.stderr
    assert {e["steps"] for e in manifest(out)} == {3} and len(manifest(out)) == 3
    assert all((out / f).read_bytes() != b for f, b in before.items() if f.endswith(".png"))


def test_a_folder_in_use_is_refused_naming_the_pid(tmp_path):
    """Deterministic half of the two-jobs test: while a job holds the folder's lock (here this
    test process, through the same lock a running job takes), ``sd-jax batch`` refuses it in one
    line naming that pid, and writes nothing."""
    (tmp_path / "p.txt").write_text(PROMPTS)
    out = tmp_path / "out"
    out.mkdir()
    with batch.FolderLock(str(out)):
        before = sorted(os.listdir(out))
        assert_user_error(run_cli("batch", tmp_path / "p.txt", "--out", out, *FLAGS, "--steps", 2),
                          f"is in use by pid {os.getpid()} ")
        assert sorted(os.listdir(out)) == before
    ok(run_cli("batch", tmp_path / "p.txt", "--out", out, *FLAGS, "--steps", 2))  # free again
    assert len(manifest(out)) == 3
