"""Hugging Face `datasets` source: a hub dataset, a local parquet/arrow folder, or a
`save_to_disk` directory.

  {"name": "hf", "path": "diffusers/tuxemon", "prefix": "caption en",
   "suffix": "blip_caption"}
  {"name": "hf", "path": "/data/vqav2", "split": "validation",
   "prefix": "answer en {question}", "suffix": "multiple_choice_answer",
   "references": "answers", "id": "question_id"}

`path` is what `datasets.load_dataset` takes (a hub name, or a folder of parquet / arrow
/ csv / json files with the format inferred), or a directory written by
`Dataset.save_to_disk` / `DatasetDict.save_to_disk` (read with `load_from_disk`).
`split` picks the split ("train", "validation[:500]"); `subset` the hub config name.
A hub dataset is read from the local cache when HF_HUB_OFFLINE=1 (download it once
with network, e.g. `datasets.load_dataset(name)`).

`prefix` and `suffix` are each a column's name, taking that column, or a template in
which `{column}` is replaced by the row's value (text without braces, e.g.
"caption en", is used as it is). A suffix column holding a list of strings trains on
its first and keeps all as `references`; `suffix=None` gives prediction-only data.
`image` names the image column (a `datasets.Image` feature, encoded bytes, or a path).
`references` optionally names a column with every acceptable answer (a list of strings,
or of {"answer": ...} dicts as in VQAv2); `id` a column of unique ids (default
"<split>:<row>").

Rows are read lazily by index (random access; the pipeline shuffles, shards per host and
resumes by index, as for every source). `streaming=True` reads a dataset too large to
download whole as a stream instead (datasets' shuffle buffer of `shuffle_buffer`
examples, reseeded each epoch); each process keeps its share of the stream (see
pipeline.py, "Streams"). A stream needs its length: from the dataset's metadata, else
the `num_examples` option. Streams serve training only.
"""

import os
import string

# Files that `save_to_disk` writes at the top of its directory (a Dataset; a DatasetDict).
_SAVED = ("state.json", "dataset_dict.json")


def _datasets():
  try:
    import datasets  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError("The `hf` data source needs the `datasets` package: "
                      "pip install -e \".[hf]\" (or pip install datasets).") from None
  return datasets


class _Field:
  """A prefix / suffix spec: a column name, or a template over the row's columns."""

  def __init__(self, option, spec, columns):
    self.option, self.spec = option, spec
    self.column = spec if spec in columns else None
    if self.column is None:
      names = [n for _, n, _, _ in string.Formatter().parse(spec) if n]
      unknown = sorted(set(names) - set(columns))
      if unknown:
        raise ValueError(f"hf source option {option}={spec!r} names column(s) {unknown} "
                         f"that the dataset lacks; its columns: {sorted(columns)}.")

  def __call__(self, row):
    return row[self.column] if self.column else self.spec.format_map(row)


def _answers(value):
  """list[str] from a references column: strings, or dicts with an `answer` (VQAv2)."""
  if isinstance(value, str):
    return [value]
  out = []
  for v in value or []:
    out.append(v.get("answer") if isinstance(v, dict) else v)
  return [str(v) for v in out if v is not None]


class _Rows:
  """Turns dataset rows into examples (the format of sources.py)."""

  def __init__(self, name, columns, split, image, prefix, suffix, references, id_column):
    self.name, self.split = name, split
    for option, column in (("image", image), ("references", references), ("id", id_column)):
      if column is not None and column not in columns:
        raise ValueError(f"hf source {name}: option {option}={column!r} is not a column; "
                         f"its columns: {sorted(columns)}.")
    self.image, self.references, self.id_column = image, references, id_column
    self.prefix = _Field("prefix", prefix, columns)
    self.suffix = None if suffix is None else _Field("suffix", suffix, columns)

  def example(self, row, index):
    image = row[self.image]
    if isinstance(image, dict):  # A datasets.Image, not decoded: {"bytes", "path"}.
      image = image.get("bytes") or image.get("path")
    elif hasattr(image, "save"):  # A PIL image (a feature that could not skip decoding).
      import numpy as np  # pylint: disable=g-import-not-at-top
      image = np.asarray(image.convert("RGB"))
    ex_id = str(row[self.id_column]) if self.id_column else f"{self.split}:{index}"
    suffix = self.suffix(row) if self.suffix else None
    refs = None
    if isinstance(suffix, (list, tuple)):  # Several captions: train on the first.
      refs = _answers(suffix)
      suffix = refs[0] if refs else None
    if self.references:
      refs = _answers(row[self.references])
    if refs is None:
      refs = [] if suffix is None else [suffix]
    prefix = self.prefix(row)
    if not isinstance(prefix, str) or not (suffix is None or isinstance(suffix, str)):
      raise ValueError(f"hf source {self.name}, row {index}: prefix and suffix must be "
                       f"text, got {prefix!r} and {suffix!r}.")
    return dict(image=image, prefix=prefix, suffix=suffix, id=ex_id, references=refs)


class HfSource:
  """Random-access source over a `datasets.Dataset`."""

  def __init__(self, name, dataset, rows):
    self.name, self._dataset, self._rows = name, dataset, rows
    if not len(dataset):
      raise ValueError(f"Data source {name} is empty: no rows in this split.")

  def __len__(self):
    return len(self._dataset)

  def __getitem__(self, index):
    return self._rows.example(self._dataset[int(index)], int(index))

  def __repr__(self):
    return f"<HfSource {self.name}: {len(self)} examples>"


class HfStream:
  """A stream over a `datasets.IterableDataset` (pipeline.py, "Streams")."""
  is_stream = True

  def __init__(self, name, dataset, rows, num_examples, shuffle_buffer):
    self.name, self._dataset, self._rows = name, dataset, rows
    self._num_examples, self._buffer = int(num_examples), shuffle_buffer

  def __len__(self):
    return self._num_examples

  def stream(self, seed, epoch):
    """Yields the examples of `epoch` in its shuffled order (the same for the same seed)."""
    ds = self._dataset
    if self._buffer:
      ds = ds.shuffle(seed=seed, buffer_size=self._buffer)
      ds.set_epoch(epoch)
    for index, row in enumerate(ds):
      yield self._rows.example(row, index)

  def __repr__(self):
    return f"<HfStream {self.name}: {len(self)} examples>"


def _load(datasets, path, split, subset, streaming, data_files, revision):
  saved = os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in _SAVED)
  if saved:
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
      base = split.split("[")[0]
      if base not in ds:
        raise ValueError(f"{path} has splits {sorted(ds)}, not {base!r}; set the source's "
                         "`split`.")
      ds = ds[base]
      if "[" in split:
        ds = ds.select(range(*_bounds(split, len(ds))))
    return ds.to_iterable_dataset() if streaming else ds
  if not os.path.exists(path) and path.startswith((".", "/")):
    raise FileNotFoundError(f"hf source path {path!r} not found; give a hub dataset name, a "
                            "folder of parquet/arrow files or a save_to_disk directory.")
  try:
    return datasets.load_dataset(path, subset, split=split, streaming=streaming,
                                 data_files=data_files, revision=revision)
  except ValueError as e:
    if "split" in str(e).lower():
      raise ValueError(f"hf source {path}: {e} Set the source's `split`.") from None
    raise


def _bounds(split, n):
  """(start, stop) of a "name[a:b]" split spec on a saved dataset of n rows."""
  inner = split[split.index("[") + 1:split.rindex("]")]
  start, _, stop = inner.partition(":")
  return (int(start) if start else 0), (int(stop) if stop else n)


def make(path, prefix="caption en", suffix=None, image="image", split="train", subset=None,
         references=None, id=None, streaming=False, num_examples=None,  # pylint: disable=redefined-builtin
         shuffle_buffer=1000, data_files=None, revision=None):
  """Source of a `datasets` dataset's split (module docstring: the options)."""
  datasets = _datasets()
  path = os.fspath(path)
  ds = _load(datasets, path, split, subset, streaming, data_files, revision)
  name = f"hf {path} {split}"
  features = ds.features
  if features is None and streaming:  # Some streams know their columns only when read.
    features = next(iter(ds)).keys()
  columns = list(features)
  if image not in columns:
    raise ValueError(f"hf source {name}: no image column {image!r}; set the source's "
                     f"`image` to one of {sorted(columns)}.")
  if isinstance(features, dict) and isinstance(features.get(image), datasets.Image):
    ds = ds.cast_column(image, datasets.Image(decode=False))  # The pipeline decodes.
  rows = _Rows(name, columns, split, image, prefix, suffix, references, id)
  if not streaming:
    return HfSource(name, ds, rows)
  if num_examples is None:
    splits = getattr(ds.info, "splits", None) or {}
    info = splits.get(split.split("[")[0]) if "[" not in split else None
    num_examples = info.num_examples if info is not None and info.num_examples else None
  if not num_examples:
    raise ValueError(f"hf source {name}: a stream needs its length and the dataset's "
                     "metadata has none; set the source's `num_examples`.")
  return HfStream(name, ds, rows, num_examples, shuffle_buffer)

