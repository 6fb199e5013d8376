"""The tf.data input pipeline: a source -> batches of images, tokens and masks.

Training, `make_train_input(...)`; B = batch_size // process_count (per process), T =
text_len:

  image      float32[B, H, W, 3]  RGB in [-1, 1]
  text       int32[B, T + 1]      [bos] prefix "\\n" suffix [eos] 0 ... (see prompt.py)
  mask_ar    int32[B, T + 1]
  mask_loss  int32[B, T + 1]
  position   int64[B]             place of each example in this process's index stream
                                  (see "Order and sharding"): the data position to
                                  resume from is the last one + 1
  truncated  bool[B]              True where the example was cut to text_len

Evaluation, `make_eval_input(...)`; every example exactly once, in source order, the last
batch padded:

  image      float32[B, H, W, 3]
  text       int32[B, T]          [bos] prefix "\\n" 0 ...
  mask_ar    int32[B, T]
  mask_input int32[B, T]
  valid      bool[B]              False on padding rows and on unreadable images
  index      int32[B]             position in the source (-1 on padding rows);
                                  `source[index]` has every field of the example
  id         list[str]            ("" on padding rows)
  prefix     list[str]
  references list[list[str]]      all acceptable answers of the example

Iterating an `Input` gives these dicts (numpy arrays, and Python lists for strings);
`Input.dataset` is the tf.data.Dataset itself (strings there are bytes, references a
JSON string).

Steps per example: read the example from the source, assemble tokens and masks
(`paligemma.prompt.assemble`), decode the image (`images.decode`: TF's decoders as
big_vision's `decode`, PIL for the rest), resize to `image_size` and scale to [-1, 1]
(`images.resize_and_scale`: big_vision's `resize(R, antialias=...)|value_range(-1, 1)`,
bit for bit; antialias=False is the plain `resize(R)` of some task transfers); examples
are processed in parallel, order preserved.

Order and sharding (training): epoch e visits the examples in the permutation drawn
from (seed, e); process p of P takes every P-th example of it from the p-th on, cut to
len(source) // P so every process has as many (the few left over differ each epoch).
Shards are disjoint and together cover the data. The whole-epoch permutation replaces
a shuffle buffer: it shuffles fully, and `start_position` resumes at any point of the
stream without reading what comes before. Skipped examples take a place in the stream
but not in a batch, so the trainer resumes from the `position` of the last example it
trained on + 1 (stored in its checkpoints), not from step * B.

Streams (sources with `is_stream`, e.g. `hf` with streaming=True): no random access, so
epoch e is the stream's own shuffled order for (seed, e) (`source.stream(seed, e)`),
and process p of P keeps every P-th example from the p-th, cut to len(source) // P as
above; positions count the same way, and a resume at position n re-reads (without
decoding images) the n examples before it in that epoch. Training only.

Bad data: an unreadable image (missing, corrupt, not an image, a decompression bomb) is
skipped, counted in `Input.stats` and named in a warning; with on_bad_image="raise" it
stops the run instead. Over-long training examples are truncated, flagged (`truncated`)
and counted (`Input.stats`); an evaluation prompt that does not fit text_len with its
separator raises, naming the example.
"""

import dataclasses
import itertools
import json
import logging
import threading

import jax
import numpy as np
import tensorflow as tf

from paligemma import prompt
from paligemma.data import images
from paligemma.data import sources

TRAIN_KEYS = ("image", "text", "mask_ar", "mask_loss", "position", "truncated")
EVAL_KEYS = ("image", "text", "mask_ar", "mask_input", "valid", "index", "id", "prefix",
             "references")
BAD_IMAGE_POLICIES = ("skip", "raise")
_log = logging.getLogger(__name__)


class Stats:
  """Thread-safe tally of truncated examples and skipped images (by example id)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.truncated = set()   # ids of examples cut to text_len.
    self.skipped = {}        # id -> reason, for examples whose image was unreadable.

  @property
  def num_truncated(self):
    return len(self.truncated)

  @property
  def num_skipped(self):
    return len(self.skipped)

  def add_truncated(self, ex_id):
    with self._lock:
      self.truncated.add(ex_id)

  def add_skipped(self, ex_id, reason):
    """Records a skip; returns True the first time this id is skipped."""
    with self._lock:
      first = ex_id not in self.skipped
      self.skipped[ex_id] = reason
      return first

  def __repr__(self):
    return f"Stats(truncated={self.num_truncated}, skipped_images={self.num_skipped})"


@dataclasses.dataclass
class Input:
  """A built pipeline: iterate it for numpy batches (keys in the module docstring)."""
  dataset: tf.data.Dataset
  source: object
  stats: Stats
  batch_size: int            # Per process.
  num_examples: int          # In the whole source.
  steps_per_epoch: float     # Training: len(source) // P * P / global batch. Eval: batches.
  mode: str

  def __iter__(self):
    for batch in self.dataset.as_numpy_iterator():
      if self.mode == "eval":
        batch["id"] = [s.decode() for s in batch["id"]]
        batch["prefix"] = [s.decode() for s in batch["prefix"]]
        batch["references"] = [json.loads(s) for s in batch["references"]]
      yield batch


def _processes(process_index, process_count):
  p = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= p < count:
    raise ValueError(f"process_index {p} not in range(process_count={count}).")
  return p, count


def _local_batch(batch_size, count):
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size {batch_size} (global) must be a positive multiple of the "
                     f"{count} processes.")
  return batch_size // count


def _size(image_size):
  return (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)


def _example_fn(source, tokenizer, text_len, mode, stats, on_bad_image, max_pixels):
  """Python function index -> (uint8 image, ok, text, mask_ar, mask_loss|mask_input, ...)."""
  if on_bad_image not in BAD_IMAGE_POLICIES:
    raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}.")
  pad_tokens, _ = prompt.assemble(tokenizer, "", "", text_len=text_len, mode=mode)
  blank = np.zeros((1, 1, 3), np.uint8)

  def fn(index):
    index = int(index)
    if index < 0:  # Eval padding row: a harmless 2-token prompt, marked invalid.
      return (blank, False, False, *pad_tokens.values(), b"", b"", b"[]")
    ex = source[index]
    # In evaluation the suffix is the answer to predict, never part of the input.
    suffix = ex.get("suffix") if mode == "train" else None
    try:
      tokens, truncated = prompt.assemble(tokenizer, ex["prefix"], suffix, text_len=text_len,
                                          mode=mode)
    except ValueError as e:
      raise ValueError(f"{source!r}, example {ex.get('id')!r}: {e}") from None
    if truncated and mode == "eval":
      # The prompt lost its end (the "\n" separator at least): the model would continue
      # the prefix instead of answering. Never silently.
      raise ValueError(f"{source!r}, example {ex.get('id')!r}: the prompt {ex['prefix']!r} "
                       f"does not fit text_len={text_len} tokens with its separator; raise "
                       "config.input.text_len or shorten the prompt.")
    if truncated:
      stats.add_truncated(ex["id"])
    ok = True
    try:
      image = images.decode(ex["image"], max_pixels)
    except images.ImageError as e:
      if on_bad_image == "raise":
        raise
      ok, image = False, blank
      if stats.add_skipped(ex["id"], str(e)):
        _log.warning("Skipping example %s: %s", ex["id"], e)
      if stats.num_skipped >= len(source):
        raise ValueError(f"Every image of {source!r} is unreadable; first: {e}") from None
    refs = json.dumps(list(ex.get("references") or []))
    return (image, ok, truncated, *tokens.values(), ex["id"].encode(), ex["prefix"].encode(),
            refs.encode())

  return fn


def _build(indices, source, tokenizer, image_size, text_len, mode, stats, on_bad_image,
           max_pixels, antialias, start_position=0):
  """tf.data.Dataset of single processed examples, for the index stream `indices`.

  Training examples carry their `position` in the stream (the first is start_position).
  """
  keys = ("text", "mask_ar", "mask_loss" if mode == "train" else "mask_input")
  length = text_len + 1 if mode == "train" else text_len
  fn = _example_fn(source, tokenizer, text_len, mode, stats, on_bad_image, max_pixels)
  size = _size(image_size)

  def process(position, index):
    out = tf.numpy_function(
        fn, [index], [tf.uint8, tf.bool, tf.bool, tf.int32, tf.int32, tf.int32, tf.string,
                      tf.string, tf.string], stateful=False)
    image = tf.ensure_shape(out[0], [None, None, 3])
    image = images.resize_and_scale(image, size, antialias)
    ex = {"image": tf.ensure_shape(image, [*size, 3]), "ok": tf.ensure_shape(out[1], [])}
    for k, v in zip(keys, out[3:6]):
      ex[k] = tf.ensure_shape(v, [length])
    if mode == "eval":
      ex["valid"] = tf.logical_and(ex.pop("ok"), index >= 0)
      ex["index"] = tf.cast(index, tf.int32)
      ex.update(id=out[6], prefix=out[7], references=out[8])
    else:
      ex.update(position=position, truncated=tf.ensure_shape(out[2], []))
    return ex

  ds = tf.data.Dataset.from_generator(
      indices, output_signature=tf.TensorSpec([], tf.int64)).enumerate(start_position)
  return ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def steps_per_epoch(num_examples, batch_size, process_count):
  """Training steps in one epoch: every process takes num_examples // process_count
  examples an epoch (see "Order and sharding"), batch_size (global) a step."""
  return (num_examples // process_count) * process_count / batch_size


def train_indices(num_examples, seed, process_index, process_count, start=0, num_epochs=None):
  """Yields this process's source indices from stream position `start` (see docstring)."""
  per = num_examples // process_count
  if per < 1:
    raise ValueError(f"{num_examples} examples cannot be shared by {process_count} processes.")
  epoch, offset = divmod(int(start), per)
  while num_epochs is None or epoch < num_epochs:
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    yield from order[process_index::process_count][:per][offset:].tolist()
    epoch, offset = epoch + 1, 0


class _StreamReader:
  """A stream read ahead by the index stream: `positions(...)` stores each example under
  its stream position and yields the position, which the map then takes (once) with
  `reader[position]`; what is held is only what tf.data has in flight."""

  def __init__(self, stream):
    self.stream = stream
    self._held = {}

  def __len__(self):
    return len(self.stream)

  def __getitem__(self, position):
    return self._held.pop(int(position))

  def __repr__(self):
    return repr(self.stream)

  def positions(self, seed, process_index, process_count, start=0, num_epochs=None):
    per = len(self.stream) // process_count
    if per < 1:
      raise ValueError(f"{len(self.stream)} examples cannot be shared by {process_count} "
                       "processes.")
    epoch, offset = divmod(int(start), per)
    position = int(start)
    while num_epochs is None or epoch < num_epochs:
      mine = itertools.islice(self.stream.stream(seed, epoch), process_index,
                              per * process_count, process_count)
      read = offset
      for ex in itertools.islice(mine, offset, None):
        self._held[position] = ex
        yield position
        position, read = position + 1, read + 1
      if read < per:
        raise ValueError(f"{self.stream!r}: epoch {epoch} had fewer examples than its stated "
                         f"length {len(self.stream)}; set the source's `num_examples` to "
                         "at most the real count.")
      epoch, offset = epoch + 1, 0


def eval_indices(num_examples, local_batch, process_index, process_count):
  """list[int] this process's indices in source order, padded with -1 to whole batches."""
  mine = list(range(process_index, num_examples, process_count))
  # Every process runs the same number of batches, so collectives stay in step.
  per_process = -(-num_examples // process_count)
  num_batches = -(-per_process // local_batch)
  return mine + [-1] * (num_batches * local_batch - len(mine))


def _is_ok(ex):
  return ex["ok"]


def _train_keys(ex):
  return {k: ex[k] for k in TRAIN_KEYS}


def make_train_input(source, tokenizer, *, image_size, text_len, batch_size, seed=0,
                     start_step=0, start_position=None, num_epochs=None,
                     process_index=None, process_count=None,
                     on_bad_image="skip", max_pixels=images.MAX_PIXELS, antialias=True,
                     prefetch=2):
  """Training `Input`: shuffled, repeated (num_epochs=None: forever), full batches only.

  `source` is a config dict for `make_source` or a source; `batch_size` is global.
  start_position: where this process's stream starts (a checkpoint's data position);
  None: start_step * B (exact only when no example before it was skipped).
  """
  source = sources.make_source(source)
  p, count = _processes(process_index, process_count)
  local = _local_batch(batch_size, count)
  stats = Stats()
  start = int(start_step) * local if start_position is None else int(start_position)
  indices = lambda: train_indices(len(source), seed, p, count, start, num_epochs)
  if getattr(source, "is_stream", False):
    source = _StreamReader(source)
    indices = lambda: source.positions(seed, p, count, start, num_epochs)
  ds = _build(indices, source, tokenizer, image_size, text_len, "train", stats, on_bad_image,
              max_pixels, antialias, start)
  ds = ds.filter(_is_ok).map(_train_keys)
  ds = ds.batch(local, drop_remainder=True).prefetch(prefetch)
  steps = steps_per_epoch(len(source), batch_size, count)
  return Input(ds, source, stats, local, len(source), steps, "train")


def make_eval_input(source, tokenizer, *, image_size, text_len, batch_size,
                    process_index=None, process_count=None, on_bad_image="skip",
                    max_pixels=images.MAX_PIXELS, antialias=True, prefetch=2):
  """Evaluation `Input`: each example once, in order, last batch padded (`valid`)."""
  source = sources.make_source(source)
  if getattr(source, "is_stream", False):
    raise ValueError(f"{source!r} is a stream, which serves training only; evaluate on the "
                     "dataset loaded without `streaming` (a `split` such as "
                     "\"validation[:1000]\" keeps it small).")
  p, count = _processes(process_index, process_count)
  local = _local_batch(batch_size, count)
  stats = Stats()
  order = eval_indices(len(source), local, p, count)
  ds = _build(lambda: iter(order), source, tokenizer, image_size, text_len, "eval", stats,
              on_bad_image, max_pixels, antialias)
  ds = ds.batch(local).prefetch(prefetch)
  return Input(ds, source, stats, local, len(source), len(order) // local, "eval")
