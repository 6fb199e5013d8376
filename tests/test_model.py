"""Model structure: parameter counts of the real configs, dtypes, stacking, remat, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from paligemma.checkpoint import tree
from paligemma.models import build
from paligemma.models import variants
from paligemma.models.paligemma import Model
from conftest import tiny_model_config

TINY = tiny_model_config(2, patch=4, image_size=16, vocab_size=512, sliding_window=8)


def _inputs(batch=2, text_len=6, image_size=16):
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  text = rng.integers(4, 512, (batch, text_len)).astype(np.int32)
  mask_ar = np.array([[0] * 3 + [1] * (text_len - 3)] * batch, np.int32)
  return image, text, mask_ar


def _init(model, seed=0):
  """Random params from the abstract shapes (numpy: compiling flax's init is slow on CPU)."""
  rng = np.random.default_rng(seed)
  shapes = build.abstract_params(model)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), shapes)


def _apply(model, params, *args):
  return jax.jit(model.apply)({"params": params}, *args)


# Counts from the issue (big_vision's own model reports these for the released configs).
@pytest.mark.parametrize("llm,res,expected", [
    ("gemma_2b", 224, 2_923_335_408),
    ("gemma_2b", 448, 2_924_220_144),
    ("gemma_2b", 896, 2_927_759_088),
    ("gemma2_2b", 224, 3_032_094_960),
    ("gemma2_9b", 224, 9_662_409_456),
    ("gemma2_27b", 224, 27_650_192_112),
])
def test_parameter_counts_of_released_configs(llm, res, expected):
  model = Model(img=dict(variant="So400m/14", image_size=res), llm=dict(variant=llm))
  shapes = build.abstract_params(model)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == expected


def test_parameter_names_and_shapes_match_reference():
  shapes = build.abstract_params(Model(img=dict(variant="So400m/14"), llm=dict(variant="gemma2_2b")))
  flat = {k: v.shape for k, v in tree.flatten(shapes).items()}
  assert flat["img/embedding/kernel"] == (14, 14, 3, 1152)
  assert flat["img/pos_embedding"] == (1, 256, 1152)
  assert flat["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"] == (27, 1152, 16, 72)
  assert flat["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel"] == (27, 16, 72, 1152)
  assert flat["img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (27, 1152, 4304)
  assert flat["img/head/kernel"] == (1152, 2304)
  assert flat["llm/embedder/input_embedding"] == (257_152, 2304)
  assert flat["llm/layers/attn/q_einsum/w"] == (26, 8, 2304, 256)
  assert flat["llm/layers/attn/kv_einsum/w"] == (26, 2, 4, 2304, 256)
  assert flat["llm/layers/attn/attn_vec_einsum/w"] == (26, 8, 256, 2304)
  assert flat["llm/layers/mlp/gating_einsum"] == (26, 2, 2304, 9216)
  assert flat["llm/layers/mlp/linear"] == (26, 9216, 2304)
  for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
    assert flat[f"llm/layers/{norm}/scale"] == (26, 2304)
  assert flat["llm/final_norm/scale"] == (2304,)
  # Gemma 1 has no post norms; heads == kv_heads uses the fused qkv_einsum.
  g1 = tree.flatten(build.abstract_params(Model(img=dict(variant="mu/14"), llm=dict(variant="gemma_2b"))))
  assert not any("post_" in k for k in g1)
  mha = tree.flatten(build.abstract_params(Model(**dict(TINY, llm=dict(variant="gemma_tiny", num_kv_heads=4)))))
  assert mha["llm/layers/attn/qkv_einsum/w"].shape == (2, 3, 4, 64, 16)


def test_unstacked_equals_stacked_and_remat_keeps_gradients():
  image, text, mask_ar = _inputs()
  stacked = Model(**TINY)
  params = _init(stacked)
  ref, _ = _apply(stacked, params, image, text, mask_ar)

  unstacked = Model(**TINY, scan=False)
  per_layer = tree.unstack_layers(params)
  assert "layers_3" in per_layer["llm"] and "encoderblock_0" in per_layer["img"]["Transformer"]
  out, _ = _apply(unstacked, per_layer, image, text, mask_ar)
  np.testing.assert_allclose(out, ref, atol=1e-5)

  def loss(p, model):
    return jnp.mean(model.apply({"params": p}, image, text, mask_ar)[0] ** 2)
  g_ref = jax.jit(jax.grad(lambda p: loss(p, stacked)))(params)
  remat = Model(**TINY, remat_policy="nothing_saveable")
  g_remat = jax.jit(jax.grad(lambda p: loss(p, remat)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_ref, g_remat)


def _batch_dots(jaxpr):
  """The batch dimensions of every dot_general in a jaxpr, its sub-jaxprs included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.params["dimension_numbers"][1][1]))
    for v in eqn.params.values():
      sub = getattr(v, "jaxpr", v)
      if hasattr(sub, "eqns"):
        out += _batch_dots(sub)
  return out


@pytest.mark.parametrize("eqn,x_shape,w_shape,batched", [
    ("BTD,NDH->BTNH", (2, 1, 8), (4, 8, 5), True),  # q_einsum, decoding: in place.
    ("BTD,NDH->BTNH", (4, 8, 8), (4, 8, 5), False),  # Many rows: the plain einsum.
    ("BTD,SKDH->SBTKH", (3, 1, 8), (2, 2, 8, 5), True),  # kv_einsum.
    ("...D,SDF->S...F", (4, 8, 8), (2, 8, 6), True),  # gating_einsum, any number of rows.
    ("BND,DHK->BNHK", (1, 1, 8), (8, 2, 3), False),  # Nothing to batch over.
])
def test_weights_with_leading_axes_are_read_as_a_batch_of_matrices(eqn, x_shape, w_shape,
                                                                     batched):
  """layers.cast_einsum: the einsum's values and gradients, as a batch of matrices over
  the weight's leading axes where x has few rows (or those axes lead the output)."""
  from paligemma.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
  ours = lambda x, w: layers.cast_einsum(eqn, x, w, "float32")
  ref = lambda x, w: jnp.einsum(eqn, x, w, precision="highest")
  np.testing.assert_allclose(jax.jit(ours)(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
  grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), (0, 1)))(x, w)
           for f in (ours, ref)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), *grads)
  dots = _batch_dots(jax.make_jaxpr(ours)(x, w).jaxpr)
  assert dots and all(bool(d) == batched for d in dots), dots


@pytest.mark.parametrize("param_dtype,dtype", [("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                               ("float16", "float16")])
def test_param_and_compute_dtypes_are_separate(param_dtype, dtype):
  image, text, mask_ar = _inputs()
  model = Model(**TINY, param_dtype=param_dtype, dtype=dtype)
  params = _init(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}
  logits, _ = _apply(model, params, image, text, mask_ar)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 6, 512)
  ref, _ = _apply(Model(**TINY), jax.tree.map(lambda x: x.astype(jnp.float32), params),
                  image, text, mask_ar)
  assert np.all(np.isfinite(logits))
  # Same function, lower precision: close to the float32 computation, not equal.
  assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.15 * np.abs(ref).max()


def test_final_logit_softcap_is_a_switch():
  image, text, mask_ar = _inputs()
  model = Model(**TINY)
  params = _init(model)
  params["llm"]["embedder"]["input_embedding"] *= 40  # Push logits past the cap of 30.
  capped, _ = _apply(model, params, image, text, mask_ar)
  off = Model(img=TINY["img"], llm=dict(TINY["llm"], final_logits_softcap=None))
  raw, _ = _apply(off, params, image, text, mask_ar)
  assert np.abs(capped).max() <= 30 and np.abs(raw).max() > 30
  np.testing.assert_allclose(capped, 30 * np.tanh(np.asarray(raw) / 30), atol=1e-3)


def test_errors_name_the_problem():
  image, text, mask_ar = _inputs()
  with pytest.raises(ValueError, match=r"Unknown llm variant 'gemma3_4b'.*gemma2_2b"):
    Model(img=TINY["img"], llm=dict(variant="gemma3_4b")).init(jax.random.PRNGKey(0), image, text, mask_ar)
  with pytest.raises(ValueError, match=r"Unknown img variant 'So500m/14'.*So400m/14"):
    Model(img=dict(variant="So500m/14"), llm=TINY["llm"]).init(jax.random.PRNGKey(0), image, text, mask_ar)
  with pytest.raises(ValueError, match=r"Unknown llm config key\(s\) \['widht'\]"):
    Model(img=TINY["img"], llm=dict(variant="gemma_tiny", widht=3)).init(
        jax.random.PRNGKey(0), image, text, mask_ar)
  with pytest.raises(ValueError, match=r"image_size=18 is not a multiple of the patch size 4"):
    Model(img=dict(variant="mu/4", image_size=18), llm=TINY["llm"]).init(
        jax.random.PRNGKey(0), np.zeros((1, 18, 18, 3), np.float32), text, mask_ar)
  with pytest.raises(ValueError, match=r"does not match the model's \(16, 16, 3\)"):
    Model(**TINY).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), text, mask_ar)
  short = Model(img=TINY["img"], llm=dict(TINY["llm"], max_len=20))
  with pytest.raises(ValueError, match=r"16 image \+ 6 text tokens exceeds the model's limit of 20"):
    short.init(jax.random.PRNGKey(0), image, text, mask_ar)


def test_configs_resolved_once_and_model_hashable():
  """Tower dicts are resolved at construction: the model equals (and hashes as) one built
  from the resolved configs, so it can be a static jit argument."""
  img = variants.ViTConfig.from_dict(TINY["img"])
  llm = variants.GemmaConfig.from_dict(TINY["llm"])
  model = Model(**TINY)
  assert model.img == img and model.llm == llm and model.num_image_tokens == img.num_tokens == 16
  assert llm.query_pre_attn_scalar == 16.0 and llm.sliding_window == 8
  same = Model(img=img, llm=llm)
  assert model == same and hash(model) == hash(same)
  assert Model(img=img.to_dict(), llm=llm.to_dict()) == model
  assert variants.resolve_gemma(llm) == llm.to_dict() == variants.resolve_gemma(TINY["llm"])
  assert model != Model(img=img, llm=dict(TINY["llm"], vocab_size=256))
  assert build.build_model(dict(TINY, dtype="bfloat16")) == model.clone(dtype="bfloat16")
  with pytest.raises(ValueError, match=r"Unknown model config key\(s\) \['dtpye'\]"):
    build.build_model(dict(TINY, dtpye="float32"))
