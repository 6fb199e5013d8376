"""The model from a model config, its initial parameters, and their shapes without memory.

A model config is a transfer config's `config.model` block or a checkpoint's
model_config: the tower configs `img` and `llm` (dicts, see models/variants.py), and
optionally `dtype`, `param_dtype`, `scan` and `remat_policy`.
"""

import functools

import jax
import jax.numpy as jnp

from paligemma.models.paligemma import Model

MODEL_KEYS = ("img", "llm", "dtype", "param_dtype", "scan", "remat_policy", "lora")


def build_model(model_config, **overrides):
  """The `Model` of a model config (see the module docstring); `overrides` (any of
  MODEL_KEYS, e.g. the towers of a checkpoint, dtype=...) win over its keys."""
  cfg = {**dict(model_config), **overrides}
  unknown = sorted(set(cfg) - set(MODEL_KEYS))
  if unknown:
    raise ValueError(f"Unknown model config key(s) {unknown}; valid keys: {list(MODEL_KEYS)}")
  missing = [k for k in ("img", "llm") if k not in cfg]
  if missing:
    raise ValueError(f"The model config needs the tower config(s) {missing}")
  return Model(**cfg)


def _example_inputs(model, text_len):
  """The smallest batch `model.init` accepts: one blank image and `text_len` tokens."""
  res = model.img.image_size
  text = jnp.zeros((1, text_len), jnp.int32)
  return jnp.zeros((1, res, res, 3), jnp.float32), text, text


def initial_params(model, rng, text_len=1):
  """Random params {"img": ..., "llm": ...} from the model's initialisers, in
  model.param_dtype (the values depend on `rng` only; `text_len` checks llm.max_len)."""
  return model.init(rng, *_example_inputs(model, text_len))["params"]


def abstract_params(model, text_len=1):
  """The params of `initial_params` as jax.ShapeDtypeStruct leaves: nothing allocated."""
  return jax.eval_shape(functools.partial(initial_params, model, text_len=text_len),
                        jax.random.PRNGKey(0))
