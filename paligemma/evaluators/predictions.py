"""Predictions as JSON lines: one object per example (id, prompt, prediction, references)."""

import os

import tensorflow as tf

from paligemma import json_files

read = json_files.read_jsonl


def write(path, records):
  """Writes dicts to `path` (jsonl, local or gs://), atomically."""
  tf.io.gfile.makedirs(os.path.dirname(path) or ".")
  json_files.write_jsonl(path, records)
