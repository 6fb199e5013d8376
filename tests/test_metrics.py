"""metrics.jsonl through tf.io.gfile: local paths and remote filesystems (gs://) alike.

tf's in-memory `ram://` filesystem stands in for a bucket: it is reached only through
tf.io.gfile, so plain `open` would fail on it just as it does on gs://.
"""

import os
import uuid

import tensorflow as tf

from paligemma.trainer import metrics as metrics_lib


def _run(workdir):
  w = metrics_lib.MetricsWriter(workdir, tensorboard=True)
  for step in (1, 2, 3, 4):
    w.write(step, {"train/loss": 1.0 / step, "train/lr": float("nan") if step == 4 else 0.1})
  w.close()
  # Resumed from the checkpoint of step 2: steps 3 and 4 are dropped, then logged again.
  w = metrics_lib.MetricsWriter(workdir, resume_step=2, tensorboard=False)
  w.write(3, {"train/loss": 0.3})
  w.close()
  return metrics_lib.read(workdir)


def test_local_workdir(tmp_path):
  records = _run(str(tmp_path))
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[1]["train/loss"] == 0.5 and records[2]["train/loss"] == 0.3
  assert os.listdir(tmp_path / "tensorboard")


def test_remote_filesystem_workdir():
  workdir = f"ram://metrics-{uuid.uuid4().hex}/run"
  tf.io.gfile.makedirs(workdir)
  records = _run(workdir)
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[2]["train/loss"] == 0.3
  assert tf.io.gfile.glob(workdir + "/tensorboard/*")


def test_nan_is_written_as_a_string(tmp_path):
  w = metrics_lib.MetricsWriter(str(tmp_path), tensorboard=False)
  w.write(1, {"train/loss": float("nan")})
  assert metrics_lib.read(str(tmp_path)) == [{"step": 1, "train/loss": "nan"}]
