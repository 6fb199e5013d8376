"""JSON and JSON-lines files, written atomically through tf.io.gfile.

Every file the project writes for a person or another program to read (run configs,
metrics, predictions, lock records, converted datasets) goes through here, so all of
them reach local paths and buckets (gs://...) alike, and a reader never sees a
half-written file: the text goes to `PATH.tmp`, then is renamed over PATH.
"""

import json

import tensorflow as tf


def _write_text(path, text):
  tmp = f"{path}.tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path, obj):
  """Writes `obj` as indented JSON (keys sorted; non-JSON values as str)."""
  _write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path, records):
  """Writes dicts as JSON lines (one object a line, UTF-8 kept as is)."""
  _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(path):
  """The JSON object of `path`."""
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def read_jsonl(path):
  """list[dict] of a JSON-lines file (blank lines skipped)."""
  with tf.io.gfile.GFile(path) as f:
    return [json.loads(line) for line in f if line.strip()]
