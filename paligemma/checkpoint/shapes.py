"""Parameter shapes from a model_config, and a model_config inferred from shapes.

Both in our stacked naming (big_vision's names, layers stacked on axis 0).
"""

import math

from paligemma.checkpoint import names
from paligemma.models import variants

_VIT = "img/Transformer/encoderblock/"
_MHA = _VIT + "MultiHeadDotProductAttention_0/"


def param_shapes(model_config):
  """{our stacked name: shape} for a model_config (tower dicts or resolved configs),
  written out so that checkpoint code needs no model (tests/test_abstract_params.py checks
  them against the model's)."""
  img = variants.ViTConfig.from_dict(model_config["img"])
  llm = variants.GemmaConfig.from_dict(model_config["llm"])
  p, vw, vl, vm, vh = img.patch_size, img.width, img.depth, img.mlp_dim, img.num_heads
  vd = vw // vh
  n = img.num_tokens
  w, l, f = llm.width, llm.depth, llm.mlp_dim
  h, k, d = llm.num_heads, llm.num_kv_heads, llm.head_dim
  s = {
      "img/embedding/kernel": (p, p, 3, vw), "img/embedding/bias": (vw,),
      "img/pos_embedding": (1, n, vw),
      _VIT + "LayerNorm_0/scale": (vl, vw), _VIT + "LayerNorm_0/bias": (vl, vw),
      _VIT + "LayerNorm_1/scale": (vl, vw), _VIT + "LayerNorm_1/bias": (vl, vw),
      _VIT + "MlpBlock_0/Dense_0/kernel": (vl, vw, vm), _VIT + "MlpBlock_0/Dense_0/bias": (vl, vm),
      _VIT + "MlpBlock_0/Dense_1/kernel": (vl, vm, vw), _VIT + "MlpBlock_0/Dense_1/bias": (vl, vw),
      _MHA + "out/kernel": (vl, vh, vd, vw), _MHA + "out/bias": (vl, vw),
      "img/Transformer/encoder_norm/scale": (vw,), "img/Transformer/encoder_norm/bias": (vw,),
      "img/head/kernel": (vw, w), "img/head/bias": (w,),
      "llm/embedder/input_embedding": (llm.vocab_size, w),
      "llm/final_norm/scale": (w,),
      "llm/layers/attn/attn_vec_einsum/w": (l, h, d, w),
      "llm/layers/mlp/gating_einsum": (l, 2, w, f),
      "llm/layers/mlp/linear": (l, f, w),
      "llm/layers/pre_attention_norm/scale": (l, w),
      "llm/layers/pre_ffw_norm/scale": (l, w),
  }
  for qkv in ("query", "key", "value"):
    s[f"{_MHA}{qkv}/kernel"] = (vl, vw, vh, vd)
    s[f"{_MHA}{qkv}/bias"] = (vl, vh, vd)
  if k == h:
    s["llm/layers/attn/qkv_einsum/w"] = (l, 3, h, w, d)
  else:
    s["llm/layers/attn/q_einsum/w"] = (l, h, w, d)
    s["llm/layers/attn/kv_einsum/w"] = (l, 2, k, w, d)
  if llm.post_norms:
    s["llm/layers/post_attention_norm/scale"] = (l, w)
    s["llm/layers/post_ffw_norm/scale"] = (l, w)
  return s


def _need(shapes, name, source):
  if name not in shapes:
    raise KeyError(f"{source}: missing key {name!r}, needed to infer the model config")
  return shapes[name]


def infer_config(shapes, source="checkpoint"):
  """model_config from {our stacked name: shape} (variant names when the dims match).

  What shapes cannot tell comes from the matching preset, else the defaults of the
  Gemma generation (post norms => Gemma 2: soft-caps 50/30, window 4096).
  """
  kernel = _need(shapes, "img/embedding/kernel", source)
  pos = _need(shapes, "img/pos_embedding", source)
  grid = math.isqrt(pos[1])
  img = dict(width=kernel[3], patch_size=kernel[0], image_size=grid * kernel[0],
             depth=_need(shapes, _VIT + "LayerNorm_0/scale", source)[0],
             mlp_dim=_need(shapes, _VIT + "MlpBlock_0/Dense_0/kernel", source)[-1],
             num_heads=_need(shapes, _MHA + "query/kernel", source)[-2], ln_eps=1e-6)
  img["variant"] = names.vit_variant_name(img)

  emb = _need(shapes, "llm/embedder/input_embedding", source)
  linear = _need(shapes, "llm/layers/mlp/linear", source)
  if "llm/layers/attn/qkv_einsum/w" in shapes:
    _, _, h, _, d = shapes["llm/layers/attn/qkv_einsum/w"]
    k = h
  else:
    _, h, _, d = _need(shapes, "llm/layers/attn/q_einsum/w", source)
    k = _need(shapes, "llm/layers/attn/kv_einsum/w", source)[2]
  post_norms = "llm/layers/post_attention_norm/scale" in shapes
  llm = dict(width=emb[1], depth=linear[0], mlp_dim=linear[1], num_heads=h, num_kv_heads=k,
             head_dim=d, post_norms=post_norms)
  name = names.gemma_variant_name(llm)
  base = dict(variants.GEMMA_DEFAULTS)
  base.update(variants.GEMMA_VARIANTS[name] if name else
              dict(attn_logits_softcap=50.0, final_logits_softcap=30.0, sliding_window=4096)
              if post_norms else {})
  base.update(llm, variant=name, vocab_size=emb[0])
  if base["query_pre_attn_scalar"] is None:
    base["query_pre_attn_scalar"] = float(d)
  return {"img": img, "llm": base}
