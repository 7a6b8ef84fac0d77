"""sd-jax: Stable Diffusion text-to-image in JAX/Flax."""

__version__ = "0.1.0"
