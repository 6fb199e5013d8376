"""The fused output-layer loss and the gelu with its own gradient, against plain autodiff.

`suffix_loss_from_features` has a hand-written gradient (trainer/loss.py); here its value
and gradients are compared with jax.grad of the straightforward formula: logits =
softcap(features @ embedding.T), then `suffix_loss`. Small TOKEN_CHUNK / CHUNK_BYTES
force the chunked paths (several token chunks, skipped chunks, a vocabulary tail).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma.models import layers
from paligemma.trainer import loss as loss_lib

B, T, D, V = 3, 11, 16, 300


def _inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k[0], (B, T, D), jnp.float32)
  e = jax.random.normal(k[1], (V, D), jnp.float32) * 0.5
  targets = jax.random.randint(k[2], (B, T), 0, V)
  # Example 0: suffix at the end; example 1: no suffix (cut in its prefix); example 2: all.
  mask = np.zeros((B, T), np.int32)
  mask[0, 6:] = 1
  mask[2, :] = 1
  return x, e, targets, jnp.asarray(mask)


def _reference(x, e, targets, mask, cap, ls):
  logits = layers.softcap(jnp.einsum("BTD,VD->BTV", x, e), cap)
  return loss_lib.suffix_loss(logits, targets, mask, label_smoothing=ls)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_value_and_gradients_match_autodiff(monkeypatch, recompute, cap, ls):
  # 33 tokens in chunks of 8 (5 chunks, the last padded; only 2 hold weighted tokens);
  # vocabulary chunks of 256 rows: one whole chunk and a tail of 44.
  monkeypatch.setattr(loss_lib, "TOKEN_CHUNK", 8)
  monkeypatch.setattr(loss_lib, "CHUNK_BYTES", 256 * 4 * D)
  x, e, targets, mask = _inputs()
  fused = lambda x, e: loss_lib.suffix_loss_from_features(
      x, e, targets, mask, softcap=cap, label_smoothing=ls, recompute=recompute)
  ref = lambda x, e: _reference(x, e, targets, mask, cap, ls)
  (v1, g1), (v2, g2) = [jax.value_and_grad(f, argnums=(0, 1))(x, e) for f in (fused, ref)]
  assert abs(float(v1) - float(v2)) < 1e-5 * max(1.0, abs(float(v2)))
  for a, b, name in zip(g1, g2, ("features", "embedding")):
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0
    err = float(jnp.max(jnp.abs(a - b)))
    assert err < 1e-5 * scale, f"d loss / d {name}: max error {err} (scale {scale})"
  # Example 1 has no suffix token: its features get no gradient at all.
  assert float(jnp.max(jnp.abs(g1[0][1]))) == 0.0


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_token_rows_value_and_gradients_match_autodiff(monkeypatch, recompute, cap):
  """token_rows (config.lora.tokens): the loss of the embedding with those rows replaced,
  and its gradients for the features, the embedding (none at the replaced rows) and the
  rows, as autodiff of that table gives them."""
  monkeypatch.setattr(loss_lib, "TOKEN_CHUNK", 8)
  monkeypatch.setattr(loss_lib, "CHUNK_BYTES", 256 * 4 * D)
  x, e, targets, mask = _inputs(2)
  ids = (3, 17, 260, 299)  # In the whole chunk and in the vocabulary's tail.
  rows = jax.random.normal(jax.random.PRNGKey(7), (len(ids), D)) * 0.5
  targets = targets.at[0, 6:9].set(jnp.asarray(ids[1:]))  # Some targets are those tokens.
  fused = lambda x, e, r: loss_lib.suffix_loss_from_features(
      x, e, targets, mask, softcap=cap, label_smoothing=0.1, recompute=recompute,
      token_rows=(r, ids))
  ref = lambda x, e, r: _reference(x, e.at[jnp.asarray(ids)].set(r), targets, mask, cap, 0.1)
  (v1, g1), (v2, g2) = [jax.value_and_grad(f, argnums=(0, 1, 2))(x, e, rows)
                        for f in (fused, ref)]
  assert abs(float(v1) - float(v2)) < 1e-5 * max(1.0, abs(float(v2)))
  for a, b, name in zip(g1, g2, ("features", "embedding", "token rows")):
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0
    err = float(jnp.max(jnp.abs(a - b)))
    assert err < 1e-5 * scale, f"d loss / d {name}: max error {err} (scale {scale})"
  assert float(jnp.max(jnp.abs(g1[1][jnp.asarray(ids)]))) == 0.0


def test_bfloat16_storage_and_compute():
  x, e, targets, mask = _inputs(1)
  xb, eb = x.astype(jnp.bfloat16), e.astype(jnp.bfloat16)
  g = jax.grad(lambda x, e: loss_lib.suffix_loss_from_features(
      x, e, targets, mask, dtype="bfloat16"), argnums=(0, 1))(xb, eb)
  assert g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
  ref = jax.grad(lambda x, e: _reference(x, e, targets, mask, None, 0.0), argnums=(0, 1))(
      xb.astype(jnp.float32), eb.astype(jnp.float32))
  for a, b in zip(g, ref):
    rel = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))
    assert rel < 3e-2, rel


def test_gelu_tanh_matches_jax_gelu():
  x = jnp.linspace(-8.0, 8.0, 1001)
  np.testing.assert_allclose(layers.gelu_tanh(x), jax.nn.gelu(x, approximate=True),
                             atol=1e-6)
  g_ours = jax.vmap(jax.grad(layers.gelu_tanh))(x)
  g_jax = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(x)
  np.testing.assert_allclose(g_ours, g_jax, atol=1e-6)
