"""Will a generation fit?  An estimate of its peak activation memory, checked before compiling.

A size far too large for the memory (``--size 100000x100000``) otherwise aborts the process
inside XLA or runs for minutes before failing.  :func:`estimate` is a pure function of the
model configs and the request's shape; :func:`check_generation` compares it with the memory
the backend reports and raises a ``ValueError`` that says how the numbers were computed.

The estimate counts the largest terms, per device (each device runs ``batch / devices``):

* the UNet (classifier-free guidance doubles its batch): the self-attention score matrix
  of the highest-resolution attention level, ``2B x heads x (h w)^2`` float32 scores plus
  their softmax in the compute dtype, when the implementation materialises it (plain XLA on
  GPU/TPU; CPU blocks and chunked attention hold one block, cuDNN none); every skip
  activation kept for the up path; and the transformer's feed-forward (GEGLU, 8x width) at
  the largest attention level;
* the VAE decoder: its mid-block attention (one head over ``h w`` latent tokens) and its
  full-resolution activations ``B x (2 C_in + 2 C) x H x W``.

The UNet and the VAE run one after the other, so the peak is the larger of the two.  Weights
are not counted: they are already loaded, and the limit is what is left beside them.
"""
from __future__ import annotations

import dataclasses
import math
import os

# Sides beyond this are refused outright (even with the check off): XLA counts elements of a
# buffer in 32 bits in places, and an image this large does not fit on any device anyway.
MAX_SIDE = 16384
OVERRIDE = "pass --no-memory-check (Python: pipe.memory_check = False) to try anyway"
_CPU_BLOCK_BYTES = 8 << 20  # as sd_jax.models.attention: float32 scores per CPU block
_CHUNK = 1024               # query rows per chunk of attention="chunked"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


def check_side(width: int, height: int) -> None:
    """A ValueError for a side above :data:`MAX_SIDE`."""
    if max(width, height) > MAX_SIDE:
        raise ValueError(f"size {width}x{height}: sides above {MAX_SIDE} px are not supported "
                         f"(far beyond any device's memory)")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Peak activation bytes per device, and the terms it was made of (name -> bytes)."""
    total: int
    terms: dict

    def describe(self) -> str:
        top = sorted(self.terms.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{name} {human(b)}" for name, b in top)


def score_bytes(lowering: str, batch_heads: int, lq: int, lk: int, dtype_bytes: int) -> int:
    """Bytes of attention scores alive at once for ``batch_heads`` (batch x heads) problems.

    ``lowering``: ``"xla"`` (the full [B, H, Lq, Lk] float32 scores plus their softmax in the
    compute dtype), ``"blocked"`` (XLA on CPU: one block of rows at a time), ``"chunked"``
    (1024 query rows at a time), ``"pallas"`` / ``"flash"`` (the TPU flash kernels: one block) or ``"cudnn"``
    (fused flash attention: no score matrix).
    """
    if lowering == "cudnn":
        return 0
    if lowering in ("pallas", "flash"):  # flash attention: one float32 block of scores and its exp
        return 512 * 512 * 4 * 2
    if lowering == "blocked":
        rows = max(16, _CPU_BLOCK_BYTES // (4 * lk))
        rows = 1 << (rows.bit_length() - 1)
        return min(rows, lq) * lk * 4 * 2
    if lowering == "chunked":
        return min(_CHUNK, lq) * lk * 4 * 2
    return batch_heads * lq * lk * (4 + dtype_bytes)


def estimate(unet, vae, *, batch: int, height: int, width: int, dtype_bytes: int = 4,
             unet_attention: str = "xla", vae_attention: str = "xla", guidance: bool = True,
             vae_tile: int | None = None) -> Estimate:
    """Peak activation bytes of generating ``batch`` images of ``width x height`` on one device.

    ``unet``, ``vae``: :class:`~sd_jax.models.unet.UNetConfig`, :class:`~sd_jax.models.vae.VAEConfig`
    (any objects with their fields).  ``*_attention``: the lowering that runs (see :func:`score_bytes`).
    ``vae_tile``: the VAE runs in tiles of this many latents (:mod:`sd_jax.models.vae_tiling`).
    """
    f = 2 ** (len(vae.block_out_channels) - 1)
    b2 = batch * (2 if guidance else 1)
    res = [(math.ceil(height / f), math.ceil(width / f))]
    n = len(unet.block_out_channels)
    for _ in range(n - 1):
        res.append((math.ceil(res[-1][0] / 2), math.ceil(res[-1][1] / 2)))
    tokens = [h * w for h, w in res]
    chans = unet.block_out_channels
    heads = unet.heads
    attn = {i for i, t in enumerate(unet.down_block_types) if "CrossAttn" in t}
    attn |= {n - 1 - i for i, t in enumerate(unet.up_block_types) if "CrossAttn" in t}
    if unet.mid_block_type is not None:
        attn.add(n - 1)
    layers = unet.layers
    # Skips: conv_in, each down resnet's output, each downsampler's output.
    skip_el = chans[0] * tokens[0] + sum(layers[i] * chans[i] * tokens[i] for i in range(n))
    skip_el += sum(chans[i] * tokens[i + 1] for i in range(n - 1))
    terms = {"UNet skip activations": b2 * skip_el * dtype_bytes}
    if attn:
        top = min(attn)  # the highest resolution with attention
        terms["UNet self-attention scores"] = max(
            score_bytes(unet_attention, b2 * heads[i], tokens[i], tokens[i], dtype_bytes) for i in attn)
        terms["UNet feed-forward"] = b2 * tokens[top] * chans[top] * 12 * dtype_bytes
    # Resnets at the top level: input, normalised input, two conv outputs (with the up path's concat).
    terms["UNet resnet activations"] = b2 * tokens[0] * chans[0] * 6 * dtype_bytes
    unet_total = sum(terms.values())

    if vae_tile is None:
        vae_terms = vae_decode_terms(vae, batch, height, width, dtype_bytes, vae_attention)
    else:  # one tile at a time, and the float32 image it is blended into
        th, tw = min(vae_tile * f, height), min(vae_tile * f, width)
        tile_terms = vae_decode_terms(vae, batch, th, tw, dtype_bytes, vae_attention)
        vae_terms = {"VAE decoder in tiles": max(tile_terms.values()) + batch * height * width * 3 * 4}
    terms.update(vae_terms)
    return Estimate(max(unet_total, max(vae_terms.values())), terms)


def vae_decode_terms(vae, batch: int, height: int, width: int, dtype_bytes: int = 4,
                     vae_attention: str = "xla") -> dict:
    """The untiled VAE decoder's largest terms (name -> bytes) for ``batch`` images of ``width x height``."""
    f = 2 ** (len(vae.block_out_channels) - 1)
    tokens = math.ceil(height / f) * math.ceil(width / f)
    vchans = tuple(vae.block_out_channels)[::-1]
    c_in = vchans[-2] if len(vchans) > 1 else vchans[-1]  # the upsampled tensor entering the last block
    terms = {"VAE decoder at full resolution": batch * height * width * (2 * c_in + 2 * vchans[-1]) * dtype_bytes}
    if getattr(vae, "mid_block_add_attention", True):
        terms["VAE attention scores"] = score_bytes(vae_attention, batch, tokens, tokens, dtype_bytes)
    return terms


VAE_TILING = ("auto", "on", "off")


def vae_tile(mode: str, vae, *, batch: int, height: int, width: int, dtype_bytes: int,
             available_bytes: int | None, vae_attention: str = "xla") -> int | None:
    """The tile side (latents) for the VAE to decode/encode ``batch`` images of ``width x height``
    on one device, or None for untiled.

    ``mode``: ``"on"``, ``"off"``, or ``"auto"``: tiled when the image is larger than one tile
    and the untiled decoder's estimated activations (:func:`vae_decode_terms`) exceed half of
    ``available_bytes`` (None: unknown, untiled).  The tile is diffusers' ``sample_size / f``.
    """
    if mode not in VAE_TILING:
        raise ValueError(f"VAE tiling {mode!r}: choose one of {', '.join(VAE_TILING)}")
    f = 2 ** (len(vae.block_out_channels) - 1)
    size = vae.sample_size[0] if isinstance(vae.sample_size, (list, tuple)) else vae.sample_size
    tile = max(1, int(size) // f)  # diffusers' tile_latent_min_size
    if mode == "off" or max(height, width) <= tile * f:
        return None
    if mode == "on":
        return tile
    need = max(vae_decode_terms(vae, batch, height, width, dtype_bytes, vae_attention).values())
    return tile if available_bytes is not None and need > available_bytes // 2 else None


# ----------------------------------------------------------------------------- what is available
def _host_available() -> tuple[int, str] | None:
    """Bytes of host memory available to this process (MemAvailable, capped by a cgroup limit)."""
    best = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    best = (int(line.split()[1]) * 1024, "host MemAvailable in /proc/meminfo")
    except OSError:
        pass
    if best is None:
        try:
            best = (os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host free memory (sysconf)")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit (cgroup v2)
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as fh:
                left = int(limit) - int(fh.read().strip())
            if left < best[0]:
                best = (left, "the cgroup's memory.max - memory.current")
    except (OSError, ValueError):
        pass
    return best


def available(device) -> tuple[int, str, bool] | None:
    """(bytes, where the number comes from, whether it is the host's) for ``device``; None if unknown."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        stats = None
    if stats and stats.get("bytes_limit"):
        used = stats.get("bytes_in_use", 0)
        return (stats["bytes_limit"] - used,
                f"{device.platform} memory_stats: bytes_limit {human(stats['bytes_limit'])} - "
                f"{human(used)} in use", False)
    host = _host_available()
    return None if host is None else (host[0], host[1], True)


def _lowering(impl: str, backend: str, dtype, head_dim: int) -> str:
    """Which lowering :func:`sd_jax.models.attention.dot_product_attention` will run."""
    import jax.numpy as jnp
    if impl == "auto" and backend == "tpu":
        return "pallas"
    if impl == "auto":
        cudnn = (backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0
                 and head_dim <= 128)
        impl = "cudnn" if cudnn else "xla"
    if impl == "cudnn" and head_dim > 128:
        impl = "xla"
    if impl == "xla" and backend == "cpu":
        return "blocked"
    return impl


def _setting(pipe, batch: int):
    """(devices, per-device batch, backend, compute dtype) of ``pipe`` for ``batch`` images."""
    devices = list(pipe.mesh.devices.flat)
    return devices, -(-batch // len(devices)), devices[0].platform, pipe.models.unet.dtype


def pipeline_vae_tile(pipe, batch: int, height: int, width: int) -> int | None:
    """:func:`vae_tile` for ``pipe`` (its ``vae_tiling`` mode, default "auto") at ``batch`` images;
    decided once per mode and shape (free memory changes, the program should not)."""
    import numpy as np
    mode = getattr(pipe, "vae_tiling", "auto")
    decided = pipe.__dict__.setdefault("_vae_tiles", {})
    if (mode, batch, height, width) not in decided:
        devices, per_device, backend, dtype = _setting(pipe, batch)
        vae = pipe.models.vae
        avail = available(devices[0])
        decided[mode, batch, height, width] = vae_tile(
            mode, vae.config, batch=per_device, height=height, width=width,
            dtype_bytes=np.dtype(vae.dtype).itemsize, available_bytes=None if avail is None else avail[0],
            vae_attention=_lowering(vae.attention, backend, dtype, vae.config.block_out_channels[-1]))
    return decided[mode, batch, height, width]


def check_generation(pipe, batch: int, height: int, width: int) -> None:
    """Raise a ValueError when generating ``batch`` images of ``width x height`` with ``pipe``
    would not fit (skipped when ``pipe.memory_check`` is False, except :data:`MAX_SIDE`)."""
    import jax
    import numpy as np
    check_side(width, height)
    checked = pipe.__dict__.setdefault("_memory_checked", set())
    if not getattr(pipe, "memory_check", True) or (batch, height, width) in checked:
        return  # once per shape: later, the previous batch's buffers would count against the next
    models = pipe.models
    devices, per_device, backend, dtype = _setting(pipe, batch)
    unet_head = min(c // h for c, h in zip(models.unet.config.block_out_channels, models.unet.config.heads))
    est = estimate(models.unet.config, models.vae.config, batch=per_device, height=height, width=width,
                   dtype_bytes=np.dtype(dtype).itemsize,
                   unet_attention=_lowering(models.unet.attention, backend, dtype, unet_head),
                   vae_attention=_lowering(models.vae.attention, backend, dtype,
                                           models.vae.config.block_out_channels[-1]),
                   vae_tile=pipeline_vae_tile(pipe, batch, height, width))
    avail = available(devices[0])
    if avail is None:
        return
    limit, source, host = avail
    need, what = est.total, "per device"
    if host:  # the devices of this host (fake CPU devices) share its memory
        local = sum(1 for d in devices if d.process_index == jax.process_index())
        need, what = est.total * local, f"for {local} device(s)" if local > 1 else ""
    if need > limit:
        top = max(est.terms, key=est.terms.get)
        chunked = ", use --attention chunked" if "attention" in top and models.unet.attention != "chunked" else ""
        raise ValueError(
            f"{batch} image(s) of {width}x{height} need an estimated {human(need)} of activations "
            f"{what + ' ' if what else ''}({est.describe()}; {per_device} per device, "
            f"{np.dtype(dtype).name}), but {human(max(limit, 0))} is available ({source}); lower the size or "
            f"the batch{chunked}, or {OVERRIDE}")
    checked.add((batch, height, width))
