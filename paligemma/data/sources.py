"""What a data source is, and how one is chosen from a config dict.

A source is a read-only sequence of examples (`len(source)`, `source[i]`), each a dict:

  image       str path, encoded bytes, or uint8[H, W, 3] array
  prefix      str, the prompt ("caption en", "answer en what is ...", "detect cat")
  suffix      str, the target text, or None where unknown (prediction-only data)
  id          str, unique within the source
  references  list[str], every acceptable target (all captions of an image, all VQA
              answers); where a source has none it is [suffix]
  ...         source-specific extras (e.g. `objects`), kept as they are

Random access lets the pipeline shuffle, shard and resume by index without reading the
data twice. Images are read lazily by the pipeline, so building a source only parses
annotation files.

`make_source({"name": ..., **options})` builds one; the options of each name are the
keyword arguments of its `make` function (see the module of that name). A list of
source configs, each with an optional `weight`, is a mixture of them (mixture.py), the
same as {"name": "mixture", "sources": [...]}.

A stream (`is_stream = True`, e.g. an `hf` source with streaming=True) has a length but
no random access: it yields its examples in order (`stream(seed, epoch)`); the pipeline
reads it for training only (pipeline.py, "Streams").
"""

import json
import os
import importlib
import inspect

# name -> module in paligemma.data with a `make(**options)` function.
SOURCES = {
    "jsonl": "jsonl",
    "flickr8k": "flickr8k",
    "coco_detection": "coco_detection",
    "coco_segmentation": "coco_segmentation",
    "refcoco": "refcoco",
    "vqa": "vqa",
    "shapes": "shapes",
    "hf": "hf_datasets",
    "mixture": "mixture",
}


class ListSource:
  """A source backed by a list of example dicts."""

  def __init__(self, name, examples):
    self.name = name
    self._examples = list(examples)
    if not self._examples:
      raise ValueError(f"Data source {name} is empty: no examples found.")

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, index):
    return self._examples[index]

  def __repr__(self):
    return f"<{type(self).__name__} {self.name}: {len(self)} examples>"


def make_source(config):
  """A source from a config dict {"name": ..., **options} or a list of them (a mixture);
  a source passes through."""
  if isinstance(config, (list, tuple)):
    config = {"name": "mixture", "sources": list(config)}
  if not isinstance(config, dict) and not hasattr(config, "keys"):
    if getattr(config, "is_stream", False) or (
        hasattr(config, "__getitem__") and hasattr(config, "__len__")):
      return config  # Already a source.
    raise TypeError(f"A data source config is a dict with a `name`, got {type(config).__name__}.")
  options = dict(config)
  name = options.pop("name", None)
  if name not in SOURCES:
    raise ValueError(f"Unknown data source name {name!r}; valid names: {', '.join(SOURCES)}.")
  module = importlib.import_module(f"paligemma.data.{SOURCES[name]}")
  params = inspect.signature(module.make).parameters
  unknown = sorted(set(options) - set(params))
  if unknown:
    raise ValueError(f"Unknown option(s) {unknown} for data source {name!r}; valid options: "
                     f"{sorted(params)}.")
  missing = sorted(k for k, p in params.items()
                   if p.default is inspect.Parameter.empty and k not in options)
  if missing:
    raise ValueError(f"Data source {name!r} needs option(s) {missing}.")
  return module.make(**options)


def read_json(path, keys, kind, option):
  """Loads a dataset json whose `keys` must be lists; errors name the file and the fix."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{kind} file {path!r} not found; set `{option}`.")
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from None
  for key in keys:
    if not isinstance(data.get(key), list):
      raise ValueError(f"{path}: missing list {key!r}; expected a {kind} json.")
  return data
