"""THE name mapping between our (big_vision) parameter tree and transformers', both ways.

Import and export both read `table(model_config)`; the config.json <-> model_config
mapping is here too, so one file holds every fact about the transformers layout.

Our names are stacked ("/"-joined, layer on axis 0). transformers names are given in
one canonical form, after `canonical_hf_name`: `vision_tower.<...>` (no `vision_model`),
`multi_modal_projector.<...>`, `language_model.<...>` (no inner `model.`), `{i}` = layer.
Axis letters: W model width, H heads, K kv heads, D head dim, F mlp dim, p patch.
"""

import dataclasses
import math

from paligemma.models import variants

# Prefix spellings seen in files (Hub: `vision_tower.vision_model.`, `language_model.model.`;
# transformers >= 4.52 in memory: `model.vision_tower.`, `model.language_model.`, `lm_head`;
# transformers 5.x save_pretrained: `vision_tower.`, `language_model.model.`).
_PREFIXES = (
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model."),
    ("language_model.model.", "language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", "language_model."),
    ("lm_head.", "lm_head."),
)
# What export writes: the layout of the files on the Hub, which transformers 4.x and 5.x
# both load (5.x renames it on load; checked by tests/test_checkpoint_hf.py).
_EXPORT_PREFIXES = (("vision_tower.", "vision_tower.vision_model."),
                    ("language_model.", "language_model.model."))
# Tied to the input embedding in every PaliGemma: an lm_head in a file is not a parameter.
IGNORED_HF_NAMES = ("lm_head.weight",)


def canonical_hf_name(name):
  """Any transformers spelling of a PaliGemma weight name -> the canonical one."""
  for old, new in _PREFIXES:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def export_hf_name(canonical):
  """Canonical name -> the name written to safetensors files (the Hub layout)."""
  for old, new in _EXPORT_PREFIXES:
    if canonical.startswith(old):
      return new + canonical[len(old):]
  return canonical


# transformers 5 module paths (what PEFT adapter files are keyed by, after `base_model.model.`).
_MODULE_PREFIXES = (("vision_tower.", "model.vision_tower."),
                    ("multi_modal_projector.", "model.multi_modal_projector."),
                    ("language_model.", "model.language_model."))


def module_hf_name(canonical):
  """Canonical name -> its path in a transformers 5 PaliGemmaForConditionalGeneration
  (`language_model.layers.0.mlp.up_proj` -> `model.language_model.layers.0.mlp.up_proj`)."""
  for old, new in _MODULE_PREFIXES:
    if canonical.startswith(old):
      return new + canonical[len(old):]
  return canonical


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our leaves and the transformers tensor(s) it is made of.

  `hf` templates contain `{i}` when `layered` (ours then has the layer on axis 0);
  `to_ours(list of per-layer hf arrays) -> array`, `to_hf(array) -> list`, per layer.
  """
  ours: str
  hf: tuple
  to_ours: object
  to_hf: object
  layered: bool = True


def _stack(xs):
  # numpy for real arrays, jax under jax.eval_shape (used to derive shapes without memory).
  return xs[0].__array_namespace__().stack(xs)


def _same():
  return (lambda xs: xs[0]), (lambda x: [x])


def _linear():
  # torch Linear weight (out, in) <-> our Dense kernel (in, out).
  return (lambda xs: xs[0].T), (lambda x: [x.T])


def table(model_config):
  """[Entry] for a model_config ({"img": ..., "llm": ...}, resolved or not)."""
  img = variants.resolve_vit(model_config["img"])
  llm = variants.resolve_gemma(model_config["llm"])
  vh, vd = img["num_heads"], img["width"] // img["num_heads"]
  w, h, k, d = llm["width"], llm["num_heads"], llm["num_kv_heads"], llm["head_dim"]
  vit = "img/Transformer/encoderblock/"
  vl = "vision_tower.encoder.layers.{i}."
  entries = [
      # Conv: torch (out, in, kh, kw) <-> ours (kh, kw, in, out).
      Entry("img/embedding/kernel", ("vision_tower.embeddings.patch_embedding.weight",),
            lambda xs: xs[0].transpose(2, 3, 1, 0), lambda x: [x.transpose(3, 2, 0, 1)],
            layered=False),
      Entry("img/embedding/bias", ("vision_tower.embeddings.patch_embedding.bias",),
            *_same(), layered=False),
      # (N, W) <-> (1, N, W).
      Entry("img/pos_embedding", ("vision_tower.embeddings.position_embedding.weight",),
            lambda xs: xs[0][None], lambda x: [x[0]], layered=False),
      Entry(vit + "LayerNorm_0/scale", (vl + "layer_norm1.weight",), *_same()),
      Entry(vit + "LayerNorm_0/bias", (vl + "layer_norm1.bias",), *_same()),
      Entry(vit + "LayerNorm_1/scale", (vl + "layer_norm2.weight",), *_same()),
      Entry(vit + "LayerNorm_1/bias", (vl + "layer_norm2.bias",), *_same()),
      Entry(vit + "MlpBlock_0/Dense_0/kernel", (vl + "mlp.fc1.weight",), *_linear()),
      Entry(vit + "MlpBlock_0/Dense_0/bias", (vl + "mlp.fc1.bias",), *_same()),
      Entry(vit + "MlpBlock_0/Dense_1/kernel", (vl + "mlp.fc2.weight",), *_linear()),
      Entry(vit + "MlpBlock_0/Dense_1/bias", (vl + "mlp.fc2.bias",), *_same()),
  ]
  mha = vit + "MultiHeadDotProductAttention_0/"
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    entries += [
        # (H*D, W) <-> (W, H, D); bias (H*D) <-> (H, D).
        Entry(f"{mha}{ours}/kernel", (f"{vl}self_attn.{theirs}.weight",),
              lambda xs: xs[0].T.reshape(-1, vh, vd), lambda x: [x.reshape(x.shape[0], -1).T]),
        Entry(f"{mha}{ours}/bias", (f"{vl}self_attn.{theirs}.bias",),
              lambda xs: xs[0].reshape(vh, vd), lambda x: [x.reshape(-1)]),
    ]
  entries += [
      # (W, H*D) <-> (H, D, W).
      Entry(mha + "out/kernel", (vl + "self_attn.out_proj.weight",),
            lambda xs: xs[0].T.reshape(vh, vd, -1), lambda x: [x.reshape(vh * vd, -1).T]),
      Entry(mha + "out/bias", (vl + "self_attn.out_proj.bias",), *_same()),
      Entry("img/Transformer/encoder_norm/scale", ("vision_tower.post_layernorm.weight",),
            *_same(), layered=False),
      Entry("img/Transformer/encoder_norm/bias", ("vision_tower.post_layernorm.bias",),
            *_same(), layered=False),
      Entry("img/head/kernel", ("multi_modal_projector.linear.weight",), *_linear(),
            layered=False),
      Entry("img/head/bias", ("multi_modal_projector.linear.bias",), *_same(), layered=False),
      # Rows past our vocabulary (the image token and padding) are handled by the loader.
      Entry("llm/embedder/input_embedding", ("language_model.embed_tokens.weight",),
            *_same(), layered=False),
      Entry("llm/final_norm/scale", ("language_model.norm.weight",), *_same(), layered=False),
  ]

  ll = "language_model.layers.{i}."

  def heads_in(n):  # torch (n*D, W) -> (n, W, D)
    return lambda x: x.reshape(n, d, w).transpose(0, 2, 1)

  def heads_out(x):  # (n, W, D) -> torch (n*D, W)
    return x.transpose(0, 2, 1).reshape(-1, w)

  if k == h:
    entries.append(Entry(
        "llm/layers/attn/qkv_einsum/w",
        tuple(ll + f"self_attn.{n}_proj.weight" for n in "qkv"),
        lambda xs: _stack([heads_in(h)(x) for x in xs]),
        lambda x: [heads_out(x[j]) for j in range(3)]))
  else:
    entries += [
        Entry("llm/layers/attn/q_einsum/w", (ll + "self_attn.q_proj.weight",),
              lambda xs: heads_in(h)(xs[0]), lambda x: [heads_out(x)]),
        Entry("llm/layers/attn/kv_einsum/w",
              (ll + "self_attn.k_proj.weight", ll + "self_attn.v_proj.weight"),
              lambda xs: _stack([heads_in(k)(x) for x in xs]),
              lambda x: [heads_out(x[0]), heads_out(x[1])]),
    ]
  entries += [
      # torch o_proj (W, H*D) <-> (H, D, W).
      Entry("llm/layers/attn/attn_vec_einsum/w", (ll + "self_attn.o_proj.weight",),
            lambda xs: xs[0].T.reshape(h, d, w), lambda x: [x.reshape(h * d, w).T]),
      # [0] = gate (the gelu side), [1] = up; torch (F, W) each <-> (2, W, F).
      Entry("llm/layers/mlp/gating_einsum",
            (ll + "mlp.gate_proj.weight", ll + "mlp.up_proj.weight"),
            lambda xs: _stack([xs[0].T, xs[1].T]), lambda x: [x[0].T, x[1].T]),
      Entry("llm/layers/mlp/linear", (ll + "mlp.down_proj.weight",), *_linear()),
      Entry("llm/layers/pre_attention_norm/scale", (ll + "input_layernorm.weight",), *_same()),
  ]
  # Both sides store the RMSNorm scale s applied as (1 + s): no offset to convert.
  if llm["post_norms"]:  # Gemma 2 naming.
    entries += [
        Entry("llm/layers/post_attention_norm/scale", (ll + "post_attention_layernorm.weight",),
              *_same()),
        Entry("llm/layers/pre_ffw_norm/scale", (ll + "pre_feedforward_layernorm.weight",),
              *_same()),
        Entry("llm/layers/post_ffw_norm/scale", (ll + "post_feedforward_layernorm.weight",),
              *_same()),
    ]
  else:  # Gemma 1: transformers' "post_attention_layernorm" is the pre-MLP norm.
    entries.append(Entry("llm/layers/pre_ffw_norm/scale",
                         (ll + "post_attention_layernorm.weight",), *_same()))
  return entries


def hf_layer_names(entry, depth):
  """The concrete transformers names of an Entry, grouped per layer: [[names of layer 0], ...]."""
  if not entry.layered:
    return [list(entry.hf)]
  return [[t.format(i=i) for t in entry.hf] for i in range(depth)]


def depth_of(model_config, ours):
  """Number of layers of the tower that `ours` (an Entry.ours name) belongs to."""
  tower = variants.resolve_vit(model_config["img"]) if ours.startswith("img/") else (
      variants.resolve_gemma(model_config["llm"]))
  return tower["depth"]


# ---- config.json <-> model_config -------------------------------------------------------

def _match_variant(cfg, presets, keys):
  for name, preset in presets.items():
    if all(preset.get(k) == cfg[k] for k in keys if k in preset):
      return name
  return None


def vit_variant_name(img):
  """"So400m/14" when the dims match a preset, else None."""
  name = _match_variant(img, variants.VIT_VARIANTS, ("width", "depth", "mlp_dim", "num_heads"))
  return f"{name}/{img['patch_size']}" if name else None


def gemma_variant_name(llm):
  """"gemma2_2b" when the dims (and gemma version) match a preset, else None."""
  return _match_variant(llm, variants.GEMMA_VARIANTS,
                        ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads",
                         "head_dim", "post_norms"))


def hf_vocab_rows(vocab_size):
  """Rows transformers files carry: room for the image token, padded to a multiple of 64."""
  return int(math.ceil((vocab_size + 1) / 64) * 64)


def _number(x):
  return int(x) if float(x).is_integer() else float(x)


def from_hf_config(hf):
  """transformers PaliGemma config.json dict -> model_config (explicit fields + variants)."""
  v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
  img = dict(width=v.get("hidden_size", 1152), depth=v.get("num_hidden_layers", 27),
             mlp_dim=v.get("intermediate_size", 4304),
             num_heads=v.get("num_attention_heads", 16), patch_size=v.get("patch_size", 14),
             image_size=v.get("image_size", 224), ln_eps=v.get("layer_norm_eps", 1e-6))
  gemma2 = t.get("model_type", "gemma") == "gemma2"
  rows = t.get("vocab_size", hf.get("vocab_size", 257_216))
  image_token = hf.get("image_token_index", hf.get("image_token_id", rows))
  heads = t.get("num_attention_heads", 8)
  width = t.get("hidden_size", 2048)
  head_dim = t.get("head_dim") or width // heads
  rope = t.get("rope_parameters") or {}
  sliding = t.get("sliding_window") if gemma2 else None
  layer_types = t.get("layer_types")
  if layer_types and "sliding_attention" not in layer_types:
    sliding = None
  llm = dict(
      width=width, depth=t.get("num_hidden_layers", 18), mlp_dim=t.get("intermediate_size", 16384),
      num_heads=heads, num_kv_heads=t.get("num_key_value_heads", heads), head_dim=head_dim,
      # The rows from the image token on are transformers' additions: not ours.
      vocab_size=min(rows, image_token),
      query_pre_attn_scalar=float(t.get("query_pre_attn_scalar", head_dim) if gemma2
                                  else head_dim),
      rope_max_wavelength=_number(rope.get("rope_theta", t.get("rope_theta", 10_000))),
      norm_eps=t.get("rms_norm_eps", 1e-6), post_norms=gemma2,
      attn_logits_softcap=t.get("attn_logit_softcapping") if gemma2 else None,
      final_logits_softcap=t.get("final_logit_softcapping") if gemma2 else None,
      sliding_window=sliding)
  img["variant"] = vit_variant_name(img)
  llm["variant"] = gemma_variant_name(llm)
  return {"img": img, "llm": llm}


def to_hf_config(model_config, dtype="float32"):
  """model_config -> transformers PaliGemma config.json dict (PaliGemma 1 or 2)."""
  img = variants.resolve_vit(model_config["img"])
  llm = variants.resolve_gemma(model_config["llm"])
  rows = hf_vocab_rows(llm["vocab_size"])
  image_token = llm["vocab_size"]
  gemma2 = bool(llm["post_norms"])
  text = dict(
      model_type="gemma2" if gemma2 else "gemma", hidden_size=llm["width"],
      num_hidden_layers=llm["depth"], intermediate_size=llm["mlp_dim"],
      num_attention_heads=llm["num_heads"], num_key_value_heads=llm["num_kv_heads"],
      head_dim=llm["head_dim"], vocab_size=rows, rms_norm_eps=llm["norm_eps"],
      hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
      rope_theta=float(llm["rope_max_wavelength"]),
      rope_parameters=dict(rope_type="default", rope_theta=float(llm["rope_max_wavelength"])),
      max_position_embeddings=8192, attention_bias=False, tie_word_embeddings=True,
      pad_token_id=0, eos_token_id=1, bos_token_id=2,
      num_image_tokens=(img["image_size"] // img["patch_size"]) ** 2)
  if gemma2:
    window = llm["sliding_window"]
    text.update(
        query_pre_attn_scalar=_number(llm["query_pre_attn_scalar"]),  # transformers wants int.
        attn_logit_softcapping=llm["attn_logits_softcap"],
        final_logit_softcapping=llm["final_logits_softcap"],
        # Local layers are the even ones (layer 0 local), as transformers' default.
        sliding_window=window,
        layer_types=[("sliding_attention" if window and i % 2 == 0 else "full_attention")
                     for i in range(llm["depth"])])
  elif llm["query_pre_attn_scalar"] != llm["head_dim"] or llm["attn_logits_softcap"] or (
      llm["final_logits_softcap"] or llm["sliding_window"]):
    raise ValueError("transformers' Gemma 1 has no query scaling, soft-caps or sliding "
                     f"window; this llm config cannot be exported: {llm}")
  vision = dict(
      model_type="siglip_vision_model", hidden_size=img["width"],
      num_hidden_layers=img["depth"], intermediate_size=img["mlp_dim"],
      num_attention_heads=img["num_heads"], patch_size=img["patch_size"],
      image_size=img["image_size"], layer_norm_eps=img["ln_eps"], num_channels=3,
      hidden_act="gelu_pytorch_tanh", vision_use_head=False, projection_dim=llm["width"])
  return dict(
      architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
      vision_config=vision, text_config=text, image_token_index=image_token,
      projection_dim=llm["width"], hidden_size=llm["width"], vocab_size=rows,
      tie_word_embeddings=True, dtype=dtype, torch_dtype=dtype,
      bos_token_id=2, eos_token_id=1, pad_token_id=0)
