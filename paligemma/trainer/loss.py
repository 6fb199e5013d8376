"""The training loss, as big_vision's: suffix tokens only, per-example mean first.

Axis letters: B batch, T text positions, N = B * T tokens, D width, V vocabulary,
M tokens per chunk, C vocabulary rows per chunk.

Token n of example b weighs mask_loss[b, n] / max(suffix length of b, 1) / B, so the
weighted sum is the per-example mean over suffix tokens, then the batch mean; an
example cut inside its prefix has no suffix token and contributes 0. The per-token
cross-entropy is logsumexp(logits) - logits[target]; with label smoothing ls the target
is (1 - ls) one-hot + ls uniform, i.e. logsumexp - (1 - ls) logits[target] - ls mean(logits).

`suffix_loss` takes logits (evaluation). `suffix_loss_from_features` is what training
uses: the tied output layer and the loss in one function with its own gradient. The
output layer is the largest matmul of the model (V = 257,152) and its float32 logits are
the largest activation (N * V * 4 bytes: 1.3 GB for batch 10 at text length 128). No
log-probabilities are formed: the forward pass keeps one logsumexp per token, and the
backward pass writes d loss / d logits = (softmax - target) * weight in one pass. Then:
  recompute=False  fastest, memory O(N * V): one matmul over all N tokens; exp(logits -
                   max) is kept, so the backward pass needs no exp.
  recompute=True   memory O(M * C): the weighted tokens are moved to the front and taken
                   M = 128 at a time, chunks without any are skipped (prompts and padding
                   are most of a captioning batch), and the vocabulary C embedding rows at
                   a time; nothing of size V is kept, and the backward pass makes the
                   logits again. The trainer uses it with model remat.
Trainable token rows (config.lora.tokens, `token_rows`) take the place of those rows of
the embedding without a copy of it: their n logit columns are set from them, and their
gradient comes from those columns, while the embedding's own rows there get none.
"""

import functools

import jax
import jax.numpy as jnp

from paligemma.models import gemma

# Tokens per chunk (M), and the bytes aimed at by one vocabulary chunk when recomputing.
TOKEN_CHUNK = 128
CHUNK_BYTES = 128 << 20


def token_weights(mask_loss):
  """float32[B, T]: each token's weight in the loss (see the module docstring)."""
  mask = mask_loss.astype(jnp.float32)
  return mask / jnp.maximum(jnp.sum(mask, axis=-1, keepdims=True), 1.0) / mask.shape[0]


def suffix_loss(logits, targets, mask_loss, label_smoothing=0.0):
  """float32[] loss from logits float[B, T, V], targets int32[B, T], mask_loss int[B, T]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(logits, axis=-1))
  return jnp.sum(nll * token_weights(mask_loss))


def suffix_loss_from_features(features, embedding, targets, mask_loss, *, dtype="float32",
                              softcap=None, label_smoothing=0.0, recompute=False,
                              token_rows=None):
  """float32[] loss of the logits `softcap(features @ embedding.T)`, as `suffix_loss`.

  features float[B, T, D] (the final-normed LLM output, Model.text_features);
  embedding float[V, D] (llm/embedder/input_embedding, any storage dtype); the matmuls run
  in `dtype` with float32 accumulation, as the model's output layer (gemma.tied_logits).
  targets int32[B, T]; mask_loss int[B, T]. recompute: see the module docstring.
  token_rows: None, or (rows float[n, D], sorted token ids) replacing those rows of the
  embedding (config.lora.tokens, gemma.token_rows); their gradient is formed from the n
  tokens' logits alone, not through a [V, D] gradient of the embedding.
  """
  b, t, d = features.shape
  weights = token_weights(mask_loss).reshape(b * t)
  rows, ids = token_rows if token_rows is not None else (None, ())
  return _output_xent(features.reshape(b * t, d), embedding, rows, targets.reshape(b * t),
                      weights, jnp.dtype(dtype), softcap or None, float(label_smoothing),
                      bool(recompute), tuple(ids))


# -- the custom gradient ---------------------------------------------------------------
# x float[N, D], e float[V, D], t int32[N], w float32[N]; per chunk x_c float[M, D], ...


def _logits(x, e, dtype, cap):
  """float32[M, C]: the model's output layer on embedding rows e float[C, D]."""
  return gemma.tied_logits(x, e, dtype, cap)


def _target_logit(z, t, start):
  """float32[M]: z[m, t[m] - start] where the target falls in this chunk, else 0."""
  i = t - start
  inside = (i >= 0) & (i < z.shape[1])
  picked = jnp.take_along_axis(z, jnp.clip(i, 0, z.shape[1] - 1)[:, None], axis=1)[:, 0]
  return jnp.where(inside, picked, 0.0)


def _dlogits(probs, t, cols, coef, vocab, ls, cap, z):
  """d loss / d (pre-cap) logits of the vocabulary rows `cols` int32[C], float32[M, C],
  from the softmax `probs` (and the capped logits z, whose cap's derivative needs them)."""
  hit = cols[None, :] == t[:, None]
  dz = probs - jnp.where(hit, 1.0 - ls, 0.0)
  if ls:
    dz = dz - ls / vocab
  dz = dz * coef[:, None]
  if cap:
    dz = dz * (1.0 - jnp.square(z / cap))  # d cap*tanh(u/cap) / du, from the capped z.
  return dz


def _vocab_chunks(vocab, rows):
  """(number of whole chunks of `rows` from 0, start and size of the rest)."""
  full = vocab // rows
  return full, full * rows, vocab - full * rows


def _vocab_rows(tokens, width, vocab):
  """Embedding rows per vocabulary chunk when recomputing: the chunk's float32 logits
  and its float32 cast of the embedding both within CHUNK_BYTES."""
  return int(min(vocab, max(256, CHUNK_BYTES // (4 * max(tokens, width)))))


def _set_columns(z, ids, start, values):
  """z float32[M, C] (the logits of vocabulary rows start..) with its columns of the
  token `ids` that fall in it set to `values` ([M, n], or a scalar)."""
  i = jnp.asarray(ids, jnp.int32) - start
  i = jnp.where((i >= 0) & (i < z.shape[1]), i, z.shape[1])  # Outside: dropped.
  return z.at[:, i].set(values, mode="drop")


def _chunk_stats(x, e, r, ids, t, dtype, cap, ls, rows):
  """(logsumexp, target logit, sum of logits float32[M], kept for the backward pass).

  rows None: one matmul over the vocabulary; kept: exp(logits - max) and its row sums
  (the backward pass then needs no exp), or the logits when soft-capped. Else an online
  logsumexp over chunks of `rows` embedding rows, nothing kept. The columns of the token
  `ids` are the logits of their rows r.
  """
  z_r = _logits(x, r, dtype, cap) if ids else None
  logits = lambda e_c, start: (_logits(x, e_c, dtype, cap) if z_r is None else
                               _set_columns(_logits(x, e_c, dtype, cap), ids, start, z_r))
  if rows is None:
    z = logits(e, 0)
    m = jnp.max(z, axis=1)
    p = jnp.exp(z - m[:, None])
    s = jnp.sum(p, axis=1)
    zsum = jnp.sum(z, axis=1) if ls else jnp.zeros_like(s)
    return m + jnp.log(s), _target_logit(z, t, 0), zsum, z if cap else (p, s)

  def visit(carry, e_c, start):
    m, s, tgt, zsum = carry
    z = logits(e_c, start)
    m_new = jnp.maximum(m, jnp.max(z, axis=1))
    s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
    zsum = zsum + jnp.sum(z, axis=1) if ls else zsum
    return m_new, s, tgt + _target_logit(z, t, start), zsum

  zeros = jnp.zeros(x.shape[:1], jnp.float32)
  carry = (jnp.full(x.shape[:1], -jnp.inf, jnp.float32), zeros, zeros, zeros)
  full, tail_start, tail = _vocab_chunks(e.shape[0], rows)
  carry, _ = jax.lax.scan(
      lambda c, i: (visit(c, jax.lax.dynamic_slice_in_dim(e, i * rows, rows), i * rows), None),
      carry, jnp.arange(full))
  if tail:
    carry = visit(carry, e[tail_start:], tail_start)
  m, s, tgt, zsum = carry
  return m + jnp.log(s), tgt, zsum, None


def _chunk_grads(x, e, r, ids, t, lse, coef, kept, de, dtype, cap, ls, rows):
  """(dx float32[M, D], de + this chunk's d loss / d e float32[V, D], this chunk's d loss
  / d r float32[n, D] or None); de None: zeros. kept: what _chunk_stats kept (rows None),
  else the logits are made again. The columns of the token `ids` go to r, not to e."""
  vocab = e.shape[0]

  def grads(probs, z, e_c, start):
    cols = jnp.arange(probs.shape[1]) + start
    dz = _dlogits(probs, t, cols, coef, vocab, ls, cap, z)
    dz = (dz if not ids else _set_columns(dz, ids, start, 0.0)).astype(dtype)
    dx = jnp.einsum("MC,CD->MD", dz, e_c.astype(dtype), preferred_element_type=jnp.float32)
    de = jnp.einsum("MC,MD->CD", dz, x.astype(dtype), preferred_element_type=jnp.float32)
    return dx, de

  dx, dr = jnp.zeros(x.shape, jnp.float32), None
  if ids:  # The token rows' columns, from their logits (tokens of weight 0: nothing).
    z_r = _logits(x, r, dtype, cap)
    probs = jnp.where((coef != 0)[:, None], jnp.exp(z_r - lse[:, None]), 0.0)
    dz = _dlogits(probs, t, jnp.asarray(ids, jnp.int32), coef, vocab, ls, cap, z_r)
    dz = dz.astype(dtype)
    dx = jnp.einsum("MC,CD->MD", dz, r.astype(dtype), preferred_element_type=jnp.float32)
    dr = jnp.einsum("MC,MD->CD", dz, x.astype(dtype), preferred_element_type=jnp.float32)

  softmax = lambda z: jnp.exp(z - lse[:, None])
  if rows is None:
    if cap:
      dx_e, de_c = grads(softmax(kept), kept, e, 0)
    else:
      p, s = kept
      dx_e, de_c = grads(p * (1.0 / s)[:, None], None, e, 0)
    return dx + dx_e, de_c if de is None else de + de_c, dr

  def visit(carry, e_c, start):  # (The token rows' columns are zeroed: no need to set.)
    dx, de = carry
    z = _logits(x, e_c, dtype, cap)
    dx_c, de_c = grads(softmax(z), z, e_c, start)
    de_c = de_c + jax.lax.dynamic_slice_in_dim(de, start, e_c.shape[0])
    return dx + dx_c, jax.lax.dynamic_update_slice_in_dim(de, de_c, start, 0)

  de = jnp.zeros(e.shape, jnp.float32) if de is None else de
  full, tail_start, tail = _vocab_chunks(vocab, rows)
  carry, _ = jax.lax.scan(
      lambda c, i: (visit(c, jax.lax.dynamic_slice_in_dim(e, i * rows, rows), i * rows), None),
      (dx, de), jnp.arange(full))
  if tail:
    carry = visit(carry, e[tail_start:], tail_start)
  return (*carry, dr)


def _per_token(lse, target_logit, logit_sum, vocab, ls):
  """float32[M] cross-entropy (with label smoothing) from its three per-token sums."""
  if not ls:
    return lse - target_logit
  return lse - (1.0 - ls) * target_logit - ls * logit_sum / vocab


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _output_xent(x, e, r, t, w, dtype, cap, ls, recompute, ids):
  return _output_xent_fwd(x, e, r, t, w, dtype, cap, ls, recompute, ids)[0]


def _output_xent_fwd(x, e, r, t, w, dtype, cap, ls, recompute, ids):
  n, d = x.shape
  vocab = e.shape[0]
  # Without recompute: one chunk of all tokens (one matmul; what the backward needs kept).
  m = min(TOKEN_CHUNK, n) if recompute else n
  chunks = -(-n // m)
  order = None
  if chunks > 1:  # Weighted tokens first (stable), padded to whole chunks with weight 0.
    order = jnp.argsort(w == 0, stable=True)
    pad = lambda a: jnp.pad(a[order], [(0, chunks * m - n)] + [(0, 0)] * (a.ndim - 1))
    x, t, w = pad(x), pad(t), pad(w)
  xs, ts, ws = x.reshape(chunks, m, d), t.reshape(chunks, m), w.reshape(chunks, m)
  live = (jnp.count_nonzero(w) + m - 1) // m  # Chunks holding a weighted token.
  rows = _vocab_rows(m, d, vocab) if recompute else None

  def stats(x_c, t_c, w_c):
    lse, tgt, zsum, kept = _chunk_stats(x_c, e, r, ids, t_c, dtype, cap, ls, rows)
    return jnp.sum(w_c * _per_token(lse, tgt, zsum, vocab, ls)), lse, kept

  # The first chunk always (no zeros to start from); the others only where live.
  first = stats(xs[0], ts[0], ws[0])

  def body(_, chunk):  # (Only with recompute, which keeps nothing of size V.)
    i, x_c, t_c, w_c = chunk
    skip = lambda: (jnp.zeros([], jnp.float32), jnp.zeros((m,), jnp.float32))
    return None, jax.lax.cond(i < live, lambda: stats(x_c, t_c, w_c)[:2], skip)

  loss, lse = first[0], first[1][None]
  if chunks > 1:
    _, rest = jax.lax.scan(body, None, (jnp.arange(1, chunks), xs[1:], ts[1:], ws[1:]))
    loss, lse = loss + jnp.sum(rest[0]), jnp.concatenate([lse, rest[1]])
  return loss, (xs, e, r, ts, ws, order, live, lse, first[2])


def _output_xent_bwd(dtype, cap, ls, recompute, ids, res, g):
  xs, e, r, ts, ws, order, live, lse, kept = res
  chunks, m, d = xs.shape
  rows = _vocab_rows(m, d, e.shape[0]) if recompute else None
  grads = lambda i, de, kept=None: _chunk_grads(
      xs[i], e, r, ids, ts[i], lse[i], ws[i] * g, kept, de, dtype, cap, ls, rows)
  dx, de, dr = grads(0, None, kept)

  def body(carry, i):
    def skip(carry):
      return jnp.zeros((m, d), jnp.float32), *carry

    def run(carry):
      de, dr = carry
      dx, de, dr_c = grads(i, de)
      return dx, de, dr if dr_c is None else dr + dr_c

    dx, *carry = jax.lax.cond(i < live, run, skip, carry)
    return tuple(carry), dx

  if chunks > 1:
    (de, dr), dxs = jax.lax.scan(body, (de, dr), jnp.arange(1, chunks))
    dx = jnp.concatenate([dx[None], dxs]).reshape(chunks * m, d)
    dx = dx[jnp.argsort(order)]  # Back to the token order (and without the padding).
  return (dx.astype(xs.dtype), de.astype(e.dtype), None if dr is None else dr.astype(r.dtype),
          None, None)


_output_xent.defvjp(_output_xent_fwd, _output_xent_bwd)
