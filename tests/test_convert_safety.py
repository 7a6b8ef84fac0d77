"""``sd-jax convert`` never deletes a path it did not create: ``--overwrite`` replaces only a
DEST that is itself a model; an interrupted conversion leaves no staging folder behind, and
the staging folders of killed conversions are removed by the next one (issue 10, items 1, 5)."""
import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import assert_user_error, cli_env, ok, run_cli, sd_jax_command
from sd_jax.weights import checkpoint

MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", "sd-jax-shapes")


def snapshot(folder):
    """Every path under ``folder`` with its file contents (None for folders)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out


@pytest.fixture
def workdir(tmp_path):
    """A working folder with a source model, a sibling file of the user's and a folder of theirs."""
    shutil.copytree(MODEL, tmp_path / "par" / "model")
    (tmp_path / "par" / "sibling.txt").write_text("mine")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("my notes")
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "home").mkdir()
    return tmp_path


@pytest.mark.parametrize("dest, fragments", [
    ("par", ["holds the source model"]),                  # SRC inside DEST
    ("par/model", ["is the source model"]),               # DEST is SRC
    (".", ["holds the source model"]),                    # the working directory (holding SRC)
    ("user", ["not a model", "new or empty folder"]),     # a folder of the user's files
    ("file.txt", ["is a file"]),
    ("home", ["home folder"]),                            # $HOME
])
def test_overwrite_never_deletes_what_it_did_not_create(workdir, dest, fragments):
    before = snapshot(workdir)
    p = run_cli("convert", "par/model", dest, "--overwrite", cwd=workdir, env={"HOME": str(workdir / "home")})
    assert_user_error(p, *fragments)
    assert snapshot(workdir) == before


def test_overwrite_refuses_the_working_directory_without_the_source(workdir):
    """DEST = the working directory, SRC elsewhere: refused, and the folder's files are kept."""
    before = snapshot(workdir / "user")
    p = run_cli("convert", MODEL, ".", "--overwrite", cwd=workdir / "user")
    assert_user_error(p, "working directory")
    assert snapshot(workdir / "user") == before


def test_overwrite_refuses_a_folder_above_the_working_directory(workdir):
    p = run_cli("convert", MODEL, workdir, "--overwrite", cwd=workdir / "user")
    assert_user_error(p, "above the working directory")
    assert (workdir / "user" / "notes.txt").read_text() == "my notes"


def test_root_and_home_are_never_destinations(tmp_path, monkeypatch):
    """Checked without running a conversion: nothing may ever be written over these."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for dest, what in (("/", "filesystem root"), (str(tmp_path), "home folder"), (str(tmp_path.parent), "above")):
        with pytest.raises(checkpoint.CheckpointError, match=what):
            checkpoint.check_destination(dest)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staging_folders_are_removed_and_live_ones_kept(workdir):
    """A conversion to DEST removes ``.DEST.tmp-PID`` folders of conversions whose process is gone
    (and those of sd-jax 0.1.0, without pid), keeps a running one's and anything else."""
    stale, live = workdir / f".out.tmp-{dead_pid()}", workdir / f".out.tmp-{os.getpid()}"
    legacy, other = workdir / ".out.tmp-ab12_xyz", workdir / f".out.tmp-{dead_pid()}-mine"
    for folder, inner in ((stale, "model"), (live, "model"), (legacy, "old"), (other, "model")):
        (folder / inner).mkdir(parents=True)
        (folder / inner / "weights.bin").write_bytes(b"x" * 100)
    ok(run_cli("convert", "par/model", "out", "--to", "diffusers", cwd=workdir))
    assert checkpoint.model_kind(str(workdir / "out")) == "diffusers"
    assert not stale.exists() and not legacy.exists()
    assert live.exists() and other.exists()
    # --overwrite replaces a model: the diffusers folder becomes an sd-jax checkpoint.
    ok(run_cli("convert", "par/model", "out", "--overwrite", cwd=workdir))
    assert checkpoint.model_kind(str(workdir / "out")) == "sd-jax"
    assert sorted(glob.glob(str(workdir / ".out.tmp-*"))) == sorted([str(live), str(other)])
    assert (workdir / "par" / "sibling.txt").read_text() == "mine"


# `sd-jax convert` with one step of its save slowed down and announced (a marker file), so the
# interrupt lands while DEST is being written on a loaded machine too (polling for the staging
# folder raced a fast save).
PAUSED_CONVERT = """
import os, signal, sys, time
# Ctrl-C as in a terminal's foreground: a test worker's child may inherit SIGINT ignored
# (an ignored signal survives exec), and then Python never installs its handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
import orbax.checkpoint as ocp
from sd_jax.weights import checkpoint
where, marker = sys.argv[1], sys.argv[2]

def paused(real, seconds):
    def run(*a, **k):
        open(marker, "w").close()
        for _ in range(seconds * 100):   # short sleeps: a signal that lands on another thread
            time.sleep(0.01)             # (JAX's, orbax's) is still seen by the main one at once
        return real(*a, **k)
    return run

if where == "tokenizers":   # before the weights: the interrupt ends the save at once
    checkpoint.save_tokenizer = paused(checkpoint.save_tokenizer, 300)
else:                       # orbax writing the weights: the interrupt is held until it is done
    ocp.StandardCheckpointer.save = paused(ocp.StandardCheckpointer.save, 3)
from sd_jax.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sig, where", [(signal.SIGINT, "tokenizers"), (signal.SIGTERM, "weights")])
def test_interrupted_convert_leaves_nothing(workdir, sig, where):
    """Ctrl-C (or a kill) while DEST is being written: exit 130, one line, no DEST, no staging folder."""
    marker = workdir / "paused"
    p = subprocess.Popen([sys.executable, "-c", PAUSED_CONVERT, where, str(marker), "convert", "par/model", "out"],
                         cwd=workdir, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert marker.exists() and glob.glob(str(workdir / ".out.tmp-*")), p.communicate()[1]
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.strip() == "sd-jax: interrupted", err
    assert not (workdir / "out").exists()
    assert not glob.glob(str(workdir / ".out.tmp-*"))


def test_writing_model_keeps_dest_when_the_save_fails(tmp_path):
    """The library's saves: a failure inside the block leaves DEST (an earlier model) as it was."""
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "model_index.json").write_text("{}")
    with pytest.raises(RuntimeError):
        with checkpoint.writing_model(str(dest)) as staged:
            with open(os.path.join(staged, "model_index.json"), "w") as f:
                f.write("half")
            raise RuntimeError("disk full")
    assert (dest / "model_index.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["m"]
    with checkpoint.writing_model(str(dest)) as staged:
        with open(os.path.join(staged, "model_index.json"), "w") as f:
            f.write("new")
    assert (dest / "model_index.json").read_text() == "new" and os.listdir(tmp_path) == ["m"]
