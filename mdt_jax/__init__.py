"""mdt_jax: merging Decision Transformers in JAX/Flax."""
__version__ = "0.1.0"
