"""Test-wide setup: offline hub, 8 fake CPU devices for the sharding tests, float32 matmuls."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Must be set before jax is imported anywhere: the sharding tests need 8 devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

# Parity tests compare against float32 PyTorch; make sure no matmul runs at reduced precision.
jax.config.update("jax_default_matmul_precision", "highest")
