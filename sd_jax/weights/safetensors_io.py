"""Read and write ``.safetensors`` files as numpy arrays, bfloat16 included.

``safetensors.numpy`` cannot represent bfloat16 (numpy has no such dtype), and real
checkpoints ship bf16/fp16 files, so we read the (very simple) format ourselves with
``ml_dtypes``: an 8-byte little-endian header length, a JSON header, then raw data.
Arrays are memory-mapped, so opening a 4 GB checkpoint costs nothing until used.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
    """A weights file or folder that cannot be used; the message says why and what to do."""


def read_header(path: str) -> dict:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-export it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header says {n} bytes, file has {size}); re-download or re-export it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header; re-download or re-export it") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file ({size} bytes, needs {8 + n + end}); re-download or re-export it")
    header["__data_start__"] = 8 + n
    return header


def load_file(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, as (read-only, memory-mapped) numpy arrays."""
    header = read_header(path)
    start = header.pop("__data_start__")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        dt = info["dtype"]
        if dt not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        a, b = info["data_offsets"]
        out[name] = mm[start + a:start + b].view(_DTYPES[dt]).reshape(info["shape"])
    return out


def save_file(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """Write tensors atomically (temporary file, then rename)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        if arr.dtype not in _NAMES:
            raise CheckpointError(f"cannot save {name!r}: unsupported dtype {arr.dtype}")
        nbytes = arr.nbytes
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)
