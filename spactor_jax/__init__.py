"""spactor-jax: efficient pre-training objectives for T5-style models."""

__version__ = '0.1.0'
