"""mcjax: MegaContext (learned context compression) training in JAX/Flax."""

__version__ = "0.1.0"
