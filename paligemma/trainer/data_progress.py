"""Where a process's training data stream is, saved with each checkpoint.

Skipped examples (unreadable images) take a place in the pipeline's index stream but
not in a batch, so "step x batch" is not where a resumed run must continue: the batches
carry each example's `position` in the stream, and the trainer saves the position after
the last one it trained on (paligemma/data/pipeline.py, "Order and sharding").
"""

from absl import logging
import jax
import numpy as np


def gather(values):
  """int64[P, n]: `values` (n ints) of every process, in process order."""
  values = np.asarray(values, np.int64)[None]
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(values, tiled=True))


class DataProgress:
  """Where this process's data stream is, and what it skipped and truncated so far.

  `position` counts every example taken from the stream, trained on or skipped
  (unreadable image); it is saved in checkpoints so a resume continues exactly there.
  Counts are of examples consumed by training steps (an example skipped again in a
  later epoch counts again), so they too resume exactly.
  """
  FIELDS = ("data_position", "data_skipped", "data_truncated")
  KEYS = ("data/skipped", "data/truncated")

  def __init__(self, meta, local_batch):
    self.position = int(meta.get("step", 0)) * local_batch
    self.skipped = self.truncated = 0
    saved = [meta.get(k) for k in self.FIELDS]
    if all(isinstance(v, list) for v in saved):
      if len(saved[0]) == jax.process_count():
        p = jax.process_index()
        self.position, self.skipped, self.truncated = (int(v[p]) for v in saved)
      else:  # Another process count splits the stream otherwise: no exact position.
        logging.warning("The checkpoint was written by %d processes, this run has %d: "
                        "data resumes at step x batch, not exactly.", len(saved[0]),
                        jax.process_count())

  def consume(self, batch):
    """Pops the pipeline's `position` / `truncated` from `batch` and counts them."""
    position, truncated = batch.pop("position"), batch.pop("truncated")
    end = int(position[-1]) + 1
    self.skipped += end - self.position - len(position)
    self.position = end
    self.truncated += int(np.sum(truncated))

  def meta(self):
    """The checkpoint meta fields: one entry per process."""
    table = gather([self.position, self.skipped, self.truncated])
    return {k: table[:, i].tolist() for i, k in enumerate(self.FIELDS)}

  def totals(self, local=False):
    """{"data/skipped": n, "data/truncated": n} over all processes (a collective), or
    this process's alone."""
    table = np.array([[self.skipped, self.truncated]]) if local else gather(
        [self.skipped, self.truncated])
    return dict(zip(self.KEYS, (int(n) for n in table.sum(0))))
