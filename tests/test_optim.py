"""Optimizer from the config: groups and presets, schedules, weight decay, clipping,
accumulation, and the loss (suffix tokens, per-example mean)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

from paligemma import optim  # pylint: disable=g-import-not-at-top
from paligemma.models import paligemma as model_lib  # pylint: disable=g-import-not-at-top
from paligemma.trainer import loss as loss_lib  # pylint: disable=g-import-not-at-top
from paligemma.trainer import step as step_lib  # pylint: disable=g-import-not-at-top

NAMES = ["img/embedding/kernel", "img/head/bias", "llm/embedder/input_embedding",
         "llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w",
         "llm/layers/mlp/linear", "llm/layers/pre_attention_norm/scale", "llm/final_norm/scale"]
SCHED = dict(decay="constant")


def _params():
  return optim.unflatten({n: jnp.full((2, 3), float(i + 1)) for i, n in enumerate(NAMES)})


def _optim(**kw):
  base = dict(name="sgd", kwargs={}, lr=0.1, wd=0.0, wd_mask=None, grad_clip_norm=0.0,
              accum_steps=1, schedule=SCHED)
  base.update(kw)
  return ml_collections.ConfigDict(base)


@pytest.mark.parametrize("preset,trained", [
    ("full", NAMES),
    ("freeze_vision", [n for n in NAMES if not n.startswith("img/")]),
    ("attention_only", ["llm/layers/attn/q_einsum/w", "llm/layers/attn/kv_einsum/w"]),
])
def test_presets(preset, trained):
  trainable, frozen = optim.partition(_params(), optim.groups_from_config(preset, SCHED))
  assert sorted(trainable) == sorted(trained)
  assert sorted(frozen) == sorted(set(NAMES) - set(trained))
  assert optim.flatten(optim.merge(trainable, frozen)).keys() == set(NAMES)


def test_group_errors_name_the_problem():
  with pytest.raises(ValueError, match="matches no config.schedule"):
    optim.partition(_params(), optim.groups_from_config([("img/.*", SCHED)], SCHED))
  with pytest.raises(ValueError, match="not a preset"):
    optim.groups_from_config("freeze_everything", SCHED)
  with pytest.raises(ValueError, match="freezes every parameter"):
    optim.partition(_params(), optim.groups_from_config([(".*", None)], SCHED))
  with pytest.raises(ValueError, match="Unknown schedule key"):
    optim.make_schedule(dict(decay="cosine", warmpu_steps=3), 10)


def test_schedules():
  cos = optim.make_schedule(dict(decay="cosine", warmup_steps=2), 10)
  np.testing.assert_allclose([float(cos(s)) for s in (0, 1, 2, 6, 10)],
                             [0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-6)
  lin = optim.make_schedule(dict(decay="linear", warmup_percent=0.0), 10)
  np.testing.assert_allclose([float(lin(s)) for s in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-6)


def test_per_group_schedules_and_frozen_groups():
  groups = optim.groups_from_config(
      [("img/.*", None), ("llm/layers/.*", dict(decay="constant")),
       (".*", dict(decay="linear"))], SCHED)
  trainable, _ = optim.partition(_params(), groups)
  tx, lrs = optim.make_optimizer(_optim(), groups, trainable, 4)
  state = tx.init(trainable)
  grads = jax.tree.map(jnp.ones_like, trainable)
  for _ in range(2):
    updates, state = tx.update(grads, state, trainable)
  # Step 1 (second update): constant lr 0.1; linear 0.1 * (1 - 1/4).
  np.testing.assert_allclose(updates["llm/layers/mlp/linear"], -0.1, rtol=1e-6)
  np.testing.assert_allclose(updates["llm/final_norm/scale"], -0.075, rtol=1e-6)
  assert len(lrs) == 2
  # Frozen params have no optimizer state: every state leaf is a trainable shape or a count.
  shapes = {x.shape for x in jax.tree.leaves(state)}
  assert shapes <= {(2, 3), ()}


def test_decoupled_weight_decay_with_mask():
  groups = optim.groups_from_config("full", SCHED)
  trainable, _ = optim.partition(_params(), groups)
  tx, _ = optim.make_optimizer(_optim(lr=0.0, wd=0.01), groups, trainable, 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, trainable), tx.init(trainable), trainable)
  # Not multiplied by lr (0 here): p <- p - wd * sched * p on matrices only.
  np.testing.assert_allclose(updates["llm/layers/mlp/linear"], -0.01 * 6.0, rtol=1e-6)
  np.testing.assert_allclose(updates["img/embedding/kernel"], -0.01 * 1.0, rtol=1e-6)
  np.testing.assert_allclose(updates["llm/final_norm/scale"], 0.0)
  np.testing.assert_allclose(updates["img/head/bias"], 0.0)


@pytest.mark.parametrize("name,reference", [
    ("adam", lambda: optax.adam(0.1, b2=0.999)),
    ("sgd", lambda: optax.sgd(0.1)),
    ("adafactor", lambda: optax.chain(optax.scale_by_factored_rms(), optax.scale(-0.1))),
])
def test_optimizers_match_optax(name, reference):
  groups = optim.groups_from_config("full", SCHED)
  trainable, _ = optim.partition(_params(), groups)
  kwargs = {"b2": 0.999} if name == "adam" else {}
  tx, _ = optim.make_optimizer(_optim(name=name, kwargs=kwargs), groups, trainable, 10)
  ref = reference()
  s, r = tx.init(trainable), ref.init(trainable)
  for i in range(3):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), trainable)
    u, s = tx.update(grads, s, trainable)
    v, r = ref.update(grads, r, trainable)
    for k in u:
      np.testing.assert_allclose(u[k], v[k], rtol=1e-5, atol=1e-7)


def test_gradient_clipping():
  groups = optim.groups_from_config("full", SCHED)
  trainable, _ = optim.partition(_params(), groups)
  tx, _ = optim.make_optimizer(_optim(lr=1.0, grad_clip_norm=1.0), groups, trainable, 10)
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), trainable)
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)


def test_loss_suffix_only_per_example_mean():
  logits = jnp.log(jnp.array([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
                              [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]]))
  targets = jnp.array([[0, 0, 1], [1, 1, 1]])
  mask = jnp.array([[0, 1, 1], [0, 0, 0]])  # Example 2: cut inside its prefix.
  want = (-(np.log(0.9) + np.log(0.8)) / 2 + 0.0) / 2
  np.testing.assert_allclose(loss_lib.suffix_loss(logits, targets, mask), want, rtol=1e-6)
  smooth = loss_lib.suffix_loss(logits[:1], targets[:1], mask[:1], label_smoothing=0.2)
  nll = -np.array([np.log(0.9), np.log(0.8)])
  uniform = -np.array([np.log([0.9, 0.1]).mean(), np.log([0.2, 0.8]).mean()])
  np.testing.assert_allclose(smooth, np.mean(0.8 * nll + 0.2 * uniform), rtol=1e-6)


def test_gradient_accumulation_and_loss_len_match_full_batch():
  """Micro-batches, and the output layer cut to each row's loss tokens (loss_len), give
  the full batch's loss and update."""
  model = model_lib.Model(
      img=dict(variant="mu/8", image_size=16),
      llm=dict(variant="gemma_tiny", vocab_size=64, depth=1))
  rng = np.random.default_rng(0)
  batch = dict(image=jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)), jnp.float32),
               text=jnp.asarray(rng.integers(1, 64, (4, 7)), jnp.int32),
               mask_ar=jnp.asarray([[0, 0, 0, 1, 1, 1, 1]] * 4, jnp.int32),
               mask_loss=jnp.asarray([[0, 0, 0, 1, 1, 1, 0], [0, 1, 0, 1, 0, 0, 1],
                                      [0, 0, 0, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0, 0]], jnp.int32))
  params = model.init(jax.random.PRNGKey(0), batch["image"], batch["text"][:, :-1],
                      batch["mask_ar"][:, :-1])["params"]
  groups = optim.groups_from_config("full", SCHED)
  trainable, frozen = optim.partition(params, groups)
  tx, lrs = optim.make_optimizer(_optim(name="sgd", lr=1.0), groups, trainable, 10)
  loss_len = step_lib.loss_length(np.asarray(batch["mask_loss"]))
  assert loss_len == 3  # Of 6 positions: the most loss tokens in a row.
  out = []
  for accum, cut in ((1, None), (2, None), (1, loss_len), (2, loss_len)):
    step = jax.jit(step_lib.make_train_step(model, tx, lrs["group0"], accum_steps=accum),
                   static_argnums=5)
    out.append(step(trainable, frozen, tx.init(trainable), batch, jnp.int32(0), cut))
  for other in out[1:]:
    np.testing.assert_allclose(out[0][2]["loss"], other[2]["loss"], rtol=1e-5)
    for k in trainable:
      np.testing.assert_allclose(out[0][0][k], other[0][k], rtol=1e-4, atol=1e-6)
