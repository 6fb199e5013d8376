"""Predictions as JSON lines: one object per example (id, prompt, prediction, references)."""

import json
import os


def write(path, records):
  """Writes dicts to `path` (jsonl), atomically: readers never see a half-written file."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def read(path):
  """list[dict] from a jsonl predictions file."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
