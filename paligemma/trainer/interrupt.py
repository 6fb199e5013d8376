"""Stopping a training cleanly on SIGINT (Ctrl-C) or SIGTERM (preemption): the trainer
saves a checkpoint at the current step, then raises `Interrupted`."""

import contextlib
import signal
import sys
import threading

import jax
import tqdm

from paligemma.trainer.data_progress import gather


class Interrupted(Exception):
  """SIGINT / SIGTERM stopped the run after saving a checkpoint at `step`."""

  def __init__(self, signum, step, directory):
    self.signum, self.step, self.directory = signum, step, directory
    super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}; checkpoint "
                     f"saved in {directory}/{step}.")


@contextlib.contextmanager
def stop_requests():
  """A list that SIGINT / SIGTERM append to instead of killing the run.

  The first signal restores the previous handlers, so a second Ctrl-C stops at once
  (without the checkpoint). Only the main thread can take signals; elsewhere the list
  stays empty.
  """
  got = []
  if threading.current_thread() is not threading.main_thread():
    yield got
    return
  signums = (signal.SIGINT, signal.SIGTERM)
  previous = {s: signal.getsignal(s) for s in signums}

  def handler(signum, frame):
    del frame
    got.append(signum)
    for s, h in previous.items():
      signal.signal(s, h)
    tqdm.tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step "
                    "(send it again to stop without saving).", file=sys.stderr)

  for s in signums:
    signal.signal(s, handler)
  try:
    yield got
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def agreed_signal(requests):
  """The signal that asks to stop, agreed by every process (0: none)."""
  mine = requests[0] if requests else 0
  if jax.process_count() == 1:
    return mine
  return int(gather([mine]).max())
