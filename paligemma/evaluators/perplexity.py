"""Perplexity on suffix tokens, with the training loss's exact definition.

Batches come from the training pipeline (`make_train_input`, one epoch, full batches:
the last partial batch is left out, so use a batch_size that divides the source for
every example to count). loss = per-example mean cross-entropy over the suffix tokens
(mask_loss), averaged over examples (`paligemma.trainer.loss.suffix_loss`, without
label smoothing); perplexity = exp(loss).

Metrics: loss, perplexity.
"""

import jax
import numpy as np

from paligemma.data import pipeline
from paligemma.evaluators import base
from paligemma.trainer import loss as loss_lib


class PerplexityEvaluator(base.Evaluator):
  """Metrics: loss, perplexity (config: data, batch_size)."""

  def __init__(self, config, **context):
    super().__init__(config, **context)
    self._loss = jax.jit(self._batch_loss)  # Params are an argument: nothing constant-folded.

  def _batch_loss(self, params, image, text, mask_ar, mask_loss):
    """float32[] mean suffix loss of one batch (text etc. int32[B, T + 1])."""
    logits, _ = self.model.apply({"params": params}, image, text[:, :-1], mask_ar[:, :-1])
    return loss_lib.suffix_loss(logits, text[:, 1:], mask_loss[:, 1:])

  def run(self, params, *, step=None):
    del step
    if len(self.source) < self.batch_size:
      raise ValueError(f"Evaluator {self.name!r}: {len(self.source)} examples, fewer than one "
                       f"batch of {self.batch_size}; lower its batch_size.")
    data = pipeline.make_train_input(self.source, self.tokenizer, image_size=self.image_size,
                                     text_len=self.text_len, batch_size=self.batch_size,
                                     seed=0, num_epochs=1, antialias=self.antialias)
    losses = []
    keys = ("image", "text", "mask_ar", "mask_loss")
    for batch in self._bar(data, int(data.steps_per_epoch)):
      losses.append(self._loss(params, *(self._put(batch[k]) for k in keys)))
    # Equal-sized batches: the mean of batch means is the mean over examples.
    loss = float(np.mean(jax.device_get(losses)))
    return {"loss": loss, "perplexity": float(np.exp(loss))}
