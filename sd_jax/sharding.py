"""The one place that knows about devices: a data-parallel mesh over every device.

pmap semantics, written with ``jax.sharding``: parameters are replicated, the batch
is split along the mesh axis ``"data"``.  In a multi-host job (after
:func:`initialize_distributed`) ``jax.devices()`` lists every host's devices, and each
process supplies only the shards that live on its own devices, so the same code runs
on one CPU, eight GPUs or a TPU pod.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-host job (no-op for one process).

    On TPU pods and SLURM/GKE clusters ``jax.distributed.initialize()`` finds its
    arguments itself; elsewhere pass them, or set ``SD_JAX_COORDINATOR``,
    ``SD_JAX_NUM_PROCESSES`` and ``SD_JAX_PROCESS_ID``.  CPU processes exchange data
    through gloo.
    """
    coordinator_address = coordinator_address or os.environ.get("SD_JAX_COORDINATOR")
    if num_processes is None and "SD_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["SD_JAX_NUM_PROCESSES"])
    if process_id is None and "SD_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["SD_JAX_PROCESS_ID"])
    if num_processes == 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: every device of every host)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def _put(x, sharding):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    # make_array_from_callback works on one host and on many: each process fills only
    # the shards of its own devices from the (identical) global value it holds.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` on every device of ``mesh``."""
    s = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: _put(x, s), tree)


def shard_batch(tree, mesh: Mesh):
    """Split the leading (batch) axis of every leaf over the mesh.

    Every process passes the same global batch; the leading size must divide by the
    device count (see :func:`pad_batch`).
    """
    s = batch_sharded(mesh)
    return jax.tree_util.tree_map(lambda x: _put(x, s), tree)


def padded_size(n: int, mesh: Mesh) -> int:
    d = mesh.devices.size
    return -(-n // d) * d


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to ``size`` by repeating the last row (dropped afterwards)."""
    x = np.asarray(x)
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)], axis=0)


def to_host(x) -> np.ndarray:
    """The whole (global) array on this host, gathering across processes if needed."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a batch-sharded array that live on this host: (row indices, data)."""
    idx, data = [], []
    seen = set()
    for shard in x.addressable_shards:
        sl = shard.index[0]
        start = sl.start or 0
        if start in seen:  # replicated copies of the same rows
            continue
        seen.add(start)
        rows = np.asarray(shard.data)
        idx.append(np.arange(start, start + rows.shape[0]))
        data.append(rows)
    order = np.argsort(np.concatenate(idx))
    return np.concatenate(idx)[order], np.concatenate(data)[order]
