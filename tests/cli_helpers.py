"""Running ``sd-jax`` as a user would (a subprocess), and checking how it ended."""
import os
import shutil
import subprocess
import sys


def sd_jax_command() -> list[str]:
    exe = shutil.which("sd-jax")
    return [exe] if exe else [sys.executable, "-m", "sd_jax.cli"]


def cli_env(devices: int = 1, extra: dict | None = None) -> dict:
    """The test process's environment, offline, with ``devices`` fake CPU devices."""
    e = {k: v for k, v in os.environ.items() if k not in ("SD_JAX_MODEL", "SD_JAX_DEBUG")}
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             # LLVM -O0: halves XLA:CPU compile time here; same arithmetic (no fast-math either way)
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    e.update(extra or {})
    return e


def run_cli(*args, devices: int = 1, env: dict | None = None, timeout: int = 400, cwd=None):
    return subprocess.run(sd_jax_command() + [str(a) for a in args], capture_output=True, text=True,
                          env=cli_env(devices, env), timeout=timeout, cwd=cwd)


def ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}"
    assert "Traceback" not in p.stderr
    return p


def assert_user_error(p, *fragments):
    """Non-zero exit, exactly one line on stderr, ``sd-jax: error: ...``, no traceback."""
    assert p.returncode != 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sd-jax: error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]
