"""PaliGemma: SigLIP ViT -> linear projector -> Gemma, with the prefix-LM attention mask.

Axis letters: B batch, N image tokens, T text tokens, S sequence or cache slots,
D LLM width, V vocabulary.

Sequence layout: [image tokens][text tokens]. Image tokens have mask_ar 0 and join the
prefix block. Token i attends token j iff cumsum(mask_ar)[j] <= cumsum(mask_ar)[i] and
j is a real token; on Gemma 2 sliding-window layers additionally
position[i] - position[j] < window, unless i and j are in the same bidirectional block.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from paligemma import lora as lora_lib
from paligemma.models import gemma, variants, vit
from paligemma.models.cache import Cache


def attention_mask(mask_ar, mask_input):
  """bool[B, S, S] from int[B, S] mask_ar and mask_input (see the module docstring)."""
  cum = jnp.cumsum(mask_ar, axis=-1)
  return (cum[:, None, :] <= cum[:, :, None]) & mask_input[:, None, :].astype(bool)


def positions_from_mask(mask_input):
  """int32[B, S]: RoPE positions counting only real tokens (pads get their index)."""
  cum = jnp.cumsum(mask_input, axis=-1) - 1
  return jnp.where(mask_input.astype(bool), cum, jnp.arange(mask_input.shape[-1])).astype(jnp.int32)


def sliding_window_mask(mask, pos_q, pos_kv, window, same_block=None):
  """Restricts bool[B, T, S] to pos_q - pos_kv < window (except within `same_block`)."""
  if not window:
    return mask
  near = (pos_q[:, :, None] - pos_kv[:, None, :]) < window
  if same_block is not None:
    near = near | same_block
  return mask & near


class Model(nn.Module):
  """The joined model: SigLIP ViT `img`, linear projector, Gemma `llm`.

  img, llm: the tower configs, a `variants.ViTConfig` / `GemmaConfig` or a config dict
  (resolved once, here at construction), so the model is hashable: a static jit argument.
  The methods return the LLM's features; `__call__` also applies the tied output layer
  (`gemma.tied_logits`), which the trainer's loss and the decoder apply themselves.
  """
  img: variants.ViTConfig
  llm: variants.GemmaConfig
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan: bool = True
  remat_policy: str = "none"
  lora: lora_lib.LoraConfig | None = None  # Adapters (paligemma/lora.py); None: none.

  def __post_init__(self):
    # Flax freezes a module's fields in its own __post_init__: resolve them before.
    object.__setattr__(self, "img", variants.ViTConfig.from_dict(self.img))
    object.__setattr__(self, "llm", variants.GemmaConfig.from_dict(self.llm))
    object.__setattr__(self, "lora", lora_lib.LoraConfig.from_dict(self.lora))
    super().__post_init__()

  def setup(self):
    vit.check_image_size(self.img.image_size, self.img.patch_size)
    kw = dict(scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
              param_dtype=self.param_dtype, lora=self.lora)
    self._img = vit.ViT(self.img, num_classes=self.llm.width, name="img", **kw)
    self._llm = gemma.Gemma(self.llm, name="llm", **kw)

  @property
  def num_image_tokens(self):
    return self.img.num_tokens

  def _check_length(self, text_len):
    limit = self.llm.max_len
    if self.num_image_tokens + text_len > limit:
      raise ValueError(
          f"Sequence of {self.num_image_tokens} image + {text_len} text tokens exceeds the "
          f"model's limit of {limit} (llm.max_len): shorten text_len or max_decode_len")

  def embed_image(self, image):
    """float32[B, H, W, 3] in [-1, 1] -> float[B, N, D] (projected, not scaled)."""
    zimg, _ = self._img(image)
    return zimg

  def _embed_sequence(self, image, text, mask_ar, mask_input):
    """Image then text embeddings, and the masks extended over the image tokens."""
    self._check_length(text.shape[1])
    zimg = self.embed_image(image)
    ztxt = self._llm.embed(text)
    b, n = zimg.shape[:2]
    x = jnp.concatenate([zimg.astype(ztxt.dtype), ztxt], axis=1)
    mask_input = jnp.ones_like(text) if mask_input is None else mask_input
    ones = jnp.ones((b, n), jnp.int32)
    full_ar = jnp.concatenate([0 * ones, mask_ar.astype(jnp.int32)], axis=1)
    full_input = jnp.concatenate([ones, mask_input.astype(jnp.int32)], axis=1)
    return x, full_ar, full_input

  def _masks(self, full_ar, full_input, num_slots=None):
    """Global and sliding-window masks bool[B, S, num_slots] and positions int32[B, S]."""
    mask = attention_mask(full_ar, full_input)
    pos = positions_from_mask(full_input)
    cum = jnp.cumsum(full_ar, axis=-1)
    local = sliding_window_mask(mask, pos, pos, self.llm.sliding_window,
                                cum[:, :, None] == cum[:, None, :])
    if num_slots is not None:
      pad = [(0, 0), (0, 0), (0, num_slots - mask.shape[-1])]
      mask, local = jnp.pad(mask, pad), jnp.pad(local, pad)
    return mask, local, pos

  def _forward(self, image, text, mask_ar, mask_input):
    """float[B, N + T, D]: the final-normed LLM output over image and text tokens."""
    x, full_ar, full_input = self._embed_sequence(image, text, mask_ar, mask_input)
    mask, local, pos = self._masks(full_ar, full_input)
    x, _ = self._llm(x, pos, mask, local)
    return x

  def __call__(self, image, text, mask_ar, mask_input=None):
    """Prefix-LM forward pass.

    image float32[B, H, W, 3] in [-1, 1]; text int32[B, T]; mask_ar int32[B, T];
    mask_input int32[B, T] (1 on real tokens; default all ones).
    Returns (logits float32[B, T, V] at the text positions, aux dict).
    """
    x = self._forward(image, text, mask_ar, mask_input)
    n = self.num_image_tokens
    text_out = x[:, n:]
    return self._llm.logits(text_out), {"img/zimg": x[:, :n], "llm/pre_logits": text_out}

  def text_features(self, image, text, mask_ar, mask_input=None):
    """float[B, T, D]: what the output layer reads at the text positions (`__call__`'s
    logits are `gemma.tied_logits` of these). The trainer applies the output layer inside
    its loss (trainer/loss.py), which can then skip positions outside the loss and split
    the vocabulary."""
    return self._forward(image, text, mask_ar, mask_input)[:, self.num_image_tokens:]

  def prefill(self, image, text, mask_ar, mask_input, cache_size):
    """Fills a KV cache of `cache_size` slots with image + prompt.

    Prompts are right-padded (mask_input 0 on pads). Returns (features float[B, D] of each
    prompt's last real token, what the output layer reads for the first new token;
    the `cache.Cache`).
    """
    x, full_ar, full_input = self._embed_sequence(image, text, mask_ar, mask_input)
    b, t = x.shape[:2]
    if cache_size < t:
      raise ValueError(f"cache_size {cache_size} is smaller than the prompt ({t} tokens)")
    self._check_length(cache_size - self.num_image_tokens)
    mask, local, pos = self._masks(full_ar, full_input, cache_size)
    shape = (self.llm.depth, b, cache_size, self.llm.num_kv_heads, self.llm.head_dim)
    empty = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
    x, (k, v) = self._llm(x, pos, mask, local, empty, 0)
    seq_len = jnp.sum(full_input, axis=-1).astype(jnp.int32)
    # Prompts are right-padded, so the last real token sits at index seq_len - 1.
    last = jnp.take_along_axis(x, (seq_len - 1)[:, None, None], axis=1)[:, 0]
    pad = [(0, 0), (0, cache_size - t)]
    cache = Cache(k=k, v=v, pos=jnp.pad(pos, pad), valid=jnp.pad(full_input, pad).astype(bool),
                  index=jnp.asarray(t, jnp.int32), seq_len=seq_len)
    return last, cache

  def extend(self, tokens, cache):
    """Appends one token per example: int32[B] -> (features float[B, D], Cache)."""
    index, seq_len = cache.index, cache.seq_len
    valid = jax.lax.dynamic_update_slice(cache.valid, jnp.ones_like(seq_len, bool)[:, None],
                                         (0, index))
    pos = jax.lax.dynamic_update_slice(cache.pos, seq_len[:, None], (0, index))
    mask = valid[:, None, :]
    local = sliding_window_mask(mask, seq_len[:, None], pos, self.llm.sliding_window)
    x = self._llm.embed(tokens[:, None])
    x, (k, v) = self._llm(x, seq_len[:, None], mask, local, (cache.k, cache.v), index)
    cache = Cache(k=k, v=v, pos=pos, valid=valid, index=index + 1, seq_len=seq_len + 1)
    return x[:, 0], cache
