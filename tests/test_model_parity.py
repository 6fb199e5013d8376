"""Our Flax PaliGemma against transformers' PaliGemmaForConditionalGeneration, same weights."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_tiny
from paligemma import checkpoint
from paligemma.models import gemma
from paligemma.models.paligemma import Model

TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _tiny(tmp_root, version, image_size):
  directory = f"{tmp_root}/pg{version}_{image_size}"
  torch_model = hf_tiny.make_tiny_hf(directory, version, image_size=image_size)
  params, model_config = checkpoint.load(directory)
  return torch_model, params, model_config


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("hf"))


def _batch(image_size, rng):
  """Two right-padded examples: (prefix 5, suffix 7) and (prefix 4, suffix 4, 4 pads)."""
  image = rng.uniform(-1, 1, (2, image_size, image_size, 3)).astype(np.float32)
  text = rng.integers(4, 257_152, (2, 12)).astype(np.int32)
  text[1, 8:] = 0
  mask_ar = np.array([[0] * 5 + [1] * 7, [0] * 4 + [1] * 8], np.int32)
  mask_input = np.array([[1] * 12, [1] * 8 + [0] * 4], np.int32)
  return image, text, mask_ar, mask_input


def _transformers_logits(torch_model, image, text, mask_ar, mask_input, training):
  n = torch_model.config.text_config.num_image_tokens
  b = text.shape[0]
  ids = np.concatenate([np.full((b, n), hf_tiny.IMAGE_TOKEN), text], 1)
  attention = np.concatenate([np.ones((b, n)), mask_input], 1)
  kwargs = {}
  if training:
    token_type = np.concatenate([np.zeros((b, n)), mask_ar], 1)
    kwargs = dict(token_type_ids=torch.tensor(token_type).long(),
                  labels=torch.tensor(np.where(token_type == 1, ids, -100)))
  else:  # What the processor gives at inference: the whole prompt is prefix.
    kwargs = dict(token_type_ids=torch.zeros(ids.shape, dtype=torch.long))
  with torch.no_grad():
    out = torch_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)),
                      attention_mask=torch.tensor(attention).long(), **kwargs)
  return out.logits.numpy()[:, n:, :257_152]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("image_size", [16, 32])
def test_logits_match_transformers(tmp_root, version, image_size):
  torch_model, params, model_config = _tiny(tmp_root, version, image_size)
  if version == 2:  # The window must be shorter than the sequence to be exercised.
    assert model_config["llm"]["sliding_window"] < (image_size // 4) ** 2 + 12
  model = Model(**model_config)
  image, text, mask_ar, mask_input = _batch(image_size, np.random.default_rng(version))
  apply = jax.jit(model.apply)

  # Training inputs: prefix-LM (prefix bidirectional, suffix causal, pads masked).
  ours, _ = apply({"params": params}, image, text, mask_ar, mask_input)
  theirs = _transformers_logits(torch_model, image, text, mask_ar, mask_input, training=True)
  real = mask_input.astype(bool)
  err = np.abs(np.asarray(ours) - theirs)[real].max()
  print(f"PaliGemma {version} @{image_size}px training inputs: max abs logit error {err:.2e}")
  assert ours.dtype == jnp.float32 and ours.shape == (2, 12, 257_152)
  assert err < TOL

  # Inference inputs: the whole prompt is one bidirectional block.
  prompt_ar = np.zeros_like(mask_ar)
  ours, _ = apply({"params": params}, image, text, prompt_ar, mask_input)
  theirs = _transformers_logits(torch_model, image, text, prompt_ar, mask_input, training=False)
  err = np.abs(np.asarray(ours) - theirs)[real].max()
  print(f"PaliGemma {version} @{image_size}px inference inputs: max abs logit error {err:.2e}")
  assert err < TOL


def test_mask_really_matters(tmp_root):
  """A fully causal mask or no sliding window must change the logits (the test has teeth)."""
  torch_model, params, model_config = _tiny(tmp_root, 2, 16)
  image, text, mask_ar, mask_input = _batch(16, np.random.default_rng(0))
  theirs = _transformers_logits(torch_model, image, text, mask_ar, mask_input, training=True)
  real = mask_input.astype(bool)
  causal, _ = Model(**model_config).apply({"params": params}, image, text, np.ones_like(mask_ar),
                                          mask_input)
  assert np.abs(np.asarray(causal) - theirs)[real].max() > 1e-2
  no_window = dict(model_config, llm=dict(model_config["llm"], sliding_window=None))
  full, _ = Model(**no_window).apply({"params": params}, image, text, mask_ar, mask_input)
  assert np.abs(np.asarray(full) - theirs)[real].max() > 1e-2


def _decode_params(tmp_root, version):
  _, params, model_config = _tiny(tmp_root, version, 16)
  # Random tiny models just repeat their last token; stronger layers give varied text.
  params = dict(params, llm=dict(params["llm"], layers=jax.tree.map(
      lambda w: w * 4, params["llm"]["layers"])))
  return Model(**model_config), params


def _greedy_cached(model, params, image, text, mask_input, steps):
  prefill = jax.jit(functools.partial(model.apply, method=Model.prefill), static_argnums=5)
  extend = jax.jit(functools.partial(model.apply, method=Model.extend))
  # The model returns features; the output layer is the tied embedding.
  logits_of = jax.jit(lambda x: gemma.tied_logits(
      x, params["llm"]["embedder"]["input_embedding"], model.dtype,
      model.llm.final_logits_softcap))
  cache_size = model.num_image_tokens + text.shape[1] + steps
  x, cache = prefill({"params": params}, image, text, np.zeros_like(text), mask_input,
                     cache_size)
  tokens = []
  for _ in range(steps):
    token = jnp.argmax(logits_of(x), -1).astype(jnp.int32)
    tokens.append(np.asarray(token))
    x, cache = extend({"params": params}, token, cache)
  return np.stack(tokens, 1)


@pytest.mark.parametrize("version", [1, 2])
def test_kv_cache_greedy_equals_full_recompute(tmp_root, version):
  model, params = _decode_params(tmp_root, version)
  rng = np.random.default_rng(3)
  lengths, prompt_len, steps = [5, 9, 3], 10, 16
  image = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  text = np.zeros((3, prompt_len), np.int32)
  mask_input = np.zeros_like(text)
  for b, n in enumerate(lengths):
    text[b, :n] = rng.integers(4, 257_152, n)
    mask_input[b, :n] = 1
  batched = _greedy_cached(model, params, image, text, mask_input, steps)

  forward = jax.jit(model.apply)
  total = prompt_len + steps  # One fixed shape: the sequence is right-padded.
  for b, n in enumerate(lengths):
    seq = list(text[b, :n])
    for _ in range(steps):
      k = len(seq)
      t = np.zeros((1, total), np.int32)
      t[0, :k] = seq
      ar = np.ones_like(t)
      ar[0, :n] = 0
      real = (np.arange(total) < k).astype(np.int32)[None]
      logits, _ = forward({"params": params}, image[b:b + 1], t, ar, real)
      seq.append(int(np.argmax(logits[0, k - 1])))
    np.testing.assert_array_equal(batched[b], seq[n:], err_msg=f"example {b}: cache vs recompute")
    alone = _greedy_cached(model, params, image[b:b + 1], text[b:b + 1, :n],
                           mask_input[b:b + 1, :n], steps)
    np.testing.assert_array_equal(batched[b], alone[0], err_msg=f"example {b}: batched vs alone")
  assert len(set(batched.ravel().tolist())) > 8, "degenerate decode: the test would prove little"
