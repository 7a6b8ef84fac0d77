"""The one place that knows about devices: a data-parallel mesh over every device.

pmap semantics, written with ``jax.sharding``: parameters are replicated, the batch
is split along the mesh axis ``"data"``.  In a multi-host job (after
:func:`initialize_distributed`) ``jax.devices()`` lists every host's devices, and each
process supplies only the shards that live on its own devices, so the same code runs
on one CPU, eight GPUs or a TPU pod.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import re

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


# --------------------------------------------------------------------------- kernels XLA cannot partition

_TRACE_MESH: contextvars.ContextVar = contextvars.ContextVar("sd_jax_trace_mesh", default=None)


@contextlib.contextmanager
def tracing_for(mesh):
    """Trace model code for ``mesh``: what runs inside maps the kernels XLA's partitioner cannot
    split (Pallas / Mosaic TPU kernels) over the mesh's devices (:func:`map_over_batch`).  The
    pipelines and the trainer trace under it; JAX's own ``jax.set_mesh`` context works too."""
    token = _TRACE_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _TRACE_MESH.reset(token)


def trace_mesh():
    """The mesh being traced for (:func:`tracing_for`, else ``jax.set_mesh``'s), or None."""
    mesh = _TRACE_MESH.get()
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh = None if mesh.empty else mesh
    return mesh


def target_platform() -> str:
    """The platform traced for: the :func:`tracing_for` mesh's devices' (``"tpu"`` when compiling
    ahead of time for TPU devices from a CPU host), else JAX's default backend."""
    mesh = _TRACE_MESH.get()
    if mesh is not None and isinstance(mesh, Mesh):
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def map_over_batch(fn, *args):
    """``fn(*args)``, run per device on each device's rows when traced for a mesh of several
    devices (a Mosaic kernel inside a multi-device ``jit`` must be, or XLA refuses it: "Mosaic
    kernels cannot be automatically partitioned").  The arrays' first axis is split over
    every mesh axis when it divides evenly; otherwise each device computes the whole batch."""
    mesh = trace_mesh()
    if mesh is None or mesh.size == 1:
        return fn(*args)
    spec = P(tuple(mesh.axis_names)) if args[0].shape[0] % mesh.size == 0 else P()
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


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


# --------------------------------------------------------------------------- parameter sharding (FSDP)
#
# Fully-sharded data parallelism, as big_vision does it: name rules map each leaf of the
# training state (parameters, optimizer moments, EMA) to a PartitionSpec over the same
# "data" axis the batch is split over.  Each device then holds 1/N of the state; XLA
# all-gathers a weight where it is used and reduce-scatters its gradient.

# (regex over the leaf path, rule) pairs, first match wins; a rule is "fsdp" (split the
# largest dimension that divides by the device count) or "replicate".
FSDP_RULES: tuple[tuple[str, str], ...] = ((r".*", "fsdp"),)

# Leaves with fewer elements stay replicated: biases, norms and scalars cost little memory,
# and gathering them costs a collective each.
MIN_SHARD_SIZE = 2 ** 12


def leaf_path(path) -> str:
    """A key path of ``jax.tree_util`` as ``"params/unet/conv_in/kernel"``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def fsdp_spec(shape, n: int, min_size: int = MIN_SHARD_SIZE) -> P:
    """The PartitionSpec that splits the largest dimension of ``shape`` divisible by ``n``
    over :data:`AXIS` (the last such on ties: a kernel's output channels), or ``P()``
    (replicated) when none divides or the leaf is smaller than ``min_size`` elements."""
    if n <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for i in sorted(range(len(shape)), key=lambda i: (shape[i], i), reverse=True):
        if shape[i] % n == 0:
            return P(*([None] * i + [AXIS]))
    return P()


@dataclasses.dataclass(frozen=True)
class ParamRules:
    """How to lay a state tree out over ``mesh`` by name: ``rules`` (see :data:`FSDP_RULES`)
    applied to each leaf's path.  Hashable, so a jitted step can take it as a static
    argument; :func:`shardings_for` turns it into a tree of ``NamedSharding``."""
    mesh: Mesh
    rules: tuple[tuple[str, str], ...] = FSDP_RULES
    min_size: int = MIN_SHARD_SIZE

    def __post_init__(self):
        for pattern, rule in self.rules:
            re.compile(pattern)
            if rule not in ("fsdp", "replicate"):
                raise ValueError(f"unknown sharding rule {rule!r} for {pattern!r}; use fsdp or replicate")

    def spec(self, path: str, shape) -> P:
        for pattern, rule in self.rules:
            if re.fullmatch(pattern, path):
                return fsdp_spec(shape, self.mesh.devices.size, self.min_size) if rule == "fsdp" else P()
        return P()


def shardings_for(tree, layout):
    """A ``NamedSharding`` per leaf of ``tree`` (arrays or ``ShapeDtypeStruct``): ``layout``
    is one sharding for every leaf (e.g. :func:`replicated`) or a :class:`ParamRules`."""
    if not isinstance(layout, ParamRules):
        return jax.tree.map(lambda _: layout, tree)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(layout.mesh, layout.spec(leaf_path(p), np.shape(x))), tree)


def place(tree, shardings):
    """Put every leaf of ``tree`` (host or device arrays) on the mesh as ``shardings`` (a tree
    like it) says; each device receives only its own shard."""
    return jax.tree.map(_put, tree, shardings)


def sharded_fraction(tree) -> float:
    """Bytes held per device over the bytes of the whole ``tree`` of jax arrays (1.0 when replicated)."""
    total = sum(x.nbytes for x in jax.tree.leaves(tree))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))
    return per_device / max(total, 1)
