"""Where a run's numbers go: `{workdir}/metrics.jsonl` and TensorBoard event files.

metrics.jsonl holds one JSON object per logged step: {"step": 100, "train/loss": ...,
"train/lr": ..., "<eval name>/<metric>": ...}. Events go to `{workdir}/tensorboard`
(`tensorboard --logdir WORKDIR`). Only process 0 writes. Files go through tf.io.gfile,
so a workdir may be a local path or a bucket (gs://...; appending to an object there
re-uploads it, which is cheap at the size of a metrics file).
"""

import json
import math
import os

import tensorflow as tf

from paligemma import json_files


class MetricsWriter:
  """Appends metrics; on resume, first drops lines past the restored step."""

  def __init__(self, workdir, *, enabled=True, resume_step=None, tensorboard=True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    self._truncate(resume_step)
    if tensorboard:
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      # tf.summary.scalar needs the tensorboard package; the core op with the scalars
      # plugin's metadata writes the same events without it.
      self._scalar_meta = summary_pb2.SummaryMetadata()
      self._scalar_meta.plugin_data.plugin_name = "scalars"
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def _truncate(self, resume_step):
    """Lines logged after the checkpoint we resume from are logged again by this run."""
    if not tf.io.gfile.exists(self.path):
      return
    with tf.io.gfile.GFile(self.path) as f:
      lines = [l for l in f if l.strip()]
    keep = []
    for line in lines:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut by a kill.
      if resume_step is not None and rec.get("step", 0) <= resume_step:
        keep.append(rec)
    json_files.write_jsonl(self.path, keep)

  def write(self, step, metrics):
    if not self.enabled:
      return
    rec = {"step": int(step)}
    rec.update({k: _jsonable(v) for k, v in metrics.items()})
    with tf.io.gfile.GFile(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in rec.items():
          if k != "step" and isinstance(v, (int, float)):
            tf.summary.write(k, tf.constant(v, tf.float32), step=int(step),
                                   metadata=self._scalar_meta)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _jsonable(v):
  if isinstance(v, int):  # Counts stay integers.
    return v
  v = float(v)
  return v if math.isfinite(v) else str(v)


def read(workdir):
  """list[dict] of `{workdir}/metrics.jsonl` (for tests and notebooks)."""
  return json_files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
