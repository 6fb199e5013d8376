"""Block-wise weight quantisation for QLoRA: 4-bit NormalFloat (NF4) and int8.

A weight x is stored as a QArray: the first `lead` axes of x are kept (e.g. the layer
axis of a scanned stack) and every item x[i...] (shape `tail`), flattened in C order, is
cut into blocks of `block` consecutive weights, each with one absmax scale:

  nf4   codes uint8[*lead, nblocks, block // 2]: the index (0..15) of the NF4 level
        nearest to x / absmax, two per byte (the even position in the high nibble).
  int8  codes int8[*lead, nblocks, block]: round(x / absmax * 127), symmetric.
  both  scales float32[*lead, nblocks]: the block's absmax (float16 on request).

dequantize(q) = level(code) * absmax (nf4) or code * (absmax / 127) (int8), reshaped to
[*lead, *tail]. Slicing codes and scales along a leading axis (what flax's nn.scan does
to every parameter leaf, per layer) gives the QArray of the slice, so the layer body of
a scan sees a lead=0 QArray of the same tail.

NF4 (Dettmers et al. 2023, QLoRA, appendix E): 16 levels in [-1, 1], 0 exact, 8 positive
and 7 negative quantiles of N(0, 1), normalised by the largest. Nearest-level rounding
(decision thresholds at the midpoints between levels) as in bitsandbytes.

Memory per weight at block 64: nf4 0.5625 bytes with float32 scales (0.53125 with
float16), int8 1.0625 (1.03125); bfloat16/float16 weights take 2.

einsum(eqn, x, q, dtype) is jnp.einsum(eqn, x, dequantize(q, dtype)) inside a
jax.checkpoint whose residuals are x and the quantised arrays only: the backward pass
dequantises again instead of keeping (in a scan, stacking) a dequantised copy per layer.
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("nf4", "int8")

# The NormalFloat4 levels (QLoRA appendix E / bitsandbytes), float32, ascending.
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)

# Decision thresholds: x / absmax above _NF4_MIDS[k - 1] (and not above _NF4_MIDS[k])
# gets code k; a value exactly on a midpoint gets the lower code.
_NF4_MIDS = ((NF4[1:] + NF4[:-1]) / 2).astype(np.float32)


@flax.struct.dataclass
class QArray:
  """A block-quantised array (see the module docstring); a pytree whose leaves are
  `codes` and `scales`. kind "nf4" | "int8"; tail the per-item shape; dtype the name of
  the original dtype (dequantize's default); block the weights per scale."""
  codes: jax.Array
  scales: jax.Array
  kind: str = flax.struct.field(pytree_node=False, default="nf4")
  tail: tuple = flax.struct.field(pytree_node=False, default=())
  dtype: str = flax.struct.field(pytree_node=False, default="float32")
  block: int = flax.struct.field(pytree_node=False, default=64)

  @property
  def lead(self):
    return len(self.codes.shape) - 2

  @property
  def shape(self):
    return tuple(self.codes.shape[:-2]) + tuple(self.tail)

  @property
  def ndim(self):
    return len(self.shape)

  @property
  def size(self):
    return math.prod(self.shape)


def quantizable(shape, lead=0, block=64):
  """Whether an array of `shape` can be quantised keeping its first `lead` axes: the
  items (shape[lead:]) are non-empty and hold a whole number of (even-sized) blocks."""
  shape = tuple(shape)
  if block <= 0 or block % 2 or len(shape) <= lead or lead < 0:
    return False
  n = math.prod(shape[lead:])
  return n > 0 and n % block == 0


def quantize(x, kind="nf4", lead=0, block=64, scale_dtype=jnp.float32):
  """QArray of x (any float array) keeping its first `lead` axes; see the module
  docstring; jitted (one compilation per shape), traceable. scale_dtype float32
  (default) or float16 (same error on weights of usual size; blocks with absmax above
  65504 would give inf / nan, below 6e-5 lose precision); x is rounded against the
  stored (rounded) scale."""
  if kind not in KINDS:
    raise ValueError(f"quantize kind {kind!r} unknown; valid: {KINDS}")
  shape = tuple(x.shape)
  if not quantizable(shape, lead, block):
    raise ValueError(f"cannot quantize shape {shape} with lead {lead} in blocks of {block}: "
                     f"the items {shape[lead:]} must hold a whole number of blocks")
  return _quantize(jnp.asarray(x), kind, lead, block, jnp.dtype(scale_dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize(x, kind, lead, block, scale_dtype):
  shape = tuple(x.shape)
  dtype = jnp.dtype(x.dtype).name
  tail = shape[lead:]
  nblocks = math.prod(tail) // block
  # Elementwise from x to the codes (XLA fuses it): the temporaries are the size of the
  # codes, not several float32 copies of x (24 bytes a weight before; 2 now).
  xb = x.reshape(shape[:lead] + (nblocks, block))
  scales = jnp.max(jnp.abs(xb), axis=-1).astype(scale_dtype)  # (Exact in x's dtype.)
  s = scales.astype(jnp.float32)[..., None]
  y = xb.astype(jnp.float32) / jnp.where(s == 0, 1.0, s)  # All-zero blocks: 0s, scale 0.
  if kind == "nf4":
    # The number of midpoints below y, as a sum of comparisons: no [..., 15] temporary.
    idx = sum((y > float(m)).astype(jnp.uint8) for m in _NF4_MIDS)
    codes = (idx[..., 0::2] << 4) | idx[..., 1::2]
  else:
    codes = jnp.clip(jnp.round(y * 127.0), -127, 127).astype(jnp.int8)
  return QArray(codes=codes, scales=scales, kind=kind, tail=tail, dtype=dtype, block=block)


def dequantize(q, dtype=None):
  """The array of q.shape that q stores, in `dtype` (default q.dtype); computed in
  float32 then cast. Works for any number of leading axes; traceable."""
  return _dequantize(q, jnp.dtype(q.dtype if dtype is None else dtype))


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(q, dtype):
  scales = q.scales.astype(jnp.float32)[..., None]
  if q.kind == "nf4":
    hi = (q.codes >> 4).astype(jnp.int32)
    lo = (q.codes & 15).astype(jnp.int32)
    idx = jnp.stack([hi, lo], axis=-1).reshape(q.codes.shape[:-1] + (q.block,))
    values = jnp.take(jnp.asarray(NF4), idx, axis=0) * scales
  elif q.kind == "int8":
    values = q.codes.astype(jnp.float32) * (scales / 127.0)
  else:
    raise ValueError(f"QArray kind {q.kind!r} unknown; valid: {KINDS}")
  return values.reshape(q.shape).astype(dtype)


def nbytes(q):
  """Bytes stored by q (codes and scales), or by a plain array; abstract values
  (jax.ShapeDtypeStruct leaves, e.g. jax.eval_shape of quantize) work too."""
  leaves = [q.codes, q.scales] if isinstance(q, QArray) else [q]
  return sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in leaves)


def einsum(eqn, x, q, dtype=None):
  """jnp.einsum(eqn, x, w) in `dtype` (default x's), w = dequantize(q, dtype) for a
  QArray q (or q cast to dtype for a plain array), inside a jax.checkpoint whose
  residuals are x and q's stored arrays: the backward pass dequantises again."""
  dtype = jnp.dtype(x.dtype if dtype is None else dtype)
  if not isinstance(q, QArray) and q.dtype == dtype:
    return jnp.einsum(eqn, x.astype(dtype), q)
  return _dequant_einsum(eqn, x, q, dtype)


@functools.partial(jax.checkpoint, static_argnums=(0, 3))
def _dequant_einsum(eqn, x, q, dtype):
  w = dequantize(q, dtype) if isinstance(q, QArray) else q.astype(dtype)
  return jnp.einsum(eqn, x.astype(dtype), w)
