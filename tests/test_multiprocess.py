"""Two real processes train as one: `jax.distributed` with a coordinator on localhost,
CPU collectives over gloo (jax_cpu_collectives_implementation), the same command in
both, each feeding half of the global batch from its own data shard. Their losses are
the one-process losses (to 1e-5 of the loss, see test_multidevice.py); only process 0
writes metrics and exports; the checkpoint they write together resumes in a single
process.
"""

import os
import shutil
import socket
import subprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top

# The command, environment and one-process reference run shared with the 8-device test
# (importable as pytest puts each test file's folder on the path).
from test_multidevice import (  # pylint: disable=g-import-not-at-top,wrong-import-position
    REPO, STEPS, TOLERANCE, env, losses, max_difference, shapes_reference, train_command,
    wait)
from paligemma.trainer import metrics as metrics_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

PROCESSES = 2


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Workdirs: the one-process reference, the two-process run, its resume in one process."""
  out = tmp_path_factory.mktemp("multiprocess")
  reference, ref_proc = shapes_reference(tmp_path_factory)
  workdir = out / "two_processes"
  port = _free_port()
  procs = [subprocess.Popen(
      train_command(workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      # No persistent compilation cache here: a process that loads a program the other
      # compiles can disagree with it on the collectives (seen as gloo size mismatches).
      text=True, env=env(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                         JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(i),
                         JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo"))
           for i in range(PROCESSES)]
  try:
    for p in [ref_proc] + procs:
      wait(p)
  finally:
    for p in procs:  # One failed: the other would wait for it until its timeout.
      if p.poll() is None:
        p.kill()

  # Resume the two-process run's step-10 checkpoint in one process (one device).
  resumed = out / "resumed"
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))
  (resumed / "params.npz").unlink()
  proc = subprocess.Popen(train_command(resumed), cwd=REPO,
                          env=env(tmp_path_factory.getbasetemp() / "jax_cache"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  wait(proc)
  return {"reference": reference, "two": workdir, "resumed": resumed}


def test_two_processes_same_losses_as_one(runs):
  want, got = losses(runs["reference"]), losses(runs["two"])
  assert sorted(want) == list(range(1, STEPS + 1))
  relative, absolute, ulps = max_difference(got, want)
  print(f"two processes: {STEPS} steps vs one process: max |difference| {absolute:.2e} "
        f"({ulps:.0f} float32 ulps, {relative:.1e} of the loss)")
  assert relative <= TOLERANCE, (absolute, relative)


def test_only_process_zero_writes(runs):
  records = metrics_lib.read(runs["two"])
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # Once, not twice.
  assert (runs["two"] / "params.npz").exists() and (runs["two"] / "config.json").exists()
  assert sorted(p.name for p in (runs["two"] / "checkpoints").iterdir()) == ["10", str(STEPS)]


def test_two_process_checkpoint_resumes_in_one_process(runs):
  want, got = losses(runs["reference"]), losses(runs["resumed"])
  relative, absolute, ulps = max_difference(got, want)
  print(f"resumed in one process from step 10: max |difference| {absolute:.2e} "
        f"({ulps:.0f} float32 ulps, {relative:.1e} of the loss)")
  assert relative <= TOLERANCE, (absolute, relative)
  assert (runs["resumed"] / "params.npz").exists()
