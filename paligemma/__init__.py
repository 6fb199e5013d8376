"""PaliGemma and PaliGemma 2 in JAX/Flax: model, checkpoints, data, training, decoding."""

__version__ = "0.1.0"
