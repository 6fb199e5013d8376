"""What a checkpoint reader hands the loader: lazily readable leaves and a config.

Readers (npz.py, hf.py) describe a file without reading its arrays; the loader then
reads, adapts, casts and places one leaf at a time, so peak memory stays near the size
of the loaded parameters plus one leaf.
"""

import dataclasses
from typing import Callable

import numpy as np


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as asked; the message names the file and key."""


@dataclasses.dataclass
class Leaf:
  """One of our (stacked) parameters in a file: shape, dtype, and how to read it.

  `read(start=None, stop=None) -> np.ndarray`: rows [start:stop] along axis 0 (the
  layer axis of stacked leaves), all rows when None; a fresh array the caller owns.
  `origin` names the file and its key(s), for error messages. `partial`: read(start, stop)
  reads only those rows (else it reads the whole leaf and slices, so read it once).
  """
  shape: tuple
  dtype: object
  read: Callable
  origin: str
  partial: bool = False


@dataclasses.dataclass
class Source:
  """A described checkpoint: {our stacked name: Leaf} and the model_config it implies."""
  path: str
  kind: str  # "npz" | "hf"
  leaves: dict
  config: dict


def check_shapes(have, expected, *, where, implied_by, name=str, noun="key", fits=None,
                 origin=None):
  """Raises CheckpointError on the first key missing from `have`, of another shape, or
  extra, naming the key as `name(key)` and the place as `where`.

  have, expected: {our stacked name: shape tuple}; implied_by: what `expected` comes
  from ("the model config", "config.json"); fits(key, have, want) -> bool replaces the
  equality test where a leaf may differ (resizable vocabulary, position embedding);
  origin(key): the file holding a leaf of the wrong shape (default `where`).
  """
  missing = [k for k in expected if k not in have]
  if missing:
    raise CheckpointError(f"{where}: {len(missing)} {noun}(s) that {implied_by} implies are "
                          "missing: " + ", ".join(name(k) for k in missing))
  for key, want in expected.items():
    got = tuple(have[key])
    if not (fits(key, got, tuple(want)) if fits else got == tuple(want)):
      raise CheckpointError(f"{origin(key) if origin else where}: {noun} {name(key)} has "
                            f"shape {got} in the file but {tuple(want)} in {implied_by} "
                            "(a checkpoint of another variant?)")
  extra = sorted(k for k in have if k not in expected)
  if extra:
    raise CheckpointError(f"{where}: {noun}(s) that {implied_by} does not use (a checkpoint of "
                          f"another variant?): {', '.join(name(k) for k in extra[:10])}"
                          + (" ..." if len(extra) > 10 else ""))


def aligned_empty(shape, dtype):
  """np.empty whose data is 64-byte aligned, so jax can adopt it without a copy (dlpack)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + 64, np.uint8)
  skip = -raw.ctypes.data % 64
  return raw[skip:skip + nbytes].view(dtype).reshape(shape)
