"""``sd-jax train`` and users' data (issue 10): a folder that is not a run is not written into,
bad images are found when the data set is opened, Ctrl-C stops cleanly with a whole
checkpoint, and the next run removes what an interrupted one left; ``train --help`` lists
the recipes; no matplotlib is said once."""
import io
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_user_error, cli_env, ok, run_cli, sd_jax_command
from sd_jax.train import data as data_lib
from sd_jax.train import loop
from sd_jax.train.cli import RECIPE_HELP

# The smallest VAE run the command line can ask for (compiles in seconds).
TINY_VAE = ["--widths", "16,32", "--groups", "8", "--size", "16", "--batch-size", "2", "--keep", "2", "--no-progress"]


def image_folder(folder, bad=True):
    """Three good PNGs with captions, and (``bad``) a JPEG cut in half."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"image {i}")
    if bad:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
        (folder / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
        (folder / "cut.txt").write_text("a cut image")
    return folder


def test_train_help_lists_the_recipes():
    p = ok(run_cli("train", "--help"))
    for name, what in RECIPE_HELP.items():
        assert any(line.split() == [name] + what.split() for line in p.stdout.splitlines()), (name, p.stdout)


@pytest.mark.parametrize("name, content", [("loss.jsonl", '{"my": "measurements"}\n'),
                                           ("run.json", '{"experiment": 7}\n')])
def test_a_folder_with_files_of_the_users_is_refused(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    p = run_cli("train", "vae", "--out", tmp_path, "--steps", "2", *TINY_VAE)
    assert_user_error(p, name, "another --out")
    assert (tmp_path / name).read_text() == content
    assert sorted(os.listdir(tmp_path)) == [name]


def test_bad_images_are_found_when_the_data_set_is_opened(tmp_path):
    folder = image_folder(tmp_path / "imgs")
    with pytest.raises(ValueError, match=r"cut\.jpg.*--skip-bad-images"):
        data_lib.ImageCaptionFolder(folder, 16)
    source = data_lib.ImageCaptionFolder(folder, 16, skip_bad=True)
    assert len(source) == 3 and [p.name for p, _ in source.skipped] == ["cut.jpg"]
    assert "skipped 1" in source.summary() and "cut.jpg" in source.summary()
    # Fast checks that still tell: a PNG cut short, a WebP cut short, a JPEG with data after its end.
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    for fmt, ext in (("PNG", "png"), ("WEBP", "webp"), ("JPEG", "jpg")):
        buf = io.BytesIO()
        image.save(buf, fmt)
        (tmp_path / f"whole.{ext}").write_bytes(buf.getvalue() + (b"trailer" * 1000 if fmt == "JPEG" else b""))
        (tmp_path / f"cut.{ext}").write_bytes(buf.getvalue()[:len(buf.getvalue()) * 2 // 3])
        assert data_lib.image_problem(tmp_path / f"whole.{ext}") is None
        assert data_lib.image_problem(tmp_path / f"cut.{ext}") is not None, fmt


def test_a_bad_image_is_one_line_naming_it(tmp_path):
    p = run_cli("train", "vae", "--out", tmp_path / "run", "--data", image_folder(tmp_path / "imgs"),
                "--steps", "2", *TINY_VAE)
    assert_user_error(p, "cut.jpg", "--skip-bad-images")


def test_tidy_checkpoints(tmp_path):
    """What an interrupted run leaves: orbax's temporary folders, checkpoints beyond --keep."""
    for name in ("3", "5", "9", "12", "12.orbax-checkpoint-tmp-1732", "13.orbax-checkpoint-tmp"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    removed = loop.tidy_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["12", "9", "notes.txt"]
    assert len(removed) == 4


def test_the_matplotlib_notice_is_said_once(monkeypatch, capsys):
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(loop, "_MATPLOTLIB_NOTICE", [])
    loop._check_matplotlib()
    loop._check_matplotlib()
    err = capsys.readouterr().err
    assert err.count("matplotlib") == 1 and "sd-jax[train]" in err


def test_ctrl_c_saves_once_cleanly_and_the_next_run_tidies_up(tmp_path):
    """A real Ctrl-C while a run saves a checkpoint every step (the bad image skipped): exit 130,
    one line saying which step was saved, a whole checkpoint, nothing of orbax's on the screen.
    Then the same command (fewer saves) resumes from it, removes an orbax temporary folder and
    an extra checkpoint left behind, and shows no warning."""
    out, imgs = tmp_path / "run", image_folder(tmp_path / "imgs")
    argv = ["train", "vae", "--out", str(out), "--data", str(imgs), "--skip-bad-images", "--steps", "300", *TINY_VAE]
    p = subprocess.Popen(sd_jax_command() + argv + ["--save-every", "1"], env=cli_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log, deadline = out / "loss.jsonl", time.time() + 400
    while p.poll() is None and time.time() < deadline:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "orbax" not in err.lower() and len(lines) == 3, err
    assert "skipped 1" in lines[1] and "cut.jpg" in lines[1]
    assert lines[2].startswith("interrupted: saved step ") and lines[2].endswith("run the same command again to resume")
    saved = int(lines[2].split("saved step ")[1].split(";")[0])
    steps = sorted(os.listdir(out / "checkpoints"), key=int)  # only finished checkpoints: all names are steps
    assert steps[-1] == str(saved) and len(steps) <= 2
    assert json.loads(log.read_text().splitlines()[-1])["step"] >= saved

    shutil.copytree(out / "checkpoints" / str(saved), out / "checkpoints" / "1")  # one more than --keep
    (out / "checkpoints" / "300.orbax-checkpoint-tmp").mkdir()  # a save cut by a kill
    p = ok(run_cli(*argv, "--save-every", "1000"))
    assert f"resuming at step {saved} of 300" in p.stderr
    assert "WARNING" not in p.stderr and "absl" not in p.stderr, p.stderr
    assert sorted(os.listdir(out / "checkpoints"), key=int) == [str(saved), "300"]
    assert "300 steps" in p.stdout and (out / "vae" / "config.json").is_file()
