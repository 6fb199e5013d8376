"""`load`: any supported checkpoint -> (params, model_config), one leaf at a time."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from paligemma.checkpoint import adapt
from paligemma.checkpoint import hf
from paligemma.checkpoint import kaggle
from paligemma.checkpoint import npz
from paligemma.checkpoint import peft
from paligemma.checkpoint import shapes as shapes_lib
from paligemma.checkpoint import tree
from paligemma.checkpoint.source import CheckpointError, aligned_empty, check_shapes
from paligemma.models import variants

_EMBEDDING, _POSEMB = "llm/embedder/input_embedding", "img/pos_embedding"


def describe(source):
  """Source (leaves + inferred config) for a path, HF directory or `kaggle:` handle."""
  source = os.fspath(source)
  if source.startswith(kaggle.PREFIX):
    return describe(kaggle.pick_checkpoint(kaggle.resolve(source), source))
  if not os.path.exists(source):
    raise CheckpointError(f"{source}: no such file or directory (for a Kaggle model use "
                          "kaggle:<owner>/<model>/jax/<variation>)")
  if os.path.isdir(source):
    if os.path.exists(os.path.join(source, "config.json")):
      return hf.describe(source)
    return describe(kaggle.pick_checkpoint(source))
  if source.endswith(hf.PICKLE_SUFFIXES):
    raise CheckpointError(hf.refuse_pickle_message(source))
  if source.endswith(".safetensors"):
    return hf.describe(os.path.dirname(source) or ".")
  if source.endswith(".npz"):
    return npz.describe(source)
  raise CheckpointError(f"{source}: unknown checkpoint format; expected a .npz file, a "
                        "Hugging Face directory (config.json + *.safetensors) or a kaggle: handle")


def _preset(kind, name):
  """The fields a variant name fixes (architecture), without the defaults."""
  if kind == "img":
    full = variants.resolve_vit({"variant": name})
    return {k: full[k] for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size")}
  full = variants.resolve_gemma({"variant": name})
  return {k: full[k] for k in list(variants.GEMMA_VARIANTS[name]) + ["query_pre_attn_scalar"]}


def merge_config(inferred, given):
  """The file's config, overridden by a given (partial) one; a given variant brings its dims."""
  out = {}
  for kind, resolve in (("img", variants.resolve_vit), ("llm", variants.resolve_gemma)):
    cfg = dict(inferred[kind])
    g = dict((given or {}).get(kind) or {})
    if g.get("variant") is not None:
      cfg.update(_preset(kind, g["variant"]))
    cfg.update(g)
    out[kind] = resolve(cfg)
  return out


def _resizable(name, have, want):
  """The file's leaf fits the config: equal, or a vocabulary / position grid to adapt."""
  if name == _EMBEDDING:
    return len(have) == 2 and have[1] == want[1]
  if name == _POSEMB:
    return len(have) == 3 and have[2] == want[2] and np.sqrt(have[1]) % 1 == 0
  return have == want


def _check(src, expected):
  """Raises on the first leaf that the config and file disagree on (beyond resizing)."""
  check_shapes({n: leaf.shape for n, leaf in src.leaves.items()}, expected, where=src.path,
               implied_by="the model config", fits=_resizable,
               origin=lambda n: src.leaves[n].origin)


def _sharding_for(sharding, path, shape):
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return sharding
  return sharding(path, shape)


# Rows of a leaf read at a time when it is read in pieces (cast or split into layers).
PIECE_BYTES = 256 << 20


def _read_as(leaf, read, shape, dtype, partial):
  """The leaf as a host array of `dtype`.

  Cast in pieces of rows where the reader reads just those rows (leaf.partial): the
  host then holds the result and one piece, not the whole leaf in the file's dtype too.
  """
  if not shape:
    return np.asarray(read(None, None)).astype(dtype)
  if not partial or np.dtype(leaf.dtype) == dtype:
    arr = read(0, shape[0])
    if arr.dtype == dtype:
      return arr
    pieces = [(0, shape[0], arr)]
  else:
    row = max(1, int(np.prod(shape[1:])) * np.dtype(leaf.dtype).itemsize)
    step = max(1, PIECE_BYTES // row)
    pieces = ((i, min(shape[0], i + step), None) for i in range(0, shape[0], step))
  out = aligned_empty(shape, dtype)
  for start, stop, arr in pieces:
    np.copyto(out[start:stop], read(start, stop) if arr is None else arr, casting="unsafe")
  return out


def _layers(leaf, read, shape, dtype, partial):
  """The leaf's host arrays [i] of its leading axis, in `dtype`, one at a time: read
  a layer at a time where the reader reads rows (leaf.partial), else read whole once."""
  whole = None if partial else _read_as(leaf, read, shape, dtype, False)
  for i in range(shape[0]):
    arr = (whole[i] if whole is not None else
           _read_as(leaf, lambda a, b, i=i: read(i + a, i + b), (1,) + shape[1:], dtype,
                    True)[0])
    yield np.ascontiguousarray(arr)


def _stacked(layers, n):
  """The `n` pytrees of `layers` (an iterator) stacked on a new leading axis, each
  written into the result as it comes (donated): one layer more than the result at most,
  not a list of layers and their stacked copy."""
  out = None
  for i, layer in enumerate(layers):
    if out is None:
      out = jax.tree.map(lambda x: jnp.zeros((n,) + x.shape, x.dtype, device=x.sharding),
                         layer)
    out = _set_layer(out, layer, i)
  return out


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked, layer, i):
  return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, i, 0),
                      stacked, layer)


def _to_device(arr, sharding):
  """Host array -> jax.Array without holding the leaf twice where jax allows.

  jax.device_put copies; on a CPU backend with no sharding asked, jax adopts an aligned
  host buffer as is through dlpack (numpy's dlpack has no bfloat16: those are copied).
  On an accelerator the leaf always goes to the default device (a dlpack array would be
  a CPU array, and computations on it would run on the CPU).
  """
  if (sharding is None and arr.dtype != jnp.bfloat16 and arr.size
      and jax.default_backend() == "cpu"):
    try:
      return jax.dlpack.from_dlpack(np.ascontiguousarray(arr), copy=False)
    except (ValueError, BufferError, RuntimeError):
      pass  # Unaligned or unsupported: fall back to a copy.
  return jax.device_put(arr, sharding)


def _dtype_for(dtype, name, file_dtype):
  if callable(dtype) and not isinstance(dtype, type):
    dtype = dtype(name)
  return np.dtype(file_dtype) if dtype is None else np.dtype(jnp.dtype(dtype))


def load(source, *, config=None, dtype=None, sharding=None, stacked=True, progress=False,
         adapter=None, merge=True, transform=None):
  """Checkpoint (.npz, HF dir, `kaggle:` handle) -> (params, model_config).

  config: optional (partial) model_config; a different vocab_size trims / extends the
  embedding (adapt.resize_vocab), a different img image_size resamples pos_embedding;
  any other disagreement with the file raises CheckpointError.
  dtype: cast every leaf (e.g. "bfloat16"); None keeps the file's dtype; or a callable
    name -> dtype | None per leaf ("llm/layers/attn/q_einsum/w"; e.g. frozen leaves in
    float16, trainable ones in float32), so no leaf is ever held in two dtypes.
  sharding: a jax.sharding.Sharding, or callable(path_tuple, shape) -> Sharding.
  transform: callable(name, shape) -> None, or a function of one layer (the host array
    [i] of the leaf's leading axis, in the leaf's dtype) to a pytree of jax arrays; the
    leaf is then those results stacked, and the host holds one layer of it at a time
    (where the file reads rows): QLoRA's frozen weights are quantized as they load.
  stacked: False returns per-layer names (`encoderblock_{i}`, `layers_{i}`).
  adapter: a Hugging Face PEFT LoRA adapter directory (peft.py) to apply: merged into the
    weights (W + lora_alpha / r * B A), or, merge=False, returned as our adapter leaves
    (`<weight>_lora_a` / `_lora_b`) with model_config["lora"] set, for build_model.
  """
  src = describe(source)
  model_config = merge_config(src.config, config)
  expected = shapes_lib.param_shapes(model_config)
  _check(src, expected)
  if adapter is not None:
    src, expected, model_config = peft.apply(
        src, expected, model_config, adapter, merge=merge,
        dtype_for=lambda name, leaves=src.leaves: _dtype_for(dtype, name, leaves[name].dtype))
  names = list(expected)
  if progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    names = tqdm(names, desc=f"loading {os.path.basename(os.fspath(source).rstrip('/'))}",
                 unit="leaf")
  flat = {}
  for name in names:
    leaf, shape = src.leaves[name], expected[name]
    read = leaf.read
    if name == _EMBEDDING and shape[0] > leaf.shape[0]:
      full = adapt.resize_vocab(leaf.read(), shape[0])  # Extension: needs all rows (rare).
      read = lambda start, stop, full=full: full[start:stop]
    elif name == _POSEMB:
      small = adapt.resize_posemb(leaf.read(), shape[1])
      read = lambda start, stop, small=small: small[start:stop]
    # (A trimmed vocabulary just reads fewer rows.)
    partial = leaf.partial or read is not leaf.read  # (The adapted leaves are in memory.)
    out_dtype = _dtype_for(dtype, name, leaf.dtype)
    layer_fn = transform(name, shape) if transform and stacked else None
    if layer_fn is not None:
      flat[name] = _stacked(map(layer_fn, _layers(leaf, read, shape, out_dtype, partial)),
                            shape[0])
      continue
    split = None if stacked else tree.stacked_group(name)
    if split is None:
      arr = _read_as(leaf, read, shape, out_dtype, partial)
      flat[name] = _to_device(arr, _sharding_for(sharding, tuple(name.split("/")), shape))
      continue
    for i, arr in enumerate(_layers(leaf, read, shape, out_dtype, partial)):
      layer = tree.per_layer_name(split[0], i, split[1])
      flat[layer] = _to_device(arr, _sharding_for(sharding, tuple(layer.split("/")), shape[1:]))
  return tree.unflatten(flat), model_config
