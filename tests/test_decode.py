"""Decoding through the KV cache against a full-recompute reference, samplers, beams."""

import functools
import types

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from paligemma import decode
from paligemma import tokenizer as tokenizer_lib
from paligemma.models import build
from paligemma.models.cache import Cache
from paligemma.models.paligemma import Model
from conftest import TINY_VOCAB, tiny_model_config

VOCAB = TINY_VOCAB  # So texts can be decoded.
PROMPT_LEN, STEPS = 10, 12
LENGTHS = [5, 9, 3]


def _model(version):
  window = {} if version == 1 else {"sliding_window": 8}
  return Model(**tiny_model_config(version, patch=4, image_size=16, vocab_size=VOCAB,
                                   **window))


@functools.lru_cache(maxsize=None)
def _setup(version):
  """(model, params, batch) with random params whose layers are scaled up x4."""
  model = _model(version)
  rng = np.random.default_rng(version)
  image = rng.uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  text = np.zeros((3, PROMPT_LEN), np.int32)
  mask_input = np.zeros_like(text)
  for b, n in enumerate(LENGTHS):
    text[b, :n] = rng.integers(4, VOCAB, n)
    mask_input[b, :n] = 1
  batch = dict(image=image, text=text, mask_ar=1 - mask_input, mask_input=mask_input)
  return model, random_params(model, seed=version), batch


def random_params(model, seed=0):
  """Random params drawn in numpy (no init to compile), scaled so that outputs vary.

  Tiny random models with the usual init just repeat their last token: weaker
  embeddings, stronger layers and random norm scales give varied text (asserted below).
  """
  shapes = build.abstract_params(model)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'img'" in name:
      std = 0.02
    else:
      std = 0.1 if "input_embedding" in name else 1.0 if "norm" in name else 0.2
    return rng.normal(0, std, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _row(batch, b):
  """Example b alone, its prompt cut to its real length."""
  n = LENGTHS[b]
  return {k: v[b:b + 1, :n] if k != "image" else v[b:b + 1] for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _forward(version):
  model = _model(version)
  return jax.jit(model.apply)


def _full_logprobs(version, params, batch, b, generated):
  """float64[len(generated), V] log-softmax by full recompute over prompt + generated."""
  n = LENGTHS[b]
  total = PROMPT_LEN + STEPS  # One fixed shape: right-padded.
  t = np.zeros((1, total), np.int32)
  seq = list(batch["text"][b, :n]) + list(generated)
  t[0, :len(seq)] = seq
  ar = np.ones_like(t)
  ar[0, :n] = 0
  real = (np.arange(total) < len(seq)).astype(np.int32)[None]
  logits, _ = _forward(version)({"params": params}, batch["image"][b:b + 1], t, ar, real)
  logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
  return np.asarray(logp)[n - 1:n - 1 + len(generated)]


def full_recompute_greedy(version, params, batch, b, steps):
  """Reference: argmax of a full forward pass over the whole sequence, one token at a time."""
  generated = []
  for _ in range(steps):
    logp = _full_logprobs(version, params, batch, b, generated + [0])
    generated.append(int(np.argmax(logp[-1])))
  return generated


def _log_likelihood(version, params, batch, b, tokens, length):
  """The model's own sum of log-probabilities of tokens[:length], by full recompute."""
  tokens = [int(t) for t in tokens[:length]]
  logp = _full_logprobs(version, params, batch, b, tokens)
  return float(sum(logp[i, t] for i, t in enumerate(tokens)))


@functools.lru_cache(maxsize=None)
def _decoder(version, sampler, eos_id=tokenizer_lib.EOS_ID):
  return decode.Decoder(_model(version), max_decode_len=STEPS, sampler=sampler, eos_id=eos_id)


def _run(version, sampler, batch=None, seed=0, eos_id=None):
  model, params, full = _setup(version)
  out = _decoder(version, sampler, eos_id)(params, full if batch is None else batch, seed)
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("version", [1, 2])
def test_greedy_equals_full_recompute(version):
  _, params, batch = _setup(version)
  out = _run(version, "greedy")
  assert out["tokens"].shape == (3, STEPS) and out["tokens"].dtype == np.int32
  assert len(set(out["tokens"].ravel().tolist())) > 8, "degenerate decode: the test proves little"
  for b in range(3):
    ref = full_recompute_greedy(version, params, batch, b, STEPS)
    np.testing.assert_array_equal(out["tokens"][b], ref, err_msg=f"example {b}")
    logp = _full_logprobs(version, params, batch, b, ref)
    np.testing.assert_allclose(out["logprobs"][b], logp[np.arange(STEPS), ref], atol=1e-4)
  for b in (1, 2):  # Longest and shortest prompt, each decoded alone at its own length.
    alone = _run(version, "greedy", _row(batch, b))
    np.testing.assert_array_equal(alone["tokens"][0], out["tokens"][b], err_msg="batched vs alone")


def test_greedy_vocab_first_gives_the_rows_decode():
  """Greedy decoding of several rows on a CPU picks from vocabulary-first logits: the
  tokens and log-probabilities of a batch are those of each example decoded alone (one
  row: the [B, V] output layer, argmax and token_logprob)."""
  assert jax.default_backend() == "cpu"
  _, _, batch = _setup(2)
  batched = _run(2, "greedy")
  for b in range(len(LENGTHS)):
    alone = _run(2, "greedy", {k: v[b:b + 1] for k, v in batch.items()})
    np.testing.assert_array_equal(alone["tokens"][0], batched["tokens"][b])
    np.testing.assert_allclose(alone["logprobs"][0], batched["logprobs"][b], atol=1e-5)


def test_layers_apart_decode_alike_and_a_mismatch_is_named():
  """Per-layer weights (scan=False: inference's layout on a CPU) decode the tokens of the
  stacked model (Gemma 2: sliding window on alternate layers); params in the other
  layout than the model's are refused with the fix."""
  from paligemma.checkpoint import tree  # pylint: disable=g-import-not-at-top
  model, params, batch = _setup(2)
  apart, per_layer = model.clone(scan=False), tree.unstack_layers(params)
  got = decode.decode(apart, per_layer, batch, max_decode_len=STEPS, eos_id=None)
  want = _run(2, "greedy")
  np.testing.assert_array_equal(got["tokens"], want["tokens"])
  np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=1e-5)
  with pytest.raises(ValueError, match=r"apart .* scan=True: build it with scan=False"):
    decode.decode(model, per_layer, batch, max_decode_len=2)
  with pytest.raises(ValueError, match=r"stacked=False"):
    decode.Decoder(apart, max_decode_len=2).prefill(params, batch)


def test_beam_1_equals_greedy():
  greedy, beam = _run(2, "greedy"), _run(2, "beam(1)")
  np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
  np.testing.assert_allclose(beam["scores"], greedy["scores"], atol=1e-5)


@pytest.mark.parametrize("version", [1, 2])
def test_beam_never_below_greedy(version):
  _, params, batch = _setup(version)
  greedy, beam = _run(version, "greedy"), _run(version, "beam(4)")
  assert np.all(beam["scores"] >= greedy["scores"] - 1e-4), (beam["scores"], greedy["scores"])
  for b in range(3):  # Scores are the model's own log-likelihood of the tokens.
    ll = _log_likelihood(version, params, batch, b, beam["tokens"][b], STEPS)
    assert abs(ll - beam["scores"][b]) < 1e-3
  if version == 1:
    alone = _run(version, "beam(4)", _row(batch, 2))
    np.testing.assert_array_equal(alone["tokens"][0], beam["tokens"][2], err_msg="batched vs alone")


def test_beam_with_eos_finishes_and_scores():
  """With an eos the model emits, beams end there and still beat greedy."""
  greedy = _run(1, "greedy")
  eos = int(greedy["tokens"][0, 3])
  g, beam = _run(1, "greedy", eos_id=eos), _run(1, "beam(4)", eos_id=eos)
  assert g["lengths"][0] <= 4 and np.all(beam["scores"] >= g["scores"] - 1e-4)
  for out in (g, beam):
    for row, length in zip(out["tokens"], out["lengths"]):
      assert np.all(row[length:] == tokenizer_lib.PAD_ID)
      assert eos not in row[:length - 1].tolist()


def test_sampling_seeded_and_temperature_zero():
  a, b = _run(2, "temperature(t=1.0)", seed=7), _run(2, "temperature(t=1.0)", seed=7)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  c = _run(2, "temperature(t=1.0)", seed=8)
  assert not np.array_equal(a["tokens"], c["tokens"]), "the seed does not matter"
  greedy = _run(2, "greedy")
  # (t=1e-6: the two best logits here differ by 2e-4, so t=1e-4 would sample the second
  # about once in nine.)
  for spec in ("temperature(t=1e-6)", "temperature(0)", "topk(k=1)", "nucleus(p=1e-6)"):
    np.testing.assert_array_equal(_run(2, spec, seed=3)["tokens"], greedy["tokens"], err_msg=spec)


def test_best_of_n_keeps_the_most_likely_sample():
  _, params, batch = _setup(1)
  out = _run(1, "best_of_n(n=4, t=1.5)", seed=1)
  one = _run(1, "temperature(t=1.5)", seed=1)
  for b in range(3):
    ll = _log_likelihood(1, params, batch, b, out["tokens"][b], STEPS)
    assert abs(ll - out["scores"][b]) < 1e-3
  assert np.mean(out["scores"]) > np.mean(one["scores"])


def test_stops_at_eos_and_texts_cut_there():
  greedy = _run(1, "greedy")
  eos = int(greedy["tokens"][0, 2])
  out = _run(1, "greedy", eos_id=eos)
  first = greedy["tokens"][0].tolist().index(eos)
  np.testing.assert_array_equal(out["tokens"][0, :first + 1], greedy["tokens"][0, :first + 1])
  assert np.all(out["tokens"][0, first + 1:] == tokenizer_lib.PAD_ID)
  assert np.all(out["logprobs"][0, first + 1:] == 0)
  assert out["lengths"][0] == first + 1
  tok = tokenizer_lib.load_tokenizer()
  real = {"tokens": np.array(_run(1, "greedy", eos_id=tokenizer_lib.EOS_ID)["tokens"])}
  real["tokens"][0, 4] = tokenizer_lib.EOS_ID
  texts = decode.Decoder.texts(tok, real)
  assert texts[0] == tok.decode(real["tokens"][0, :4]) and len(texts) == 3


def test_cache_rows_and_specs():
  """Cache.repeat / take select rows on each field's row axis (index is shared); specs put
  rows on the batch axes and kv heads on "model", each only where divisible."""
  def cache(b, k):
    rows = np.arange(b)
    return Cache(k=np.zeros((2, b, 30, k, 16)) + rows[None, :, None, None, None],
                 v=np.zeros((2, b, 30, k, 16)) - rows[None, :, None, None, None],
                 pos=np.zeros((b, 30)) + rows[:, None], valid=np.zeros((b, 30), bool),
                 seq_len=rows.astype(np.int32), index=np.int32(7))
  c = cache(3, 2).repeat(2)
  assert c.k.shape == (2, 6, 30, 2, 16) and c.index == 7
  np.testing.assert_array_equal(c.seq_len, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(c.v[0, :, 0, 0, 0], [0, 0, -1, -1, -2, -2])
  t = cache(3, 2).take(jnp.array([2, 0]))
  np.testing.assert_array_equal(t.k[1, :, 5, 1, 3], [2, 0])
  np.testing.assert_array_equal(t.pos[:, 0], [2, 0])
  assert t.valid.shape == (2, 30) and t.index == 7

  mesh = types.SimpleNamespace(shape=dict(data=4, model=2))
  specs = cache(8, 2).specs(mesh)
  assert specs.k == specs.v == P(None, "data", None, "model", None)
  assert specs.pos == specs.valid == P("data", None) and specs.seq_len == P("data")
  assert specs.index == P()
  assert cache(8, 1).specs(mesh).k == P(None, "data", None, None, None)
  assert cache(6, 2).specs(mesh).k == P(None, None, None, "model", None)


def test_sharded_batch_over_a_mesh():
  """Inputs sharded over the batch axis of a mesh decode as unsharded ones."""
  model, params, batch = _setup(1)
  devices = np.array(jax.devices()[:1])
  mesh = jax.sharding.Mesh(devices, ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  sharded = {k: jax.device_put(v, spec) for k, v in batch.items()}
  replicated = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  out = _decoder(1, "greedy", None)(replicated, sharded, 0)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), _run(1, "greedy")["tokens"])
