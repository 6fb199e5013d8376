"""The optax chain from the config: groups of parameters, schedules, optimizers.

Parameters are named by their "/"-joined path ("llm/layers/attn/q_einsum/w"). The
config's `schedule` assigns every parameter to a group: a rule table (paligemma/rules.py)
of `(regex, schedule)` pairs, the first full match wins, and a schedule of None freezes
the group. Or one of the presets (PRESETS):

  "full"            every parameter trained
  "freeze_vision"   img/* frozen (the vision tower and the projector), the LLM trained
  "attention_only"  only llm/layers/attn/* trained (the Flickr8k recipe, and big_vision's T4 Colab)
  "lora"            only the LoRA adapters (`*_lora_a`, `*_lora_b`, and the token rows
                    `*_lora_tokens` of config.lora.tokens; paligemma/lora.py)

Frozen parameters are split off before the gradient (`partition`): the train step
differentiates with respect to the trainable ones only, so frozen weights get no
gradient and no optimizer state, and may be stored in a lower dtype (`frozen_dtype`).

A schedule is a dict multiplying the peak `optim.lr`:
  {"decay": "cosine" | "linear" | "rsqrt" | "constant", "warmup_percent": 0.05}
  (or "warmup_steps": N; "end": final multiplier of cosine/linear decay, default 0).

Update of a trainable parameter p of group g at step s (sched = schedule of g):
  u = scale_by_<optimizer>(clip(grad))            clip: global norm over trainable params
  p <- p - lr * sched(s) * u - wd * sched(s) * p  (decay only where `wd_mask` matches)
Weight decay is decoupled as in big_vision: multiplied by the schedule, not by lr.
"""

import re

import jax
import jax.numpy as jnp
import optax

from paligemma import rules
from paligemma.checkpoint.tree import flatten, unflatten  # pylint: disable=unused-import

OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor")
PRESETS = {
    "full": [(".*", "default")],
    "freeze_vision": [("img/.*", None), (".*", "default")],
    "attention_only": [("llm/layers/attn/.*", "default"), (".*", None)],
    "lora": [(r".*_lora_(a|b|tokens)", "default"), (".*", None)],
}
DECAYS = ("cosine", "linear", "rsqrt", "constant")
# Matrices decay; norms, biases, embeddings and position embeddings do not.
DEFAULT_WD_MASK = r".*/(kernel|w|gating_einsum|linear)"


def groups_from_config(schedule, default_schedule):
  """[(compiled regex, schedule dict | None)] from a preset name or a list of pairs."""
  rows = rules.table(schedule, PRESETS, "config.schedule", "(regex, schedule | None)")
  return [(pattern, None if sched is None else
           dict(default_schedule if sched == "default" else sched))
          for pattern, sched in rows]


def assign_groups(names, groups):
  """{name: group index} (first full match); raises naming any parameter no group matches."""
  hint = ("add a catch-all ('.*', None) to freeze the rest, or ('.*', 'default') to "
          "train it")
  return {name: rules.first_match(groups, name, "config.schedule", hint) for name in names}


def partition(params, groups):
  """(trainable, frozen) flat dicts {"a/b/c": leaf} of a nested params tree."""
  flat = flatten(params)
  index = assign_groups(flat, groups)
  trainable = {k: v for k, v in flat.items() if groups[index[k]][1] is not None}
  frozen = {k: v for k, v in flat.items() if groups[index[k]][1] is None}
  if not trainable:
    raise ValueError("config.schedule freezes every parameter: nothing to train.")
  return trainable, frozen


def merge(trainable, frozen):
  """The nested params tree the model takes, from the two flat parts."""
  return unflatten({**trainable, **frozen})


def make_schedule(sched, total_steps):
  """step -> multiplier of the peak lr, from a schedule dict (see the module docstring)."""
  sched = dict(sched)
  decay = sched.pop("decay", "cosine")
  warmup_percent = sched.pop("warmup_percent", None)
  warmup = sched.pop("warmup_steps", None)
  end = float(sched.pop("end", 0.0))
  if sched:
    raise ValueError(f"Unknown schedule key(s) {sorted(sched)}; valid: decay, warmup_percent, "
                     "warmup_steps, end.")
  if decay not in DECAYS:
    raise ValueError(f"Schedule decay {decay!r} unknown; valid: {DECAYS}.")
  if warmup is None:
    warmup = int(round((warmup_percent or 0.0) * total_steps))
  warmup = int(warmup)
  rest = max(1, total_steps - warmup)

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = jnp.minimum(1.0, (step + 1) / warmup) if warmup else 1.0
    t = jnp.clip((step - warmup) / rest, 0.0, 1.0)
    if decay == "cosine":
      main = end + (1 - end) * 0.5 * (1 + jnp.cos(jnp.pi * t))
    elif decay == "linear":
      main = end + (1 - end) * (1 - t)
    elif decay == "rsqrt":
      main = jax.lax.rsqrt(jnp.maximum(1.0, step - warmup + 1.0))
    else:
      main = 1.0
    return ramp * main

  return fn


def _scale_by(name, kwargs):
  kwargs = dict(kwargs or {})
  if name in ("adam", "adamw"):
    return optax.scale_by_adam(**kwargs)
  if name == "sgd":
    momentum = kwargs.pop("momentum", None)
    if kwargs:
      raise ValueError(f"config.optim.kwargs {sorted(kwargs)} unknown for sgd; valid: momentum.")
    return optax.trace(decay=momentum) if momentum else optax.identity()
  if name == "adafactor":
    return optax.scale_by_factored_rms(**kwargs)
  raise ValueError(f"config.optim.name {name!r} unknown; valid: {OPTIMIZERS}.")


def _decoupled_decay(wd, sched_fn):
  """u <- u - wd * sched(step) * p (counts its own steps, like scale_by_schedule)."""

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    factor = -wd * sched_fn(state.count)
    updates = jax.tree.map(lambda u, p: u + factor * p.astype(u.dtype), updates, params)
    return updates, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init, update)


def make_optimizer(optim, groups, trainable, total_steps):
  """(optax transformation over the flat trainable dict, {group label: lr fn}).

  optim: config.optim (name, kwargs, lr, wd, wd_mask, grad_clip_norm).
  """
  index = assign_groups(trainable, groups)
  labels = {k: f"group{index[k]}" for k in trainable}
  wd_mask = re.compile(optim.get("wd_mask") or DEFAULT_WD_MASK)
  lr, wd = float(optim.lr), float(optim.get("wd") or 0.0)
  transforms, lr_fns = {}, {}
  for label in sorted(set(labels.values())):
    sched_fn = make_schedule(groups[int(label[5:])][1], total_steps)
    lr_fns[label] = (lambda s, f=sched_fn: lr * f(s))
    chain = [_scale_by(optim.name, optim.get("kwargs")),
             optax.scale_by_schedule(lambda s, f=sched_fn: -lr * f(s))]
    if wd:
      # Other groups' leaves are masked out by multi_transform already; False is harmless.
      mask = {k: l == label and bool(wd_mask.fullmatch(k)) for k, l in labels.items()}
      chain.append(optax.masked(_decoupled_decay(wd, sched_fn), mask))
    transforms[label] = optax.chain(*chain)
  tx = optax.multi_transform(transforms, labels)
  if optim.get("grad_clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(float(optim.grad_clip_norm)), tx)
  return tx, lr_fns


def state_shardings(tx, trainable, param_shardings, other):
  """Shardings of tx's state: a leaf with its parameter's name and shape is sharded like
  it (Adam's mu, nu); anything else (counts, Adafactor's factored rows) gets `other`."""
  state = jax.eval_shape(tx.init, trainable)

  def pick(path, leaf):
    for key in path:
      name = getattr(key, "key", None)
      if name in trainable and tuple(trainable[name].shape) == tuple(leaf.shape):
        return param_shardings[name]
    return other

  return jax.tree_util.tree_map_with_path(pick, state)
