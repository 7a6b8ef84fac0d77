"""How a model computes, as one frozen field: the compute policy.

A model's config says *what* it computes (its architecture, from ``config.json``); its
:class:`Policy` says *how*: the compute and parameter dtypes, the attention
implementation, the convolutions' lowering and whether CPU-specific lowerings may be
used.  Every module in :mod:`sd_jax.models` takes ``config`` (where it has one) and this
one ``policy`` field, and hands it to its submodules unchanged, instead of a separate
field per setting threaded through every level (the Flax examples' "one config field").

The policy never changes the parameter tree (names and shapes; ``param_dtype`` only the
dtype), so one checkpoint loads into models with any policy.

Example::

    Policy(jnp.bfloat16)                              # bf16 compute and parameters
    Policy(jnp.bfloat16, param_dtype=jnp.float32)     # bf16 compute, float32 master weights
    Policy(attention="chunked")                       # memory-saving attention
    Policy(cpu_lowerings=False)   # the plain formulation: XLA's cost analysis of it is the
                                  # model's FLOP count (a blocked loop's body counts once)
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from sd_jax.models.attention import IMPLEMENTATIONS, check_impl
from sd_jax.sharding import target_platform

# Convolution lowerings (:class:`sd_jax.models.layers.Conv2D`): XLA's own convolution
# ("lax"), one matmul over explicit patches ("im2col"), or "auto": per model and size, what
# was measured fastest (im2col and polyphase upsampling for the UNet's small grids on CPU;
# the VAE uses "lax", see sd_jax.models.vae).
CONV_IMPLS = ("auto", "lax", "im2col")


@dataclasses.dataclass(frozen=True)
class Policy:
    """The compute policy of a model (frozen and hashable: a Flax module field, a jit static).

    Attributes:
      dtype: compute dtype of matmuls and convolutions (norms, softmax and the timestep
        embedding stay float32 whatever it is).
      param_dtype: dtype the parameters are created in (``init``) and loaded as; None (the
        default) means ``dtype``.
      attention: an implementation name of :mod:`sd_jax.models.attention`
        (:data:`~sd_jax.models.attention.IMPLEMENTATIONS`).
      conv_impl: the convolutions' lowering, one of :data:`CONV_IMPLS`; "auto" is right
        unless measuring.
      cpu_lowerings: whether the CPU-specific lowerings (blocked attention, patch-matmul and
        polyphase convolutions) may be used when tracing for the CPU.  False gives the
        formulation every framework computes, e.g. for FLOP counts; the result is the same
        up to float rounding.
    """
    dtype: Any = jnp.float32
    param_dtype: Any = None
    attention: str = "xla"
    conv_impl: str = "auto"
    cpu_lowerings: bool = True

    def __post_init__(self):
        # Canonical dtypes, so equal policies are equal (and hash alike) however the dtype
        # was spelled: jnp.float32, np.float32, "float32".
        dtype = jnp.dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "param_dtype", dtype if self.param_dtype is None
                           else jnp.dtype(self.param_dtype))
        check_impl(self.attention)
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"unknown conv_impl {self.conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}")
        if not isinstance(self.cpu_lowerings, bool):
            raise TypeError(f"Policy.cpu_lowerings must be a bool, got {self.cpu_lowerings!r}")

    def replace(self, **changes) -> "Policy":
        """A copy with ``changes`` (field names as keywords)."""
        return dataclasses.replace(self, **changes)

    def cpu_specific(self) -> bool:
        """Whether the CPU-specific lowerings apply to what is traced now."""
        return self.cpu_lowerings and target_platform() == "cpu"


__all__ = ["Policy", "CONV_IMPLS", "IMPLEMENTATIONS"]


class PolicyReads:
    """``dtype``, ``param_dtype`` and ``attention`` of a model's ``policy``, read through (for
    code that asks a top-level model what it computes in)."""

    @property
    def dtype(self):
        return self.policy.dtype

    @property
    def param_dtype(self):
        return self.policy.param_dtype

    @property
    def attention(self) -> str:
        return self.policy.attention
