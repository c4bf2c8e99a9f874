"""adamix-jax: AdaMix ("Mixed Differential Privacy in Computer Vision") in JAX/Flax."""

__version__ = "0.1.0"
