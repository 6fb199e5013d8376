"""paligemma/quant.py: the NF4 table, block-wise nf4 / int8 round trips against a numpy
reference, error bounds, jit / slicing / nn.scan, memory, and einsum's gradient."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.errors  # pylint: disable=g-import-not-at-top
import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top
from scipy import stats  # pylint: disable=g-import-not-at-top

from paligemma import quant  # pylint: disable=g-import-not-at-top


def _nf4_from_definition():
  """QLoRA appendix E: 8 positive quantiles of N(0, 1) at evenly spaced probabilities
  from 0.9677083 to 0.5 (exclusive), 7 negative ones likewise, and 0; divided by the
  largest, so the levels span [-1, 1]."""
  offset = 0.9677083
  pos = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
  neg = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
  levels = np.sort(np.concatenate([pos, [0.0], neg]))
  return levels / levels.max()


def _reference(x, kind, lead, block=64):
  """numpy block-wise quantise-dequantise: nearest NF4 level of x / absmax (int8:
  round(x / absmax * 127)) per block of `block` weights, times absmax; float32 as in
  quant.py. Returns (codes per weight, absmax, dequantised)."""
  x = np.asarray(x, np.float32)
  xb = x.reshape(x.shape[:lead] + (-1, block))
  absmax = np.abs(xb).max(-1, keepdims=True)
  y = xb / np.where(absmax == 0, np.float32(1), absmax)
  if kind == "nf4":
    idx = np.abs(y[..., None].astype(np.float64) - quant.NF4.astype(np.float64)).argmin(-1)
    out = quant.NF4[idx] * absmax
  else:
    idx = np.clip(np.round(y * np.float32(127)), -127, 127)
    out = idx.astype(np.float32) * (absmax / np.float32(127))
  return idx, absmax[..., 0], out.reshape(x.shape)


def _unpacked_codes(q):
  codes = np.asarray(q.codes)
  if q.kind == "int8":
    return codes.astype(np.int64)
  return np.stack([codes >> 4, codes & 15], -1).reshape(codes.shape[:-1] + (-1,))


def test_nf4_table():
  ref = _nf4_from_definition()
  assert quant.NF4.dtype == np.float32 and quant.NF4.shape == (16,)
  np.testing.assert_allclose(quant.NF4, ref, rtol=0, atol=1e-6)
  assert quant.NF4[7] == 0 and quant.NF4[0] == -1 and quant.NF4[-1] == 1
  assert (np.diff(quant.NF4) > 0).all()


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("lead", [0, 1, 2])
def test_matches_numpy_reference(kind, lead):
  rng = np.random.default_rng(lead)
  x = rng.standard_normal((2, 3, 8, 48)).astype(np.float32)
  x[0, 0, :4] = 0  # An all-zero block (4 * 48 / 64 = 3 blocks).
  x[0, 1, :4] = 0
  x[0, 1, 0, 5] = -0.25  # A block with one nonzero weight.
  q = quant.quantize(x, kind, lead=lead)
  tail = x.shape[lead:]
  nblocks = int(np.prod(tail)) // 64
  assert q.shape == x.shape and q.tail == tail and q.dtype == "float32" and q.block == 64
  assert q.scales.shape == x.shape[:lead] + (nblocks,) and q.scales.dtype == jnp.float32
  if kind == "nf4":
    assert q.codes.shape == x.shape[:lead] + (nblocks, 32) and q.codes.dtype == jnp.uint8
  else:
    assert q.codes.shape == x.shape[:lead] + (nblocks, 64) and q.codes.dtype == jnp.int8
  idx, absmax, ref = _reference(x, kind, lead)
  np.testing.assert_array_equal(_unpacked_codes(q), idx)
  np.testing.assert_array_equal(np.asarray(q.scales), absmax)
  out = np.asarray(quant.dequantize(q))
  assert out.shape == x.shape and out.dtype == np.float32
  if kind == "nf4":  # level * absmax: exact.
    np.testing.assert_array_equal(out, ref)
  else:  # XLA may divide by 127 as a multiply by 1/127: within 1 ulp.
    np.testing.assert_allclose(out, ref, rtol=2 ** -22, atol=0)
  assert (out[0, 0, :4] == 0).all()
  assert out[0, 1, 0, 5] == np.float32(-0.25)  # absmax * level +-1 is exact.
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q, jnp.bfloat16)),
                                np.asarray(jnp.asarray(out).astype(jnp.bfloat16)))


def test_error_bounds_normal_weights():
  """On N(0, 1) weights, per block: nf4's error is at most absmax * (largest gap between
  levels) / 2 (between 0.7230 and 1), int8's at most absmax / 254 (half a step);
  int8's RMS error is about that of uniform rounding, step / sqrt(12)."""
  x = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float32)
  absmax = np.abs(x.reshape(-1, 64)).max(-1, keepdims=True)
  half_gap = np.diff(quant.NF4.astype(np.float64)).max() / 2
  stats_ = {}
  for kind, bound in [("nf4", absmax * half_gap), ("int8", absmax / 254)]:
    for scale_dtype in (jnp.float32, jnp.float16):
      q = quant.quantize(x, kind, scale_dtype=scale_dtype)
      err = (np.asarray(quant.dequantize(q)) - x).reshape(-1, 64)
      rms, mx = float(np.sqrt(np.mean(err ** 2))), float(np.abs(err).max())
      stats_[kind, jnp.dtype(scale_dtype).name] = rms
      print(f"{kind} scales {jnp.dtype(scale_dtype).name}: rms {rms:.6f} max {mx:.6f} "
            f"bytes/weight {quant.nbytes(q) / x.size:.5f}")
      slack = 1e-6 if scale_dtype == jnp.float32 else absmax * 2 ** -11  # f16 rounding.
      assert (np.abs(err) <= bound + slack).all()
  assert 0.085 < stats_["nf4", "float32"] < 0.1  # 0.0920 (qwix's nf4: the same numbers).
  uniform = float(np.sqrt(np.mean(absmax ** 2))) / 127 / np.sqrt(12)
  assert abs(stats_["int8", "float32"] / uniform - 1) < 0.05  # 0.00597.
  for kind in quant.KINDS:  # float16 scales cost no accuracy at this scale of weights.
    assert abs(stats_[kind, "float16"] / stats_[kind, "float32"] - 1) < 1e-3


@pytest.mark.parametrize("kind", quant.KINDS)
def test_jit_and_slicing(kind):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 2, 32)), jnp.bfloat16)
  q = quant.quantize(x, kind, lead=1)
  assert q.dtype == "bfloat16" and q.shape == x.shape and q.lead == 1
  qj = jax.jit(quant.quantize, static_argnums=(1, 2))(x, kind, 1)
  assert jax.tree_util.tree_structure(qj) == jax.tree_util.tree_structure(q)
  for a, b in zip(jax.tree_util.tree_leaves(qj), jax.tree_util.tree_leaves(q)):
    np.testing.assert_array_equal(a, b)
  full = quant.dequantize(q)
  assert full.dtype == jnp.bfloat16
  np.testing.assert_array_equal(jax.jit(quant.dequantize)(q), full)
  np.testing.assert_array_equal(jax.jit(quant.dequantize, static_argnums=1)(q, jnp.float32),
                                quant.dequantize(q, jnp.float32))
  for i in range(3):  # What nn.scan does to every parameter leaf.
    qi = jax.tree_util.tree_map(lambda a, i=i: np.asarray(a)[i], q)
    assert qi.shape == x.shape[1:] and qi.lead == 0
    np.testing.assert_array_equal(quant.dequantize(qi), full[i])
    np.testing.assert_array_equal(quant.dequantize(quant.quantize(x[i], kind)), full[i])


def test_quantizable():
  assert quant.quantizable((2048, 8, 256), 0)
  assert quant.quantizable((26, 2048, 8, 256), 1)
  assert quant.quantizable((4, 16), 0) and not quant.quantizable((4, 16), 1)
  assert not quant.quantizable((26, 2048), 2) and not quant.quantizable((3,), 0)
  assert not quant.quantizable((2048,), 0, block=63)
  with pytest.raises(ValueError, match="whole number of blocks"):
    quant.quantize(jnp.ones((4, 16)), "nf4", lead=1)
  with pytest.raises(ValueError, match="unknown"):
    quant.quantize(jnp.ones((64,)), "int4")


class _QDense(nn.Module):
  """x @ w with w a QArray parameter (initialised quantised: in apply, flax compares
  the init's abstract leaf shapes with the stored ones)."""
  kind: str = "nf4"

  @nn.compact
  def __call__(self, x, _):
    w = self.param("w", lambda rng: quant.quantize(
        jax.random.normal(rng, (x.shape[-1], x.shape[-1])), self.kind))
    assert isinstance(w, quant.QArray) and w.shape == (x.shape[-1],) * 2
    return jnp.tanh(quant.einsum("bi,io->bo", x, w, jnp.float32)), None


def _scanned(n):
  return nn.scan(_QDense, variable_axes={"params": 0}, split_rngs={"params": True},
                 length=n)()


def test_scan_over_qarray_params():
  n, d = 3, 64
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)
  model = _scanned(n)
  params = jax.jit(model.init)(jax.random.key(3), x, None)["params"]
  q = params["w"]
  assert isinstance(q, quant.QArray) and q.shape == (n, d, d)
  assert q.codes.shape == (n, d * d // 64, 32) and q.scales.shape == (n, d * d // 64)

  def loop(q):
    h = x
    for i in range(n):
      h = jnp.tanh(h @ quant.dequantize(jax.tree_util.tree_map(lambda a, i=i: a[i], q)))
    return h

  out, _ = jax.jit(model.apply)({"params": params}, x, None)
  np.testing.assert_allclose(out, loop(q), rtol=1e-6, atol=1e-6)
  # The backward pass of the scan keeps the codes and scales, no dequantised stack.
  vjp = jax.eval_shape(
      lambda x: jax.vjp(lambda x: model.apply({"params": params}, x, None)[0], x)[1], x)
  shapes = {(r.shape, r.dtype) for r in jax.tree_util.tree_leaves(vjp)}
  assert (q.codes.shape, q.codes.dtype) in shapes
  assert not any(shape[-2:] == (d, d) for shape, _ in shapes)
  # A stacked float weight quantised with lead=1 (a converted checkpoint) plugs in.
  w = rng.standard_normal((n, d, d)).astype(np.float32) / 8
  q1 = quant.quantize(w, "nf4", lead=1)
  out, _ = model.apply({"params": {"w": q1}}, x, None)
  np.testing.assert_allclose(out, loop(q1), rtol=1e-6, atol=1e-6)


def test_flax_param_shape_check_needs_quantized_init():
  """The integration constraint: a param whose init returns a plain array can't be fed a
  QArray (flax checks the init's leaf shapes against the stored leaves in apply)."""

  class Plain(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(), (x.shape[-1], 64))
      return quant.einsum("bi,io->bo", x, w, jnp.float32)

  x = jnp.ones((2, 64))
  w = Plain().init(jax.random.key(0), x)["params"]["w"]
  with pytest.raises(flax.errors.ScopeParamShapeError):
    Plain().apply({"params": {"w": quant.quantize(w, "nf4")}}, x)


def test_nbytes():
  x = jax.ShapeDtypeStruct((8, 2048, 64), jnp.bfloat16)  # Abstract: shapes only.
  per = {}
  for kind in quant.KINDS:
    for sd in (jnp.float32, jnp.float16):
      q = jax.eval_shape(lambda x, kind=kind, sd=sd: quant.quantize(x, kind, 1, scale_dtype=sd), x)
      per[kind, jnp.dtype(sd).name] = quant.nbytes(q) / x.size
  per["bfloat16"] = quant.nbytes(x) / x.size
  assert quant.nbytes(quant.quantize(jnp.zeros((2, 128)), "nf4", 1)) == 2 * (64 + 2 * 4)
  print({k if isinstance(k, str) else "/".join(k): v for k, v in per.items()})
  assert per["nf4", "float32"] == 0.5625 and per["nf4", "float16"] == 0.53125
  assert per["int8", "float32"] == 1.0625 and per["int8", "float16"] == 1.03125
  assert per["bfloat16"] == 2


@pytest.mark.parametrize("kind,dtype", [("nf4", jnp.bfloat16), ("int8", jnp.float32)])
def test_einsum_gradient_and_residuals(kind, dtype):
  eqn = "btd,dnh->btnh"
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 5, 64)), dtype)
  q = quant.quantize(rng.standard_normal((64, 4, 32)).astype(np.float32), kind)
  g = jnp.asarray(rng.standard_normal((2, 5, 4, 32)), dtype)
  w = quant.dequantize(q, dtype)

  def fwd_bwd(f):
    y, vjp = jax.vjp(f, x)
    return y, vjp(g)[0]

  y, gx = jax.jit(lambda x, q: fwd_bwd(lambda x: quant.einsum(eqn, x, q, dtype)))(x, q)
  y_ref, gx_ref = jax.jit(lambda x: fwd_bwd(lambda x: jnp.einsum(eqn, x, w)))(x)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # XLA may fuse the dequantisation.
  for a, b in [(y, y_ref), (gx, gx_ref)]:
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol)
  # The backward pass holds the quantised arrays (and x for a gradient of the weight),
  # no dequantised weight.
  vjp = jax.eval_shape(lambda x: jax.vjp(lambda x: quant.einsum(eqn, x, q, dtype), x)[1], x)
  shapes = {(r.shape, jnp.dtype(r.dtype).name) for r in jax.tree_util.tree_leaves(vjp)}
  assert (q.shape, jnp.dtype(dtype).name) not in shapes
  assert (q.codes.shape, jnp.dtype(q.codes.dtype).name) in shapes


def test_einsum_plain_weight():
  x = jnp.ones((2, 64), jnp.float32)
  w = jnp.full((64, 8), 0.5, jnp.float16)
  y = quant.einsum("bi,io->bo", x, w, jnp.float32)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(y, jnp.full((2, 8), 32.0))
