"""Test-wide setup: offline hub, 8 fake CPU devices for the sharding tests, float32 matmuls."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Must be set before jax is imported anywhere: the sharding tests need 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare against float32 PyTorch; make sure no matmul runs at reduced precision.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def fast_train_compile():
    """Compile the train steps of the tiny test models without LLVM optimisations (~2.5x
    faster; same arithmetic). Modules that train use it: ``pytest.mark.usefixtures``."""
    from sd_jax.train import loop
    saved = dict(loop.COMPILER_OPTIONS)
    if jax.default_backend() == "cpu":
        loop.COMPILER_OPTIONS["xla_backend_optimization_level"] = 0
    yield
    loop.COMPILER_OPTIONS.clear()
    loop.COMPILER_OPTIONS.update(saved)
