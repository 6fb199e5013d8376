"""JSON-lines source: one example object per line.

  {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "a red circle"}

`image` is a path relative to the jsonl file's folder, or absolute; `prefix` is
required; `suffix` may be left out for prediction-only data; `id` defaults to
"<file name>:<line>"; `references` (list of str) defaults to [suffix]; any other key is
kept. Blank lines are skipped; a line that is not a JSON object with these keys raises
an error naming the file and line.

Config: {"name": "jsonl", "path": "data/train.jsonl"}.
"""

import json
import os

from paligemma.data import sources


def read(path):
  """list[dict] examples of a jsonl file, image paths made absolute."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"jsonl file {path!r} not found; set the source's `path`.")
  folder = os.path.dirname(os.path.abspath(path))
  examples = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      try:
        ex = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                         "each line must be one JSON object.") from None
      if not isinstance(ex, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(ex).__name__}.")
      for key in ("image", "prefix"):
        if not isinstance(ex.get(key), str):
          raise ValueError(f"{where}: key {key!r} must be a string, got {ex.get(key)!r}.")
      suffix = ex.get("suffix")
      if suffix is not None and not isinstance(suffix, str):
        raise ValueError(f"{where}: key 'suffix' must be a string, got {suffix!r}.")
      refs = ex.get("references", [] if suffix is None else [suffix])
      if not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
        raise ValueError(f"{where}: key 'references' must be a list of strings.")
      ex.update(image=os.path.join(folder, ex["image"]), suffix=suffix,
                id=str(ex.get("id", f"{os.path.basename(path)}:{lineno}")), references=refs)
      examples.append(ex)
  return examples


def make(path):
  """Source of the examples in a jsonl file."""
  return sources.ListSource(f"jsonl {path}", read(path))
