"""Hugging Face PaliGemma directories: describe (one leaf at a time) and write.

A directory holds config.json and safetensors weights, one file or shards listed in
model.safetensors.index.json. Tensors are memory-mapped from the safetensors layout
(8-byte header length, JSON header, raw little-endian data) after safetensors itself
has validated the file; numpy cannot read bfloat16 through safetensors, ml_dtypes can.
Names are translated by names.py, the one table shared with export.
"""

import glob
import json
import os
import struct

import jax
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from paligemma.checkpoint import names
from paligemma.checkpoint import shapes as shapes_lib
from paligemma.checkpoint import tree
from paligemma.checkpoint.source import CheckpointError, Leaf, Source, aligned_empty, check_shapes
from paligemma.models import variants

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SHARD_BYTES = 4 << 30


class _Tensor:
  """One tensor of a safetensors file, memory-mapped on read."""

  def __init__(self, path, name, shape, dtype, offset):
    self.path, self.name, self.shape, self.dtype, self.offset = path, name, shape, dtype, offset

  def read(self, start=None, stop=None):
    """Rows [start:stop] (all when None), read into a new array (not mapped: see npz.py)."""
    rows = self.shape[0] if self.shape else 1
    start, stop = start or 0, rows if stop is None else stop
    row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
    out = aligned_empty(((stop - start,) + self.shape[1:]) if self.shape else (), self.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(self.path, "rb") as f:
      f.seek(self.offset + start * row_bytes)
      if view.nbytes and f.readinto(view) != view.nbytes:
        raise CheckpointError(f"{self.path}: tensor {self.name!r} is cut short; download again")
    return out


def _read_header(path):
  """{name: _Tensor} of one safetensors file; errors name the file and the cut tensor."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
    header = f.read(n) if n is not None and n < size else b""
  try:
    meta = json.loads(header)
  except ValueError:
    raise CheckpointError(f"{path}: not a safetensors file, or its header is cut short "
                          "(truncated download?); download it again") from None
  meta.pop("__metadata__", None)
  base = 8 + n
  tensors = {}
  for name, info in sorted(meta.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    start, end = info["data_offsets"]
    if base + end > size:
      raise CheckpointError(f"{path}: truncated file ({size:,} of {base + end:,}+ bytes): "
                            f"tensor {name!r} is cut short; download it again")
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    tensors[name] = _Tensor(path, name, tuple(info["shape"]), np.dtype(_DTYPES[info["dtype"]]),
                            base + start)
  try:  # The library's own validation (header consistency, sizes).
    with safetensors.safe_open(path, "np"):
      pass
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}: invalid safetensors file: {e}") from None
  return tensors


def _weight_files(directory):
  index = os.path.join(directory, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
    if missing:
      raise CheckpointError(f"{index}: shard file(s) missing from {directory}: {missing}")
    return [os.path.join(directory, f) for f in files]
  files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
  if files:
    return files
  pickles = [f for f in os.listdir(directory) if f.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise CheckpointError(refuse_pickle_message(os.path.join(directory, pickles[0])))
  raise CheckpointError(f"{directory}: no *.safetensors weights found")


def refuse_pickle_message(path):
  return (f"{path}: PyTorch pickle checkpoints are refused (unpickling can run arbitrary "
          "code). Convert it to safetensors first, e.g. `PaliGemmaForConditionalGeneration"
          ".from_pretrained(dir).save_pretrained(out_dir)` with transformers, then load out_dir.")


def hf_shapes(model_config):
  """{canonical transformers name: shape} implied by a model_config (no allocation)."""
  ours = shapes_lib.param_shapes(model_config)
  out = {}
  for e in names.table(model_config):
    shape = ours[e.ours][1:] if e.layered else ours[e.ours]
    theirs = jax.eval_shape(e.to_hf, jax.ShapeDtypeStruct(shape, np.float32))
    for layer in names.hf_layer_names(e, names.depth_of(model_config, e.ours)):
      out.update({n: tuple(t.shape) for n, t in zip(layer, theirs)})
  return out


def describe(directory):
  """Source for a transformers PaliGemma directory."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise CheckpointError(f"{directory}: no config.json; a Hugging Face PaliGemma directory "
                          "holds config.json and *.safetensors")
  with open(config_path) as f:
    hf_config = json.load(f)
  if hf_config.get("model_type") != "paligemma":
    raise CheckpointError(f"{config_path}: model_type is {hf_config.get('model_type')!r}, "
                          "not 'paligemma'")
  tensors = {}
  for path in _weight_files(directory):
    for name, t in _read_header(path).items():
      canonical = names.canonical_hf_name(name)
      if canonical in names.IGNORED_HF_NAMES:
        continue
      if canonical in tensors:
        raise CheckpointError(f"{path}: tensor {name!r} duplicates "
                              f"{tensors[canonical].name!r} of {tensors[canonical].path}")
      tensors[canonical] = t
  config = names.from_hf_config(hf_config)
  emb = tensors.get("language_model.embed_tokens.weight")
  rows = emb.shape[0] if emb is not None else config["llm"]["vocab_size"]
  file_config = {"img": config["img"], "llm": dict(config["llm"], vocab_size=rows)}
  expected = hf_shapes(file_config)
  # Names as on the Hub (`model.`-prefixed spellings are accepted too).
  check_shapes({n: t.shape for n, t in tensors.items()}, expected, where=directory,
               implied_by="config.json",
               noun="tensor", name=lambda n: names.export_hf_name(n) if n in expected else n,
               origin=lambda n: tensors[n].path)

  ours = shapes_lib.param_shapes(file_config)
  leaves = {}
  for e in names.table(file_config):
    layers = [[tensors[n] for n in layer]
              for layer in names.hf_layer_names(e, names.depth_of(file_config, e.ours))]

    def read(start=None, stop=None, e=e, layers=layers):
      if e.layered:  # Filled layer by layer: one layer of temporaries at a time.
        chosen = layers[start:stop]
        out = aligned_empty((len(chosen),) + tuple(ours[e.ours][1:]), chosen[0][0].dtype)
        for i, ts in enumerate(chosen):
          out[i] = e.to_ours([t.read() for t in ts])
        return out
      if e.ours == "llm/embedder/input_embedding":  # Identity mapping: read just the rows.
        return layers[0][0].read(start, stop)
      return np.ascontiguousarray(e.to_ours([t.read() for t in layers[0]]))[start:stop]

    first = layers[0][0]
    span = f"{first.name!r}" + (f" .. (x{len(layers)} layers)" if e.layered else "")
    leaves[e.ours] = Leaf(ours[e.ours], first.dtype, read, f"{first.path}: tensor {span}",
                          partial=e.layered or e.ours == "llm/embedder/input_embedding")
  return Source(directory, "hf", leaves, config)


def _plan_shards(items, limit):
  shards, size = [[]], 0
  for name, nbytes in items:
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes
  return shards


def save_hf(params, model_config, directory, tokenizer=None, progress=False,
            max_shard_bytes=SHARD_BYTES):
  """Writes a transformers PaliGemma directory (config.json + safetensors); returns bytes.

  params: our tree (stacked or per-layer), any float dtype (kept as is). The embedding is
  padded with zero rows to transformers' size (room for the image token, multiple of 64).
  tokenizer: optional SentencePiece model path or transformers tokenizer/processor; when
  given, the processor files are written too (see processor.py).
  """
  if not tree.is_stacked(params):
    params = tree.stack_layers(params)
  flat = tree.flatten(params)
  expected = shapes_lib.param_shapes(model_config)
  check_shapes({n: x.shape for n, x in flat.items()}, expected, where="save_hf params",
               implied_by="the model_config")
  dtypes = {np.dtype(flat[n].dtype) for n in expected}
  dtype = np.dtype(flat["llm/embedder/input_embedding"].dtype)
  if len(dtypes) > 1:
    raise CheckpointError(f"save_hf: params mix dtypes {sorted(map(str, dtypes))}; cast them "
                          "to one first (e.g. jax.tree.map(lambda x: x.astype(...), params))")
  rows = names.hf_vocab_rows(variants.resolve_gemma(model_config["llm"])["vocab_size"])
  entries = names.table(model_config)
  producers = {}  # export name -> (entry, layer index, position), in file order.
  sizes = {}
  hf_expected = hf_shapes(model_config)
  for e in entries:
    for i, layer in enumerate(names.hf_layer_names(e, names.depth_of(model_config, e.ours))):
      for j, n in enumerate(layer):
        shape = hf_expected[n]
        if e.ours == "llm/embedder/input_embedding":
          shape = (rows,) + shape[1:]
        producers[names.export_hf_name(n)] = (e, i, j)
        sizes[names.export_hf_name(n)] = int(np.prod(shape)) * dtype.itemsize
  shards = _plan_shards(sizes.items(), max_shard_bytes)
  os.makedirs(directory, exist_ok=True)
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(producers), desc=f"writing {os.path.basename(directory)}", unit="tensor")
  weight_map = {}
  for shard, fname in zip(shards, files):
    out = {}
    for n in shard:
      e, i, j = producers[n]
      value = np.asarray(flat[e.ours][i] if e.layered else flat[e.ours])
      t = e.to_hf(value)[j]
      if e.ours == "llm/embedder/input_embedding":
        t = np.concatenate([t, np.zeros((rows - t.shape[0], t.shape[1]), t.dtype)])
      out[n] = np.ascontiguousarray(t)
      weight_map[n] = fname
      if bar:
        bar.update()
    safetensors.numpy.save_file(out, os.path.join(directory, fname), metadata={"format": "pt"})
    _umask_mode(os.path.join(directory, fname))
    del out
  if bar:
    bar.close()
  if len(files) > 1:
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
                f, indent=2)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(names.to_hf_config(model_config, dtype=_torch_dtype_name(dtype)), f, indent=2)
  with open(os.path.join(directory, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}, f, indent=2)
  if tokenizer is not None:
    from paligemma.checkpoint import processor  # pylint: disable=g-import-not-at-top
    processor.save_processor(tokenizer, model_config, directory)
  return sum(sizes.values())


def _umask_mode(path):
  """Gives `path` the mode a plain open() would (safetensors writes a 0600 temp file)."""
  mask = os.umask(0o077)  # Reading the umask sets it: briefly to the strictest one.
  os.umask(mask)
  os.chmod(path, 0o666 & ~mask)


def _torch_dtype_name(dtype):
  return {"bfloat16": "bfloat16", "float16": "float16"}.get(dtype.name, "float32")
