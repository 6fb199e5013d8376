"""Pieces of the training loop (`paligemma.train`): loss, step, checkpoints, metrics."""
