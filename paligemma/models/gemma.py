"""Gemma 1 and Gemma 2 decoders (big_vision parameter names), with an explicit KV cache.

Axis letters: B batch, T query positions, S key/value positions (cache slots),
D width, N query heads, K key/value heads, G query heads per kv head (N = K*G),
H head dim, F mlp dim, V vocabulary, L layers.

The KV cache is explicit (no flax "cache" collection) so that decoding is a pure
function of (params, cache, tokens): the layers take and return k, v float[L, B, S, K, H],
written at one slot index shared by the batch; which slots are real and their positions
are tracked by the caller (`paligemma.models.cache.Cache`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma import lora as lora_lib
from paligemma.models import layers
from paligemma.models import variants

class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * (1 + scale), computed in float32."""
  eps: float = 1e-6
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * (1 + scale.astype(jnp.float32))).astype(x.dtype)


def fan_in_normal(fan_in_axes):
  """Initializer: normal with variance 1 / fan_in, fan_in the product of `fan_in_axes`.

  Only training from scratch sees it (released weights are always loaded). At Gemma's
  widths it is close to the usual 0.02; at the tiny widths a fixed 0.02 leaves every
  layer near zero, and the image tokens barely move the text (the shapes demo stalled
  with the shape word at chance until the init followed the width)."""
  def init(key, shape, dtype=jnp.float32):
    fan_in = 1
    for axis in fan_in_axes:
      fan_in *= shape[axis]
    return jax.random.normal(key, shape, dtype) * jnp.asarray(fan_in ** -0.5, dtype)
  return init


class Einsum(layers.Layer):
  """A single weight `w` used in an einsum (the Gemma naming)."""
  shape: tuple
  fan_in_axes: tuple = (-2,)  # The contracted input dims of `shape`.

  @nn.compact
  def __call__(self, eqn, x):
    w = self.weight("w", fan_in_normal(self.fan_in_axes), self.shape)
    y = layers.cast_einsum(eqn, x, w, self.dtype)
    return layers.add_adapter(y, self.adapter("w", self.shape, eqn, x))


def apply_rope(x, positions, max_wavelength=10_000):
  """RoPE, split-half layout. x: float[B, T, N, H], positions: int32[B, T]."""
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (2 * jnp.arange(half, dtype=jnp.float32) / x.shape[-1])
  angles = positions[..., None, None].astype(jnp.float32) / timescale  # [B, T, 1, H/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(layers.Layer):
  """Multi-query / grouped-query / multi-head attention with RoPE and optional soft-cap."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_pre_attn_scalar: float
  attn_logits_softcap: float | None = None
  rope_max_wavelength: int = 10_000

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    """float[B, T, D], int32[B, T], bool[B, T, S] -> (float[B, T, D], (k, v) or None).

    Without a cache, S == T and keys are the tokens themselves. With a cache
    (k, v float[B, S, K, H]), this step's keys are written at slot `cache_index` first.
    """
    n, kh, h, d = self.num_heads, self.num_kv_heads, self.head_dim, x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    if n == kh:
      q, k, v = Einsum((3, n, d, h), name="qkv_einsum", **kw)("BTD,SNDH->SBTNH", x)
    else:
      q = Einsum((n, d, h), name="q_einsum", **kw)("BTD,NDH->BTNH", x)
      k, v = Einsum((2, kh, d, h), name="kv_einsum", **kw)("BTD,SKDH->SBTKH", x)
    q = apply_rope(q, positions, self.rope_max_wavelength) * self.query_pre_attn_scalar ** -0.5
    k = apply_rope(k, positions, self.rope_max_wavelength)

    if cache is not None:
      k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, cache_index, 0, 0))
      new_cache = (k, v)
    else:
      new_cache = None

    out = layers.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.attn_logits_softcap)
    out = Einsum((n, h, d), name="attn_vec_einsum", fan_in_axes=(0, 1), **kw)(
        "BTNH,NHD->BTD", out)
    return out, new_cache


class FeedForward(layers.Layer):
  """GeGLU: gelu(x W_gate) * (x W_up) W_down, weights `gating_einsum` and `linear`."""
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    gating_shape, linear_shape = (2, d, self.mlp_dim), (self.mlp_dim, d)
    gating = self.weight("gating_einsum", fan_in_normal((1,)), gating_shape)
    linear = self.weight("linear", fan_in_normal((0,)), linear_shape)
    # A batch of two matrices (layers.cast_einsum): both halves read in place.
    gate, up = layers.cast_einsum("...D,SDF->S...F", x, gating, self.dtype)
    delta = self.adapter("gating_einsum", gating_shape, "...D,SDF->S...F", x)
    if delta is not None:
      gate, up = layers.add_adapter(gate, delta[0]), layers.add_adapter(up, delta[1])
    h = layers.gelu_tanh(gate) * up
    return layers.add_adapter(layers.cast_einsum("...F,FD->...D", h, linear, self.dtype),
                              self.adapter("linear", linear_shape, "...F,FD->...D", h))


class Block(layers.Layer):
  """One decoder layer; Gemma 2 adds post-attention and post-ffw norms."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  query_pre_attn_scalar: float
  post_norms: bool = False
  attn_logits_softcap: float | None = None
  rope_max_wavelength: int = 10_000
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, xs, positions, mask, mask_local, cache_index):
    """x float[B, T, D]; xs = {is_local: bool[], cache: (k, v) or None} -> (x, new cache)."""
    norm = lambda name: RMSNorm(self.norm_eps, self.param_dtype, name=name)
    mask = jnp.where(xs["is_local"], mask_local, mask)
    y = norm("pre_attention_norm")(x)
    y, new_cache = Attention(
        self.num_heads, self.num_kv_heads, self.head_dim, self.query_pre_attn_scalar,
        self.attn_logits_softcap, self.rope_max_wavelength, dtype=self.dtype,
        param_dtype=self.param_dtype, lora=self.lora, name="attn")(y, positions, mask, xs["cache"], cache_index)
    if self.post_norms:
      y = norm("post_attention_norm")(y)
    x = x + y
    y = norm("pre_ffw_norm")(x)
    y = FeedForward(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                    lora=self.lora, name="mlp")(y)
    if self.post_norms:
      y = norm("post_ffw_norm")(y)
    return x + y, new_cache


class Gemma(nn.Module):
  """Gemma decoder: `embed` for tokens, `__call__` for the layers, `logits` for the tied
  output layer."""
  config: variants.GemmaConfig
  scan: bool = True
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora: layers.lora_lib.LoraConfig | None = None

  def setup(self):
    cfg = self.config
    self.embedder = Embedder(cfg.vocab_size, cfg.width, dtype=self.dtype,
                             param_dtype=self.param_dtype, lora=self.lora, name="embedder")
    kw = dict(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, mlp_dim=cfg.mlp_dim,
              query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
              post_norms=cfg.post_norms, attn_logits_softcap=cfg.attn_logits_softcap,
              rope_max_wavelength=cfg.rope_max_wavelength, norm_eps=cfg.norm_eps,
              dtype=self.dtype, param_dtype=self.param_dtype, lora=self.lora)
    block = layers.maybe_remat(Block, self.remat_policy)
    if self.scan:
      self.layers = layers.scan_layers(
          block, cfg.depth, in_axes=(0,) + (nn.broadcast,) * 4)(name="layers", **kw)
    else:
      self.layers = [block(name=f"layers_{i}", **kw) for i in range(cfg.depth)]
    self.final_norm = RMSNorm(cfg.norm_eps, self.param_dtype, name="final_norm")

  def embed(self, tokens):
    """int32[B, T] -> float[B, T, D], scaled by sqrt(D)."""
    return self.embedder.encode(tokens)

  def logits(self, x):
    """float[B, ..., D] (final-normed) -> float32[B, ..., V] (see `tied_logits`)."""
    e = self.embedder
    rows = None if e.token_rows is None else (e.token_rows, e.token_ids)
    return output_logits(x, e.input_embedding, rows, self.dtype, self.config.final_logits_softcap)

  def is_local(self):
    """bool[L]: which layers use the sliding window (even ones, as transformers)."""
    local = jnp.arange(self.config.depth) % 2 == 0
    return local if self.config.sliding_window else jnp.zeros_like(local)

  def __call__(self, x, positions, mask, mask_local=None, cache=None, cache_index=None):
    """Runs the layers and the final norm.

    x float[B, T, D]; positions int32[B, T]; mask, mask_local bool[B, T, S] (mask_local
    used on sliding-window layers); cache None or (k, v) float[L, B, S, K, H].
    Returns (float[B, T, D], new cache or None).
    """
    mask_local = mask if mask_local is None else mask_local
    xs = {"is_local": self.is_local(), "cache": cache}
    if self.scan:
      x, new_cache = self.layers(x, xs, positions, mask, mask_local, cache_index)
    else:
      per_layer = []
      for i, layer in enumerate(self.layers):
        x, c = layer(x, jax.tree.map(lambda a, i=i: a[i], xs), positions, mask, mask_local,
                     cache_index)
        per_layer.append(c)
      new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *per_layer)
    return self.final_norm(x), new_cache


class Embedder(layers.Layer):
  """Token embedding table `input_embedding` float[V, D], shared with the output layer;
  with config.lora.tokens, the trainable rows `input_embedding_lora_tokens` float[n, D]
  (paligemma/lora.py) replace those tokens' rows in both."""
  vocab_size: int
  width: int

  def setup(self):
    # Rows of norm ~1 after the sqrt(width) scaling; the tied output layer then starts
    # with logits of unit scale (stddev 1 gave an initial loss near 60 on the tiny model).
    self.input_embedding = self.param(
        "input_embedding", nn.initializers.normal(stddev=self.width ** -0.5),
        (self.vocab_size, self.width), self.param_dtype)
    self.token_ids = lora_lib.token_ids(self.lora.tokens if self.lora else (), self.vocab_size)
    self.token_rows = None
    if self.token_ids:  # Starting as the base's rows (the trainer copies the loaded ones).
      self.token_rows = self.param(
          lora_lib.TOKENS_PARAM,
          lambda *_: jnp.take(self.input_embedding, jnp.asarray(self.token_ids), axis=0))

  def encode(self, tokens):
    x = lora_lib.embed(self.input_embedding, self.token_rows, self.token_ids, tokens)
    return x.astype(self.dtype) * jnp.sqrt(self.width).astype(self.dtype)


def token_rows(params, lora):
  """(rows float[n, D], their sorted token ids) of config.lora.tokens from the params
  tree, or None: for the loss and the decoder, which apply the output layer outside the
  model."""
  embedder = params["llm"]["embedder"]
  rows = embedder.get(lora_lib.TOKENS_PARAM)
  if rows is None:
    return None
  return rows, lora_lib.token_ids(lora.tokens, embedder["input_embedding"].shape[0])


def output_logits(x, embedding, rows, dtype, softcap=None, vocab_first=False):
  """`tied_logits`, the columns of the trainable tokens (`rows`: token_rows, or None)
  computed from their rows: the logits of lora.embedding_table's table, without it."""
  z = tied_logits(x, embedding, dtype, softcap, vocab_first)
  return with_token_rows(z, x, rows, dtype, softcap, vocab_first)


def with_token_rows(z, x, rows, dtype, softcap=None, vocab_first=False):
  """Logits z float32[..., V] (vocab_first: [V, ...]) of features x with the trainable
  tokens' entries set from their rows (`rows`: token_rows, or None: z as it is)."""
  if rows is None:
    return z
  r, ids = rows
  ids = jnp.asarray(ids, jnp.int32)
  z_r = tied_logits(x, r, dtype, softcap, vocab_first)
  return z.at[ids].set(z_r) if vocab_first else z.at[..., ids].set(z_r)


def tied_logits(x, embedding, dtype, softcap=None, vocab_first=False):
  """The tied output layer: float[..., D] (final-normed features) and the embedding
  float[V, D] -> float32[..., V], one matmul in `dtype` with float32 accumulation, then
  the soft-cap (None or 0: none). Used by the model, the decoder and the loss alike.

  vocab_first: the same logits as float32[V, ...] (the decoder's greedy pick on a CPU,
  where that matmul is faster and the pick reduces over the leading axis)."""
  x, embedding = x.astype(dtype), embedding.astype(dtype)
  z = (jnp.einsum("VD,...D->V...", embedding, x, preferred_element_type=jnp.float32)
       if vocab_first else
       jnp.einsum("...D,VD->...V", x, embedding, preferred_element_type=jnp.float32))
  return layers.softcap(z, softcap)
