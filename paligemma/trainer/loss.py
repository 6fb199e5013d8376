"""The training loss (reference section 2): suffix tokens only, per-example mean first."""

import jax
import jax.numpy as jnp


def suffix_loss(logits, targets, mask_loss, label_smoothing=0.0):
  """float32[] loss from logits float[B, T, V], targets int32[B, T], mask_loss int[B, T].

  Cross-entropy averaged over each example's suffix tokens (mask_loss 1), then over the
  batch. An example cut inside its prefix has no suffix token and contributes 0 (the
  division is guarded). With label smoothing the target is (1 - ls) one-hot + ls uniform.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  mask = mask_loss.astype(jnp.float32)
  per_example = jnp.sum(nll * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return jnp.mean(per_example)
