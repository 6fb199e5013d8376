"""LoRA in the model: a fresh adapter changes nothing, merged equals unmerged, dropout
only with a dropout rng, QLoRA's quantized base near the float one; the config checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from paligemma import config as config_lib
from paligemma import decode
from paligemma import lora as lora_lib
from paligemma import quant
from paligemma import transfer_configs
from paligemma.checkpoint.tree import flatten, unflatten
from paligemma.models import build
from paligemma.models import layers

# Gemma 1 (q + kv einsums), Gemma 2 (grouped kv), and multi-head (the stacked qkv_einsum).
CONFIGS = {"gemma1": tiny_model_config(1), "gemma2": tiny_model_config(2),
           "mha": tiny_model_config(1, num_kv_heads=4)}


TOKENS = [250, 5, 17]


def _inputs(b=2, t=6, vocab=300):
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  image = jax.random.uniform(keys[0], (b, 32, 32, 3), minval=-1, maxval=1)
  text = jax.random.randint(keys[1], (b, t), 0, vocab)
  mask_ar = jnp.asarray([[0, 0, 0, 1, 1, 1]] * b)
  return image, text, mask_ar


def _logits(model, params, rngs=None):
  return np.asarray(_apply(model, unflatten(params), _inputs(), rngs))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, inputs, rngs):
  return model.apply({"params": params}, *inputs, rngs=rngs or {})[0]


def _with_random_adapters(params, seed=3, scale=0.05):
  """Adapters made nonzero (B starts at zero), so that they change the outputs."""
  out = dict(params)
  for i, k in enumerate(sorted(lora_lib.adapters(params))):
    key = jax.random.PRNGKey(seed * 1000 + i)
    out[k] = scale * jax.random.normal(key, params[k].shape, params[k].dtype)
  return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def adapted(request):
  """(base model, LoRA model, params with fresh adapters) for each config, targets "all",
  and trainable rows of three tokens."""
  cfg = CONFIGS[request.param]
  model = build.build_model(cfg, lora=dict(rank=4, alpha=8.0, targets="all", tokens=TOKENS))
  params = flatten(build.initial_params(model, jax.random.PRNGKey(0), 6))
  return build.build_model(cfg), model, params


def test_targets_get_adapters_of_the_layout(adapted):
  _, model, params = adapted
  names = sorted(k for k in lora_lib.adapters(params) if k != lora_lib.TOKENS_LEAF)
  bases = sorted({lora_lib.base_name(k) for k in names})
  # The token rows start as the embedding's, in id order.
  np.testing.assert_array_equal(params[lora_lib.TOKENS_LEAF],
                                params[lora_lib.EMBEDDING][np.array(sorted(TOKENS))])
  # Every matmul weight of the LLM and the ViT blocks; nothing else (embedding, norms, head).
  assert bases == sorted(k for k in params if lora_lib.layout(k) and not lora_lib.is_lora_leaf(k))
  assert any(k.startswith("img/") for k in bases) and any(k.startswith("llm/") for k in bases)
  for w in bases:
    lay = lora_lib.layout(w)
    a, b = lay.shapes(params[w].shape, 4)
    assert params[w + "_lora_a"].shape == a and params[w + "_lora_b"].shape == b, w
    assert not np.any(params[w + "_lora_b"])  # B starts at zero, as PEFT's.
  assert model.lora.scale == 2.0


def test_fresh_adapters_give_the_base_logits_exactly(adapted):
  base, model, params = adapted
  plain = {k: v for k, v in params.items() if not lora_lib.is_lora_leaf(k)}
  # Op by op (not jitted): XLA may fuse the two programs differently, which moves
  # float32 roundings (1e-6); the ops themselves give bit-identical logits.
  eager = lambda m, p: np.asarray(m.apply({"params": unflatten(p)}, *_inputs())[0])
  np.testing.assert_array_equal(eager(model, params), eager(base, plain))


def test_merged_equals_unmerged(adapted):
  base, model, params = adapted
  params = _with_random_adapters(params)
  unmerged = _logits(model, params)
  merged = _logits(base, lora_lib.merge(params, model.lora))
  plain = _logits(base, {k: v for k, v in params.items() if not lora_lib.is_lora_leaf(k)})
  assert np.abs(unmerged - plain).max() > 0.05  # The adapters do change the model.
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)


def test_decode_unmerged_equals_merged(adapted):
  """Greedy decoding with unmerged adapters and token rows gives the merged model's tokens
  and log-probabilities: at batch 3 (on a CPU, the vocabulary-first pick) and alone."""
  base, model, params = adapted
  params = _with_random_adapters(params)
  rows = np.asarray(params[lora_lib.TOKENS_LEAF])
  params[lora_lib.TOKENS_LEAF] = jnp.asarray(rows * 40)  # So that they get picked.
  image, text, _ = _inputs(b=3)
  batch = dict(image=image, text=text, mask_ar=jnp.zeros_like(text),
               mask_input=jnp.ones_like(text))
  merged = lora_lib.merge(params, model.lora)
  run = lambda m, p, x: jax.tree.map(np.asarray, decode.Decoder(m, max_decode_len=6, eos_id=None)(
      unflatten(p), x))
  got, want = run(model, params, batch), run(base, merged, batch)
  assert set(got["tokens"].ravel().tolist()) & set(TOKENS), "no token row picked: proves little"
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-4)
  alone = run(model, params, {k: v[1:2] for k, v in batch.items()})
  np.testing.assert_array_equal(alone["tokens"][0], got["tokens"][1])


def test_adapter_gradients_match_autodiff(monkeypatch):
  """layers.lora_delta's own gradient (ordered for XLA's CPU backend) = autodiff's, for
  every layout Gemma 1 and the ViT have (q, stacked kv, attention output, stacked
  gating, linear; SigLIP's q/k/v, out and MLP)."""
  model = build.build_model(CONFIGS["gemma1"], lora=dict(rank=4, alpha=8.0, targets="all"))
  params = _with_random_adapters(flatten(build.initial_params(model, jax.random.PRNGKey(0), 6)))
  adapters = lora_lib.adapters(params)
  base = {k: v for k, v in params.items() if k not in adapters}
  # A fresh jit each time: traced again, with the lora_delta of the moment.
  grads = lambda: jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(
      model.apply({"params": unflatten({**base, **a})}, *_inputs())[0]))))(adapters)
  got = grads()
  monkeypatch.setattr(layers, "lora_delta",
                      lambda s, x, a, b: jnp.einsum(f"{s.x},{s.a},{s.b}->{s.y}", x, a, b))
  want = grads()
  for k in adapters:
    scale = float(np.abs(want[k]).max())
    assert scale > 0, k
    np.testing.assert_allclose(got[k], want[k], atol=1e-5 * scale, rtol=0, err_msg=k)


def test_llm_targets_leave_the_vision_tower_alone():
  cfg = CONFIGS["gemma1"]
  llm = flatten(build.abstract_params(build.build_model(cfg, lora=dict(rank=2)), 6))
  peft = flatten(build.abstract_params(build.build_model(cfg, lora=dict(rank=2, targets="peft")), 6))
  assert lora_lib.adapters(llm) and not any(k.startswith("img/") for k in lora_lib.adapters(llm))
  vit = sorted({lora_lib.base_name(k) for k in lora_lib.adapters(peft) if k.startswith("img/")})
  assert [k.split("/")[-2] for k in vit] == ["key", "query", "value"]


def test_dropout_only_with_a_dropout_rng(adapted):
  _, model, params = adapted
  params = _with_random_adapters(params)
  dropping = model.clone(lora=dataclasses.replace(model.lora, dropout=0.5))
  # Evaluation and decoding pass no dropout rng: the same outputs as without dropout.
  np.testing.assert_array_equal(_logits(dropping, params), _logits(model, params))
  rngs = {"dropout": jax.random.PRNGKey(7)}
  a, b = _logits(dropping, params, rngs=rngs), _logits(dropping, params, rngs=rngs)
  np.testing.assert_array_equal(a, b)  # A key gives the same masks (exact resume).
  assert np.abs(a - _logits(model, params)).max() > 1e-3


@pytest.mark.parametrize("kind,bound", [("int8", 0.2), ("nf4", 3.0)])
def test_quantized_base_is_near_the_float_base(kind, bound):
  """QLoRA: the frozen matmul weights as quant.QArray; logits near the float model's."""
  cfg = CONFIGS["gemma2"]
  model = build.build_model(cfg, lora=dict(rank=4, targets="all", quantize=kind))
  params = _with_random_adapters(flatten(build.initial_params(model, jax.random.PRNGKey(0), 6)))
  adapters = lora_lib.adapters(params)
  frozen = {k: v for k, v in params.items() if k not in adapters}
  quantized = lora_lib.quantize_frozen(dict(frozen), kind)
  kinds = {k for k, v in quantized.items() if isinstance(v, quant.QArray)}
  assert kinds == {k for k in frozen if lora_lib.layout(k)}  # Every matmul weight.
  want = _logits(model, params)
  got = _logits(model, {**quantized, **adapters})
  err = np.abs(got - want).max()
  print(f"{kind}: max |logit error| {err:.4f} (logits std {want.std():.2f})")
  assert 0 < err < bound
  # Gradients reach the adapters through the quantized weights.
  def loss(a):
    return model.apply({"params": unflatten({**quantized, **a})}, *_inputs())[0].mean()
  grads = jax.grad(loss)(adapters)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert np.abs(np.asarray(grads["llm/layers/mlp/linear_lora_b"])).max() > 0


@pytest.mark.parametrize("kind,fmt", [("nf4", "npz"), ("int8", "hf")])
def test_qlora_load_quantizes_one_layer_at_a_time(kind, fmt, tmp_path, monkeypatch):
  """checkpoint.load(transform=lora.layer_quantizer): the same QArrays as quantizing the
  loaded float weights, while each quantized weight is read from the file (a big_vision
  .npz, or a Hugging Face directory) a layer at a time: the host never holds a whole
  stacked weight."""
  from conftest import random_params  # pylint: disable=g-import-not-at-top
  from paligemma import checkpoint  # pylint: disable=g-import-not-at-top
  from paligemma.checkpoint import loader  # pylint: disable=g-import-not-at-top
  cfg = CONFIGS["gemma2"]
  path = tmp_path / "base"
  if fmt == "npz":
    path = tmp_path / "base.npz"
    checkpoint.save_npz(random_params(cfg), path)
  else:
    checkpoint.save_hf(random_params(cfg), cfg, path)
  reads = []

  def recording(source):
    src = describe(source)
    for name, leaf in src.leaves.items():
      def read(start=None, stop=None, leaf=leaf, name=name):
        reads.append((name, start, stop))
        return leaf.read(start, stop)
      src.leaves[name] = dataclasses.replace(leaf, read=read)
    return src

  describe = loader.describe
  monkeypatch.setattr(loader, "describe", recording)
  plan = lambda name, shape: lora_lib.quantize_plan(name, shape, kind)
  got, _ = loader.load(path, transform=lambda name, shape: (
      lora_lib.layer_quantizer(kind, plan(name, shape)) if plan(name, shape) else None))
  got = flatten(got)
  quantized = {k for k, v in got.items() if isinstance(v, quant.QArray)}
  assert quantized == {k for k in got if lora_lib.layout(k)}
  ranges = {(n, start, stop) for n, start, stop in reads if n in quantized}
  assert ranges and all(stop - start == 1 for _, start, stop in ranges), sorted(ranges)
  assert {n for n, *_ in ranges} == quantized
  want = lora_lib.quantize_frozen(flatten(loader.load(path)[0]), kind)
  for k, v in want.items():
    for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(v)):
      np.testing.assert_array_equal(a, b, err_msg=k)
    assert jax.tree.structure(got[k]) == jax.tree.structure(v), k


def test_merge_refuses_an_adapter_without_its_weight(adapted):
  _, model, params = adapted
  params = {k: v for k, v in params.items() if k != "llm/layers/mlp/linear"}
  with pytest.raises(KeyError, match="llm/layers/mlp/linear"):
    lora_lib.merge(params, model.lora)


def _shapes_config(**lora):
  c = transfer_configs.base_config()
  c.model = transfer_configs.TINY_MODEL
  c.input.image_size = 32
  c.lora.update(lora)
  return c


@pytest.mark.parametrize("lora,schedule,match", [
    (dict(rank=4), "full", "schedule=lora"),
    (dict(rank=0), "lora", "lora.rank is 0"),
    (dict(rank=4, quantize="nf8"), "lora", "quantize 'nf8' unknown"),
    (dict(rank=4, dropout=1.0), "lora", r"dropout must be in \[0, 1\)"),
    (dict(rank=4, targets="q_proj("), "lora", "neither a preset"),
    (dict(rank=4, tokens="locs"), "lora", "tokens 'locs' unknown"),
    (dict(rank=4, tokens=[5, 1920]), "lora", "token id 1920 is not in the vocabulary of 1920"),
])
def test_config_errors_name_the_key(lora, schedule, match):
  c = _shapes_config(**lora)
  c.schedule = schedule
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)
