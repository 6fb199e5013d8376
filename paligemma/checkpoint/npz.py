"""big_vision / Kaggle .npz checkpoints: describe (one leaf at a time) and write.

Layout: a zip of `<name>.npy` members, "/"-joined names with or without a leading
`params/`, layers stacked (`encoderblock`, `layers`) or not (`encoderblock_{i}`,
`layers_{i}`). numpy has no bfloat16: such arrays are stored as 2-byte void (`|V2`) and
re-viewed as bfloat16 here. Uncompressed members are memory-mapped rather than read, so a
leaf costs no memory until it is copied into its destination.
"""

import os
import struct
import zipfile

import ml_dtypes
import numpy as np

from paligemma.checkpoint import shapes as shapes_lib
from paligemma.checkpoint import tree
from paligemma.checkpoint.source import CheckpointError, Leaf, Source, aligned_empty

# transformers' vocabulary (257_152 + image token + padding to 64): not ours.
_HF_ROWS, _OUR_ROWS = 257_216, 257_152


def _file_dtype(descr_dtype):
  if descr_dtype.kind == "V" and descr_dtype.itemsize == 2:
    return np.dtype(ml_dtypes.bfloat16)
  return descr_dtype


class _Member:
  """One .npy inside the zip: header parsed, data memory-mapped when stored uncompressed."""

  def __init__(self, path, zf, info):
    self.path, self.info = path, info
    with zf.open(info) as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      self.shape, self.fortran, dtype = read_header(f, max_header_size=1 << 20)
      header_len = f.tell()
    if dtype.hasobject:
      raise CheckpointError(f"{path}: key {info.filename!r} holds Python objects; "
                            "refusing to unpickle (allow_pickle=False)")
    self.raw_dtype, self.dtype = dtype, _file_dtype(dtype)
    self.offset = None
    if info.compress_type == zipfile.ZIP_STORED:
      self.offset = _data_offset(path, info) + header_len

  def read(self, start=None, stop=None):
    """Rows [start:stop] along axis 0 (all when None), read straight into a new array."""
    rows = self.shape[0] if self.shape else 1
    start, stop = start or 0, rows if stop is None else stop
    if self.offset is None or self.fortran or not self.shape:
      if self.offset is None:  # Compressed (np.savez_compressed): inflate the whole member.
        with zipfile.ZipFile(self.path) as zf, zf.open(self.info) as f:
          arr = np.lib.format.read_array(f, allow_pickle=False)
      else:
        arr = self._read_bytes(0, self.shape, "F" if self.fortran else "C")
      arr = arr.view(self.dtype) if self.dtype != self.raw_dtype else arr
      return arr if not self.shape else arr[start:stop]
    row_bytes = int(np.prod(self.shape[1:])) * self.raw_dtype.itemsize
    arr = self._read_bytes(start * row_bytes, (stop - start,) + tuple(self.shape[1:]), "C")
    return arr.view(self.dtype) if self.dtype != self.raw_dtype else arr

  def _read_bytes(self, skip, shape, order):
    # Plain reads, not a memory map: mapped file pages would count as resident memory.
    out = aligned_empty(shape, self.raw_dtype)
    out = out if order == "C" else out.reshape(shape[::-1]).T
    view = memoryview(out.reshape(-1, order=order).view(np.uint8))
    with open(self.path, "rb") as f:
      f.seek(self.offset + skip)
      got = f.readinto(view) if view.nbytes else 0
    if got != view.nbytes:
      raise CheckpointError(f"{self.path}: key {self.info.filename!r} is cut short "
                            "(truncated file?); download it again")
    return out


def _data_offset(path, info):
  """Byte offset of a member's data: after its local header (whose extra field may differ)."""
  with open(path, "rb") as f:
    f.seek(info.header_offset)
    head = f.read(30)
  if len(head) < 30 or head[:4] != b"PK\x03\x04":
    raise CheckpointError(f"{path}: corrupt zip entry for key {info.filename!r}")
  name_len, extra_len = struct.unpack("<HH", head[26:30])
  return info.header_offset + 30 + name_len + extra_len


def _truncation_error(path, err):
  """Names the member a truncated .npz ends inside, by walking the local zip headers."""
  size = os.path.getsize(path)
  complete, pos = [], 0
  with open(path, "rb") as f:
    while True:
      f.seek(pos)
      head = f.read(30)
      if len(head) < 30 or head[:4] != b"PK\x03\x04":
        break
      csize, usize, name_len, extra_len = struct.unpack("<LLHH", head[18:30])
      name = f.read(name_len).decode("utf-8", "replace")
      extra = f.read(extra_len)
      if csize == 0xFFFFFFFF:  # zip64: sizes live in the extra field (id 1).
        i = 0
        while i + 4 <= len(extra):
          tag, n = struct.unpack("<HH", extra[i:i + 4])
          if tag == 1:
            usize, csize = struct.unpack("<QQ", extra[i + 4:i + 20])
            break
          i += 4 + n
      end = pos + 30 + name_len + extra_len + csize
      if end > size or len(name) < name_len:
        return CheckpointError(
            f"{path}: truncated file ({size:,} bytes): it ends inside key {name!r} "
            f"after {len(complete)} complete key(s); download it again ({err})")
      complete.append(name)
      pos = end
  last = f" (last complete key {complete[-1]!r})" if complete else ""
  return CheckpointError(f"{path}: not a complete .npz file{last}: {err}; "
                         "download it again or check the path")


def _stack(readers):
  """Stacks layers read one at a time into one (aligned) array."""
  first = readers[0]()
  out = aligned_empty((len(readers),) + first.shape, first.dtype)
  out[0] = first
  del first
  for i, read in enumerate(readers[1:], 1):
    out[i] = read()
  return out


def _our_name(key):
  name = key[:-4] if key.endswith(".npy") else key
  return name[len("params/"):] if name.startswith("params/") else name


def describe(path):
  """Source for a .npz: {our stacked name: Leaf} and the config its shapes imply."""
  try:
    zf = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise _truncation_error(path, e) from None
  with zf:
    members = {_our_name(i.filename): _Member(path, zf, i) for i in zf.infolist()}
  leaves, per_layer = {}, {}
  for name, m in members.items():
    hit = tree.split_layer(name)
    if hit is None:
      leaves[name] = Leaf(tuple(m.shape), m.dtype, m.read, f"{path}: key {m.info.filename!r}",
                          partial=m.offset is not None and not m.fortran)
    else:
      stacked, i, rest = hit
      per_layer.setdefault(f"{stacked}/{rest}", {})[i] = m
  for name, layers in per_layer.items():
    if sorted(layers) != list(range(len(layers))):
      raise CheckpointError(f"{path}: layers of {name!r} are not numbered 0..N-1: "
                            f"{sorted(layers)} (missing key(s) for the gaps)")
    ms = [layers[i] for i in range(len(layers))]
    if len({(tuple(m.shape), m.dtype) for m in ms}) > 1:
      raise CheckpointError(f"{path}: layers of {name!r} differ in shape or dtype: "
                            + ", ".join(f"{m.info.filename} {m.shape}" for m in ms))
    leaves[name] = Leaf((len(ms),) + tuple(ms[0].shape), ms[0].dtype,
                        lambda start=None, stop=None, ms=ms: _stack(
                            [m.read for m in ms[start:stop]]),
                        f"{path}: keys {ms[0].info.filename!r}..{ms[-1].info.filename!r}",
                        partial=True)
  try:
    config = shapes_lib.infer_config({n: l.shape for n, l in leaves.items()}, path)
  except KeyError as e:
    raise CheckpointError(e.args[0]) from None
  if config["llm"]["vocab_size"] == _HF_ROWS:
    config["llm"]["vocab_size"] = _OUR_ROWS  # A file converted from transformers.
  return Source(path, "npz", leaves, config)


def save_npz(params, path, dtype=None, progress=False):
  """Writes params (stacked or per-layer) to a big_vision .npz; returns bytes written.

  dtype: None keeps each leaf's dtype; bfloat16 is stored as 2-byte void, as big_vision
  does. Written one leaf at a time to `path + ".tmp"`, then renamed into place.
  """
  flat = tree.flatten(params)
  dtype = None if dtype is None else np.dtype(dtype)
  tmp = str(path) + ".tmp"
  items = flat.items()
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    items = tqdm(items, desc=f"writing {os.path.basename(str(path))}", unit="leaf")
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, value in items:
      arr = np.asarray(value)
      if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
      if arr.dtype == ml_dtypes.bfloat16:
        arr = arr.view(np.dtype("V2"))
      with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
  os.replace(tmp, path)
  return os.path.getsize(path)
