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

from paligemma.models import gemma, variants, vit


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
  """The joined model. `img` and `llm` are tower configs (see models/variants.py)."""
  img: dict
  llm: dict
  param_dtype: str = "float32"
  dtype: str = "float32"
  scan: bool = True
  remat_policy: str = "none"

  def setup(self):
    img_cfg, llm_cfg = variants.resolve_vit(self.img), variants.resolve_gemma(self.llm)
    vit.check_image_size(img_cfg["image_size"], img_cfg["patch_size"])
    kw = dict(scan=self.scan, remat_policy=self.remat_policy, dtype=self.dtype,
              param_dtype=self.param_dtype)
    self._img = vit.ViT(**img_cfg, num_classes=llm_cfg["width"], name="img", **kw)
    self._llm = gemma.Gemma(**llm_cfg, name="llm", **kw)

  @property
  def num_image_tokens(self):
    cfg = variants.resolve_vit(self.img)
    return (cfg["image_size"] // cfg["patch_size"]) ** 2

  def _check_length(self, text_len):
    limit = variants.resolve_gemma(self.llm)["max_len"]
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
    window = variants.resolve_gemma(self.llm)["sliding_window"]
    local = sliding_window_mask(mask, pos, pos, window, cum[:, :, None] == cum[:, None, :])
    if num_slots is not None:
      pad = [(0, 0), (0, 0), (0, num_slots - mask.shape[-1])]
      mask, local = jnp.pad(mask, pad), jnp.pad(local, pad)
    return mask, local, pos

  @property
  def final_logits_softcap(self):
    """The cap of the output logits (None or 0: none), as `logits` applies it."""
    return variants.resolve_gemma(self.llm)["final_logits_softcap"]

  def _forward(self, image, text, mask_ar, mask_input):
    """float[B, N + T, D]: the final-normed LLM output over image and text tokens."""
    x, full_ar, full_input = self._embed_sequence(image, text, mask_ar, mask_input)
    mask, local, pos = self._masks(full_ar, full_input)
    x, _ = self._llm(x, pos, mask, local)
    return x

  def __call__(self, image, text, mask_ar, mask_input=None, train=False):
    """Prefix-LM forward pass.

    image float32[B, H, W, 3] in [-1, 1]; text int32[B, T]; mask_ar int32[B, T];
    mask_input int32[B, T] (1 on real tokens; default all ones).
    Returns (logits float32[B, T, V] at the text positions, aux dict).
    """
    del train  # No dropout in PaliGemma; kept for a uniform training signature.
    x = self._forward(image, text, mask_ar, mask_input)
    n = self.num_image_tokens
    text_out = x[:, n:]
    return self._llm.logits(text_out), {"img/zimg": x[:, :n], "llm/pre_logits": text_out}

  def text_features(self, image, text, mask_ar, mask_input=None):
    """float[B, T, D]: what the output layer reads at the text positions (`__call__`'s
    logits are these times `llm/embedder/input_embedding`, soft-capped). The trainer
    applies the output layer inside its loss (trainer/loss.py), which can then skip
    positions outside the loss and split the vocabulary."""
    return self._forward(image, text, mask_ar, mask_input)[:, self.num_image_tokens:]

  def prefill(self, image, text, mask_ar, mask_input, cache_size, head=None):
    """Fills a KV cache of `cache_size` slots with image + prompt.

    Prompts are right-padded (mask_input 0 on pads). Returns (logits float32[B, V] of each
    prompt's last real token, cache).
    cache: k, v float[L, B, S, K, H]; pos int32[B, S]; valid bool[B, S];
    index int32[] (next slot, shared); seq_len int32[B] (next position of each example).
    head: optional float[D, V], the embedding transposed, for the output layer
    (decode.output_head: faster on CPU).
    """
    x, full_ar, full_input = self._embed_sequence(image, text, mask_ar, mask_input)
    b, t = x.shape[:2]
    if cache_size < t:
      raise ValueError(f"cache_size {cache_size} is smaller than the prompt ({t} tokens)")
    self._check_length(cache_size - self.num_image_tokens)
    mask, local, pos = self._masks(full_ar, full_input, cache_size)
    cfg = variants.resolve_gemma(self.llm)
    shape = (cfg["depth"], b, cache_size, cfg["num_kv_heads"], cfg["head_dim"])
    empty = (jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype))
    x, (k, v) = self._llm(x, pos, mask, local, empty, 0)
    seq_len = jnp.sum(full_input, axis=-1).astype(jnp.int32)
    # Prompts are right-padded, so the last real token sits at index seq_len - 1.
    last = jnp.take_along_axis(x, (seq_len - 1)[:, None, None], axis=1)[:, 0]
    pad = [(0, 0), (0, cache_size - t)]
    cache = dict(k=k, v=v, pos=jnp.pad(pos, pad), valid=jnp.pad(full_input, pad).astype(bool),
                 index=jnp.asarray(t, jnp.int32), seq_len=seq_len)
    return self._llm.logits(last, head), cache

  def extend(self, tokens, cache, head=None):
    """Appends one token per example: int32[B] -> (logits float32[B, V], cache)."""
    index, seq_len = cache["index"], cache["seq_len"]
    valid = jax.lax.dynamic_update_slice(cache["valid"], jnp.ones_like(seq_len, bool)[:, None],
                                         (0, index))
    pos = jax.lax.dynamic_update_slice(cache["pos"], seq_len[:, None], (0, index))
    mask = valid[:, None, :]
    window = variants.resolve_gemma(self.llm)["sliding_window"]
    local = sliding_window_mask(mask, seq_len[:, None], pos, window)
    x = self._llm.embed(tokens[:, None])
    x, (k, v) = self._llm(x, seq_len[:, None], mask, local, (cache["k"], cache["v"]), index)
    cache = dict(k=k, v=v, pos=pos, valid=valid, index=index + 1, seq_len=seq_len + 1)
    return self._llm.logits(x[:, 0], head), cache
