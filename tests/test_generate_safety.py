"""``sd-jax generate`` on bad or huge input: sizes that cannot fit are refused before compiling,
``--num`` runs in batches whose memory does not grow with N, Ctrl-C stops at a batch boundary,
non-finite numbers are refused, and inputs that are ignored or resized are warned about.

CLI tests use the shipped model (checkpoints/sd-jax-shapes) at 64x64 with one step.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_user_error, cli_env, ok, run_cli, sd_jax_command
from sd_jax import memory
from sd_jax.models.unet import UNetConfig
from sd_jax.models.vae import VAEConfig

SHIPPED = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "sd-jax-shapes")
FAST = ("--size", "64x64", "--steps", 1)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line]


# ----------------------------------------------------------------------------- the estimate
def test_estimate_counts_the_largest_activations():
    """SD 1.5 at 512x512: the UNet's 4096-token self-attention with 8 heads over the doubled
    (guidance) batch dominates with plain XLA attention; CPU blocks, chunks and cuDNN remove it."""
    unet, vae = UNetConfig.sd15(), VAEConfig.sd15()
    e = memory.estimate(unet, vae, batch=1, height=512, width=512)
    tokens = (512 // 8) ** 2
    assert e.terms["UNet self-attention scores"] == 2 * 8 * tokens ** 2 * (4 + 4)
    assert e.terms["VAE decoder at full resolution"] == 512 * 512 * (2 * 256 + 2 * 128) * 4
    assert e.total >= e.terms["UNet self-attention scores"] and "self-attention" in e.describe()
    e4 = memory.estimate(unet, vae, batch=4, height=512, width=512)
    assert e4.terms["UNet self-attention scores"] == 4 * e.terms["UNet self-attention scores"]
    bf16 = memory.estimate(unet, vae, batch=1, height=512, width=512, dtype_bytes=2)
    assert bf16.total < e.total
    for lowering in ("blocked", "chunked", "cudnn"):
        low = memory.estimate(unet, vae, batch=1, height=512, width=512, unet_attention=lowering)
        assert low.terms["UNet self-attention scores"] < e.terms["UNet self-attention scores"] / 8
    # Scores grow with the square of the pixel count: 4x the side, 256x the scores.
    big = memory.estimate(unet, vae, batch=1, height=2048, width=2048)
    assert big.terms["UNet self-attention scores"] == 256 * e.terms["UNet self-attention scores"]


def test_python_api_refuses_what_cannot_fit_and_non_finite_numbers():
    """The pipeline's own checks (so the Python API, generate and batch all get them), before
    anything compiles; ``pipe.memory_check = False`` skips the estimate but not the side cap."""
    import jax

    from sd_jax.pipeline import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED, mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]),
                                                                                 ("data",)))
    pipe._fn = lambda *a, **k: pytest.fail("compiled before checking the request")
    with pytest.raises(ValueError, match=r"need an estimated .* is available .*--no-memory-check"):
        pipe.generate_async(["x"] * 64, height=16384, width=16384, num_inference_steps=1)
    with pytest.raises(ValueError, match="sides above 16384"):
        pipe.generate_async("x", height=100000, width=100000, num_inference_steps=1)
    for kw, name in (({"guidance_scale": float("nan")}, "guidance_scale"),
                     ({"guidance_scale": float("inf")}, "guidance_scale"),
                     ({"guidance_rescale": float("nan")}, "guidance_rescale"),
                     ({"guidance_rescale": 1.5}, "guidance_rescale")):
        with pytest.raises(ValueError, match=name):
            pipe.generate_async("x", height=64, width=64, num_inference_steps=1, **kw)
    pipe.memory_check = False
    memory.check_generation(pipe, 64, 16384, 16384)  # skipped: the user takes the risk
    with pytest.raises(ValueError, match="sides above 16384"):
        memory.check_generation(pipe, 1, 8, 100000)


# ----------------------------------------------------------------------------- the command line
def test_sizes_that_cannot_fit_are_one_line_errors(tmp_path):
    """Item 6: these aborted in XLA (exit 134) or ran for minutes; now one line, fast, no files."""
    out = tmp_path / "out" / "x.png"
    t0 = time.perf_counter()
    for size in ("100000x100000", "1000000x8"):
        assert_user_error(run_cli("generate", "x", "--size", size, "-o", out), size, "16384")
    line = assert_user_error(run_cli("generate", "x", "--size", "16384x16384", "--num", 8, "--batch-size", 8,
                                     "--steps", 1, "-o", out))
    for fragment in ("16384x16384", "estimated", "available", "UNet", "--no-memory-check"):
        assert fragment in line, line
    assert time.perf_counter() - t0 < 90 and not (tmp_path / "out").exists()

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "size": "100000x100000"}) + "\n")
    assert_user_error(run_cli("batch", prompts, "--out", tmp_path / "b1"), "line 2", "16384")
    prompts.write_text(json.dumps({"prompt": "a", "size": "64x64"}) + "\n"
                       + json.dumps({"prompt": "b", "size": "16384x16384"}) + "\n")
    assert_user_error(run_cli("batch", prompts, "--out", tmp_path / "b2", "--batch-size", 8, "--steps", 1),
                      "line 2", "estimated", "--no-memory-check")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()  # no empty manifest left


def test_non_finite_numbers_are_refused(tmp_path):
    """Item 11: NaN/inf guidance or rescale gave an all-black PNG and exit 0."""
    out = tmp_path / "x.png"
    for flag, value in (("--guidance", "nan"), ("--guidance", "inf"), ("--rescale", "nan"), ("--rescale", "1.5")):
        assert_user_error(run_cli("generate", "x", flag, value, *FAST, "-o", out), flag)
    assert_user_error(run_cli("generate", "x", "--init-image", SHIPPED, "-o", out), "--init-image", "is a folder")
    init = tmp_path / "init.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(init)
    assert_user_error(run_cli("generate", "x", "--init-image", init, "--strength", "nan", "-o", out), "--strength")
    assert not out.exists()


def test_ignored_and_resized_inputs_are_warned_about(tmp_path):
    """Item 14: --strength without --init-image, and init images or masks of another size than
    the output were accepted silently."""
    p = ok(run_cli("generate", "x", *FAST, "--strength", 0.5, "--no-progress", "-o", tmp_path / "a.png"))
    (w,) = warnings_in(p.stderr)
    assert w.startswith("sd-jax: warning: --strength") and "--init-image" in w
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    Image.fromarray(np.full((48, 40, 3), 128, np.uint8)).save(init)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask)
    p = ok(run_cli("generate", "x", "--size", "64x64", "--steps", 2, "--init-image", init, "--mask", mask, "--no-progress",
                   "-o", tmp_path / "b.png"))
    w = warnings_in(p.stderr)
    assert len(w) == 2 and all(line.startswith("sd-jax: warning: ") for line in w), p.stderr
    assert "--init-image" in w[0] and "40x48" in w[0] and "64x64" in w[0]
    assert "--mask" in w[1] and "32x32" in w[1] and "64x64" in w[1]
    assert Image.open(tmp_path / "b.png").size == (64, 64)


def _peak_rss_kib(num: int, out) -> tuple[int, subprocess.Popen]:
    """Start ``generate --num`` in a child that reports its own peak RSS (KiB) on exit."""
    code = ("import resource, sys; from sd_jax import cli; rc = cli.main(sys.argv[1:]); "
            "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    return subprocess.Popen([sys.executable, "-c", code, "generate", "a red circle", *map(str, FAST), "--num",
                             str(num), "--no-progress", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(1))


def test_memory_does_not_grow_with_num(tmp_path):
    """Item 7: ``--num 2500`` held every image of one huge batch (12 GB at 64x64).  Now batches
    of one image per device are written as they arrive: peak RSS at --num 150 is that of --num 10
    (the old code: 0.6 GB more)."""
    small, large = _peak_rss_kib(10, tmp_path / "s" / "x.png"), _peak_rss_kib(150, tmp_path / "l" / "x.png")
    peaks = {}
    for name, proc in (("small", small), ("large", large)):
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
        peaks[name] = int(stderr.split("MAXRSS")[-1].split()[0])
    assert len(os.listdir(tmp_path / "l")) == 150 and (tmp_path / "l" / "x-149.png").is_file()
    assert peaks["large"] <= peaks["small"] * 1.1 + 40 * 1024, peaks


def test_ctrl_c_stops_at_a_batch_boundary(tmp_path):
    """Item 15: Ctrl-C reacted only when the whole --num batch was done.  Now the next batch
    boundary: exit 130, one line, the images already written complete and kept."""
    out = tmp_path / "o"
    proc = subprocess.Popen([*sd_jax_command(), "generate", "x", *map(str, FAST),
                             "--num", "400", "--no-progress", "-o", str(out / "x.png")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(1))
    first = proc.stdout.readline()  # the first image is written
    assert first.strip().endswith("x-0.png"), proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    t0 = time.perf_counter()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.perf_counter() - t0 < 20, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sd-jax: interrupted"), stderr
    written = [first.strip()] + stdout.split()
    files = sorted(os.listdir(out))
    assert 1 <= len(files) < 400 and sorted(os.path.basename(p) for p in written) == files  # no temporary files
    for name in files:
        with Image.open(out / name) as im:
            im.load()


def test_memory_available_reads_the_device_limit_else_the_host():
    """GPU/TPU: ``memory_stats()['bytes_limit']`` less what is in use (the weights); CPU (no
    statistics): the host's available memory."""
    class Device:
        platform = "gpu"

        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    limit, source, host = memory.available(Device({"bytes_limit": 80 << 30, "bytes_in_use": 2 << 30}))
    assert limit == 78 << 30 and "bytes_limit" in source and not host
    limit, source, host = memory.available(Device(None))
    assert host and 0 < limit and ("MemAvailable" in source or "sysconf" in source or "cgroup" in source)
