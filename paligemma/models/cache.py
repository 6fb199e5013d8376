"""The KV cache of decoding: one type owns its layout, its row selection and its shardings.

Axis letters: L layers, B rows (examples, or examples x beams), S cache slots,
K kv heads, H head dim.
"""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from paligemma import sharding

# The row (batch) axis of each field; None: one value shared by every row.
_ROW_AXIS = dict(k=1, v=1, pos=0, valid=0, index=None, seq_len=0)
_KV_HEAD_AXIS = 3  # Of k and v.


@flax.struct.dataclass
class Cache:
  """What `Model.prefill` fills and `Model.extend` appends one token to.

  k, v     float[L, B, S, K, H]  keys and values of every layer, slot by slot
  pos      int32[B, S]           RoPE position of the token in each slot
  valid    bool[B, S]            which slots hold a real token (not a prompt pad, not yet
                                 written)
  index    int32[]               the next slot to write, shared by the rows
  seq_len  int32[B]              the next position of each row (its real tokens so far)
  """
  k: jax.Array
  v: jax.Array
  pos: jax.Array
  valid: jax.Array
  index: jax.Array
  seq_len: jax.Array

  def _map_rows(self, fn):
    return self.replace(**{name: fn(getattr(self, name), axis)
                           for name, axis in _ROW_AXIS.items() if axis is not None})

  def repeat(self, n):
    """Each row n times: rows b*n .. b*n+n-1 are copies of row b (beams, best-of-n)."""
    return self._map_rows(lambda x, axis: jnp.repeat(x, n, axis=axis))

  def take(self, rows):
    """The rows `rows` int32[B'], in that order (beam search's reordering)."""
    return self._map_rows(lambda x, axis: jnp.take(x, rows, axis=axis))

  def specs(self, mesh, batch_axes=("data",), model_axis="model"):
    """A Cache of PartitionSpecs: rows over `batch_axes` and, in k and v, kv heads over
    `model_axis`, each only where divisible (one kv head, a batch of 3 stay replicated
    over that axis); index replicated. Works on arrays or their shapes (eval_shape)."""
    def spec(name):
      shape, axis = tuple(getattr(self, name).shape), _ROW_AXIS[name]
      if axis is None:
        return P()
      out = list(sharding.batch_spec(mesh, batch_axes, shape, batch_dim=axis))
      if name in ("k", "v"):
        out[_KV_HEAD_AXIS] = sharding.batch_spec(
            mesh, [model_axis], shape, batch_dim=_KV_HEAD_AXIS)[_KV_HEAD_AXIS]
      return P(*out)
    return Cache(**{name: spec(name) for name in _ROW_AXIS})

  def shardings(self, mesh, batch_axes=("data",), model_axis="model"):
    """A Cache of NamedShardings (see `specs`)."""
    specs = self.specs(mesh, batch_axes, model_axis)
    return Cache(**{f.name: NamedSharding(mesh, getattr(specs, f.name))
                    for f in dataclasses.fields(self)})

  def constrain(self, mesh, batch_axes=("data",), model_axis="model"):
    """Inside jit: this cache laid out by `shardings`."""
    return jax.lax.with_sharding_constraint(self, self.shardings(mesh, batch_axes, model_axis))
