"""The jitted train step: loss, gradients of the trainable parameters only, one update.

Batch (global arrays, leading axis sharded over the batch axes):
  image float32[B, H, W, 3], text / mask_ar / mask_loss int32[B, T + 1].
The model reads text[:, :-1] and predicts text[:, 1:]; mask_loss[:, 1:] marks the
targets that count (prompt.py puts 1 on exactly the suffix tokens and eos).

The output layer (the largest matmul, 257k rows) runs only on the first `loss_len`
positions of each example once its loss tokens are moved to the front: the trainer
gives `loss_length(mask_loss)`, a quarter, half, three quarters or all of T (one
compiled step each at most), which holds every example's loss tokens; the loss is the
same (float32 rounding aside).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from paligemma import optim
from paligemma.models import gemma
from paligemma.models import paligemma as model_lib
from paligemma.trainer import loss as loss_lib


def _micro_batches(batch, accum_steps):
  """{k: [A, B / A, ...]}: micro-batch i takes rows i, i + A, ... so every device keeps
  an equal share of each micro-batch (a contiguous split would leave devices idle)."""
  def split(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f"config.input.batch_size {b} is not divisible by "
                       f"config.optim.accum_steps {accum_steps}.")
    return jnp.swapaxes(x.reshape(b // accum_steps, accum_steps, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def loss_length(mask_loss):
  """The static `loss_len` of a host batch's mask_loss int[B, T + 1] (see the module
  docstring): the smallest of T/4, T/2, 3T/4 and T holding every row's loss tokens."""
  t = mask_loss.shape[1] - 1
  need = int(np.max(np.count_nonzero(np.asarray(mask_loss)[:, 1:], axis=1), initial=0))
  return next(k for k in (-(-t * q // 4) for q in (1, 2, 3, 4)) if k >= need)


def _loss_tokens_first(loss_len, *arrays):
  """Each of arrays [B, T, ...] with the positions of the first (the mask) reordered,
  loss tokens first (stably), and cut to the first `loss_len`."""
  mask = arrays[0]
  order = jnp.argsort(mask == 0, axis=1, stable=True)[:, :loss_len]
  take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)),
                                       axis=1)
  return [take(a) for a in arrays]


def make_train_step(model, tx, lr_fn, *, label_smoothing=0.0, accum_steps=1, dropout_seed=0):
  """step(trainable, frozen, opt_state, batch, step, loss_len=None) -> (trainable,
  opt_state, metrics); loss_len (static): see the module docstring, None: all positions.

  trainable / frozen: flat {name: array} (optim.partition); metrics: loss, lr, grad_norm.
  The output layer runs inside the loss (loss.suffix_loss_from_features); when the model
  rematerialises (model.remat_policy), so does the output layer: in the backward pass, in
  vocabulary chunks, and only for the chunks of tokens that are in the loss.
  """
  remat = model.remat_policy not in (None, "none")
  # LoRA dropout: a key per step (and micro-batch), so a resumed run draws the same masks.
  dropout = model.lora is not None and model.lora.dropout > 0

  def loss_fn(trainable, frozen, batch, key, loss_len):
    params = optim.merge(trainable, frozen)
    text, mask_ar = batch["text"], batch["mask_ar"]
    rngs = {"dropout": key} if dropout else {}
    features = model.apply({"params": params}, batch["image"], text[:, :-1], mask_ar[:, :-1],
                           method=model_lib.Model.text_features, rngs=rngs)
    mask, targets = batch["mask_loss"][:, 1:], text[:, 1:]
    if loss_len is not None and loss_len < mask.shape[1]:
      mask, targets, features = _loss_tokens_first(loss_len, mask, targets, features)
    return loss_lib.suffix_loss_from_features(
        features, params["llm"]["embedder"]["input_embedding"], targets, mask,
        dtype=model.dtype, softcap=model.llm.final_logits_softcap,
        label_smoothing=label_smoothing, recompute=remat,
        token_rows=gemma.token_rows(params, model.lora))

  grad_fn = jax.value_and_grad(loss_fn)

  def step(trainable, frozen, opt_state, batch, step_count, loss_len=None):
    key = jax.random.fold_in(jax.random.PRNGKey(dropout_seed), step_count)
    if accum_steps == 1:
      loss, grads = grad_fn(trainable, frozen, batch, key, loss_len)
    else:
      # Equal-sized micro-batches: the mean of their means is the full-batch mean.
      def body(carry, micro):
        micro, i = micro
        loss, grads = grad_fn(trainable, frozen, micro, jax.random.fold_in(key, i), loss_len)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None
      zero = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
      micro = (_micro_batches(batch, accum_steps), jnp.arange(accum_steps))
      (loss, grads), _ = jax.lax.scan(body, zero, micro)
      loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": loss, "lr": lr_fn(step_count), "grad_norm": optax.tree.norm(grads)}
    return trainable, opt_state, metrics

  return step
