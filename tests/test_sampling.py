"""Choosing tokens from logits: argmax in both layouts, log-probabilities, the samplers'
draws against exact distributions, the filters against a sort, beam steps, spec strings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma import sampling


@pytest.mark.parametrize("vocab", [320, 328, 301])  # Blocks of 32, of 8, none.
def test_argmax_and_token_logprob(vocab):
  """sampling.argmax is jnp.argmax (first of tied maxima) on [B, V] and [V, B] logits;
  token_logprob and pick_vocab_first give log_softmax."""
  rng = np.random.default_rng(vocab)
  logits = rng.normal(size=(6, vocab)).astype(np.float32)
  logits[1, [7, 200]] = 9.0  # Tied, in different blocks: the first wins.
  logits[2, [41, 40]] = 9.0  # Tied within one block.
  logits[3, :150] = -np.inf  # Masked entries.
  logits[4] = 0.0  # All equal.
  logits[5, vocab - 1] = 9.0  # The very last one.
  tokens = np.asarray(sampling.argmax(jnp.asarray(logits)))
  np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
  assert tokens.tolist()[1:3] == [7, 40] and tokens[4] == 0 and tokens[5] == vocab - 1
  np.testing.assert_array_equal(sampling.argmax(jnp.asarray(logits.T), axis=0), tokens)
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float64), axis=-1))
  pick = rng.integers(150, vocab, 6).astype(np.int32)
  np.testing.assert_allclose(sampling.token_logprob(jnp.asarray(logits), pick),
                             logp[np.arange(6), pick], atol=1e-5)
  # Vocabulary-first logits [V, B] (greedy on a CPU): the same tokens, their log-probability.
  first, first_logp = sampling.pick_vocab_first(jnp.asarray(logits.T))
  np.testing.assert_array_equal(first, tokens)
  np.testing.assert_allclose(first_logp, logp[np.arange(6), tokens], atol=1e-5)


def test_beam_choices_equal_one_top_k_over_all_continuations():
  """beam_choices = log_softmax, finished beams' single pad continuation, then one
  top_k over all k * V totals (numpy, stable sort: ties to the lower index)."""
  rng = np.random.default_rng(0)
  b, k, v, pad = 3, 4, 40, 0
  logits = rng.normal(size=(b * k, v)).astype(np.float32)
  logits[1, [3, 9]] = logits[1].max() + 1  # A tie within a beam.
  logits[5] = logits[4]  # Two beams alike: ties across beams.
  scores = np.sort(rng.normal(size=(b, k)).astype(np.float32), axis=1)[:, ::-1].copy()
  scores[1, 1] = scores[1, 0]
  done = np.zeros((b, k), bool)
  done[0, 2] = done[2, 0] = True
  got = [np.asarray(a) for a in jax.jit(sampling.beam_choices, static_argnums=3)(
      jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(done), pad)]
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1)).reshape(b, k, v)
  logp = np.where(done[..., None], np.where(np.arange(v) == pad, 0.0, -np.inf), logp)
  total = (scores[..., None] + logp).reshape(b, k * v)
  order = np.argsort(-total, axis=1, kind="stable")[:, :k]
  np.testing.assert_allclose(got[0], np.take_along_axis(total, order, 1), atol=1e-5)
  np.testing.assert_array_equal(got[1], order // v)
  np.testing.assert_array_equal(got[2], order % v)
  np.testing.assert_allclose(got[3], np.take_along_axis(logp.reshape(b, k * v), order, 1),
                             atol=1e-5)


def test_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top2 = sampling.filter_logits(logits, 1.0, top_k=2)
  assert np.isfinite(np.asarray(top2)).tolist() == [[True, True, False, False]]
  for p, keep in ((0.5, 1), (0.7, 2), (0.8, 2), (0.9, 3), (1.0, 4)):
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, 1.0, top_p=p)))
    assert kept.sum() == keep, (p, kept)
  hot = sampling.filter_logits(logits, 0.5)
  np.testing.assert_allclose(hot, logits / 0.5)


@pytest.mark.parametrize("vocab", [256, 300])  # Whole blocks of 64, and a padded last one.
def test_sample_softmax_draws_from_the_softmax(vocab):
  """sample_softmax's tokens follow softmax(logits); -inf entries are never drawn."""
  rng = np.random.default_rng(vocab)
  logits = rng.normal(size=vocab).astype(np.float32) * 2
  logits[rng.permutation(vocab)[:vocab // 3]] = -np.inf
  logits[[3, 70, vocab - 1]] = [4.0, 4.0, 3.5]  # Heavy tokens in the first and last blocks.
  want = np.exp(logits.astype(np.float64) - logits.max())
  want /= want.sum()
  n = 8000
  keys = jax.random.split(jax.random.PRNGKey(vocab), n)
  tokens = np.asarray(jax.jit(sampling.sample_softmax)(keys, jnp.asarray(np.tile(logits, (n, 1)))))
  assert tokens.dtype == np.int32 and np.all(np.isfinite(logits[tokens]))
  freq = np.bincount(tokens, minlength=vocab) / n
  assert np.abs(freq - want).max() < 4.5 * np.sqrt(want.max() / n), (freq, want)


@pytest.mark.parametrize("top_k, top_p", [
    (3, 1.0), (0, 0.6), (4, 0.9),  # Kept sets within the 8 candidates: drawn among them.
    (12, 1.0), (0, 0.97), (12, 0.99)])  # Beyond them: the whole sorted vocabulary.
def test_sample_filtered_draws_from_the_filtered_softmax(top_k, top_p):
  """sample_filtered's tokens follow softmax over the tokens top-k / nucleus keep,
  computed here in float64 from a sort, on both of its paths."""
  rng = np.random.default_rng(top_k)
  logits = np.sort(rng.normal(size=30))[::-1] * 1.5
  logits = logits[rng.permutation(30)].astype(np.float32)
  logits[5] = logits[9]  # A tie.
  order = np.argsort(-logits.astype(np.float64), kind="stable")
  probs = np.exp(logits[order] - logits.max())
  probs /= probs.sum()
  kept = np.ones(30, bool)
  if top_k:
    kept &= logits >= logits[order][top_k - 1]
  before = np.cumsum(probs) - probs
  kept &= logits >= logits[order][before < top_p].min()
  want = np.where(kept, np.exp(logits - logits.max()), 0)
  want /= want.sum()
  n = 6000
  keys = jax.random.split(jax.random.PRNGKey(top_k), n)
  tokens = np.asarray(jax.jit(sampling.sample_filtered, static_argnums=4)(
      keys, jnp.asarray(np.tile(logits, (n, 1))), top_k, top_p, 8))
  assert np.all(kept[tokens]), "a token the filters drop was drawn"
  freq = np.bincount(tokens, minlength=30) / n
  assert np.abs(freq - want).max() < 4.5 * np.sqrt(want.max() / n), (freq, want)


def _sorted_filter(logits, k, p):
  """bool[B, V]: what top-k (0: off) and the nucleus (1: off) keep, from a float64 sort."""
  keep = []
  for row in logits.astype(np.float64):
    desc = np.sort(row)[::-1]
    kept = np.ones(len(row), bool)
    if k > 0:
      kept &= row >= desc[min(k, len(row)) - 1]
    probs = np.exp(desc - desc.max())
    probs /= probs.sum()
    if p < 1:
      kept &= row >= desc[np.cumsum(probs) - probs < p].min()
    keep.append(kept & (row > -np.inf))
  return np.array(keep)


@pytest.mark.parametrize("k, p", [(3, 1.0), (0, 0.5), (10, 0.9), (0, 0.999), (64, 0.3),
                                  (400, 1.0)])
def test_filters_equal_a_sorted_reference(k, p):
  """filter_logits' bisection keeps what a sort keeps: ties, -inf, +-0 and k > V too."""
  rng = np.random.default_rng(k)
  filt = jax.jit(sampling.filter_logits)
  for vocab in (50, 300):
    logits = (rng.normal(size=(4, vocab)) * rng.uniform(0.1, 5, (4, 1))).astype(np.float32)
    logits[0, :5] = logits[0, 7]
    logits[1, :vocab // 2] = -np.inf
    logits[2, :3], logits[2, 3:5] = 0.0, -0.0
    kept = np.asarray(filt(jnp.asarray(logits), 1.0, k, p)) > -np.inf
    np.testing.assert_array_equal(kept, _sorted_filter(logits, k, p), err_msg=f"vocab {vocab}")


def test_parse_sampler():
  s = sampling.parse_sampler
  assert s(None) == s("greedy") == sampling.Sampler()
  assert s("beam(4)") == sampling.Sampler("beam", n=4)
  assert s("nucleus(p=0.9, t=0.5)") == sampling.Sampler("nucleus", temperature=0.5, top_p=0.9)
  assert s({"kind": "topk", "top_k": 5}).top_k == 5
  for bad in ("beam(x=3)", "foo", "nucleus(p=2)", "beam(1, 2)", "import os"):
    with pytest.raises(ValueError):
      s(bad)
