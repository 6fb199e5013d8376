"""Orbax checkpoints of a run: `{workdir}/checkpoints/<step>/{state, meta}`.

state: trainable params, optimizer state, step, RNG key data (arrays, sharded as in the
       run; restored onto the current mesh, whatever it is).
meta:  JSON: step, examples seen, global batch size, data seed, and per process the data
       position (examples taken from its stream, skipped ones included) and the skipped
       and truncated counts, so a resume continues the data stream exactly.
Frozen parameters are not saved: they are re-created from the config (random init with
the seed, or `model_init`) exactly as in the first run.

Orbax writes each checkpoint into a temporary directory and renames it when complete,
so a process killed mid-write leaves the previous checkpoints intact; leftovers are
removed at the next start (`cleanup_tmp_directories`).

Several processes (jax.distributed): every process calls save and restore with the
same directory, which all of them must see (a gs:// bucket or a shared filesystem).
Each writes the shards its devices hold (one copy of replicated ones); process 0
writes the metadata and `meta`, and commits the step once all are done. A restore
reads into the shardings of `abstract_state`, whatever mesh, device count or process
count wrote the checkpoint.
"""

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Save every `every` steps (and on demand), keep the last `keep`, restore the latest."""

  def __init__(self, workdir, every, keep):
    self.directory = os.path.join(str(workdir), "checkpoints")
    if "://" not in self.directory:  # gs://... stays a URL; orbax writes buckets itself.
      self.directory = os.path.abspath(self.directory)
    self.every = int(every or 0)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        # Synchronous: when save() returns the checkpoint is complete on disk, so the
        # last good one is always known (e.g. when a non-finite loss stops the run).
        enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def due(self, step):
    return self.every > 0 and step % self.every == 0

  def save(self, step, state, meta):
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, step, abstract_state):
    """(state, meta) of `step`; abstract_state: jax.ShapeDtypeStruct tree with shardings."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self):
    self._manager.close()


def abstract(tree):
  """ShapeDtypeStructs (with shardings) of a tree of jax.Arrays, for `restore`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
