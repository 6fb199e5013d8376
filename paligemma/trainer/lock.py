"""One training per workdir: `{workdir}/lock`, held by process 0 of the running training.

Two trainings in one workdir would interleave their metrics and overwrite each other's
checkpoints. The lock file (JSON: host, pid, start time, heartbeat) names its holder,
so the refusal can say who holds it. A lock is stale, and taken over with a warning,
when its holder is a process of this host that no longer runs (a SIGKILLed run), or
when its heartbeat (rewritten every HEARTBEAT_SECONDS while the run lives) is older
than STALE_SECONDS (a holder on another machine that died). Files go through
tf.io.gfile, so gs:// workdirs are locked too (there the create is not atomic: two runs
started within the same second may both pass; the read-back after writing narrows it).
"""

import datetime
import json
import os
import socket
import threading
import time

from absl import logging
import tensorflow as tf

from paligemma import json_files

HEARTBEAT_SECONDS = 60
STALE_SECONDS = 600


class WorkdirLockedError(RuntimeError):
  """Another training holds the workdir; the message names it."""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # It exists, as another user.
  return True


def _when(seconds):
  return datetime.datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


class WorkdirLock:
  """acquire() / release() of `{workdir}/lock`; also a context manager."""

  def __init__(self, workdir):
    self.path = os.path.join(str(workdir), "lock")
    self._me = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time())
    self._stop = threading.Event()
    self._thread = None

  def _read(self):
    try:
      return json_files.read_json(self.path)
    except (tf.errors.NotFoundError, json.JSONDecodeError, ValueError):
      return None  # Gone, or half written by a holder killed while writing it.

  def _stale(self, holder):
    if holder.get("host") == self._me["host"]:
      return not _alive(int(holder.get("pid", -1)))
    return time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS

  def _write(self, exclusive):
    record = dict(self._me, heartbeat=time.time())
    if exclusive and "://" not in self.path:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      with os.fdopen(fd, "w") as f:
        json.dump(record, f)
      return
    json_files.write_json(self.path, record)

  def _mine(self, holder):
    return holder is not None and (holder.get("host"), holder.get("pid")) == (
        self._me["host"], self._me["pid"])

  def _refuse(self, holder):
    return WorkdirLockedError(
        f"{os.path.dirname(self.path)} is in use by another training: process "
        f"{holder.get('pid')} on host {holder.get('host')}, started "
        f"{_when(holder.get('started', 0))}. Wait for it to end or use another --workdir; "
        f"if that run is dead (its machine gone), delete {self.path}.")

  def acquire(self):
    """Takes the lock or raises WorkdirLockedError naming the holder."""
    holder = self._read()
    if holder is not None:
      if not self._stale(holder):
        raise self._refuse(holder)
      logging.warning("Taking over the lock of a training that is no longer running "
                      "(process %s on %s).", holder.get("pid"), holder.get("host"))
      tf.io.gfile.remove(self.path)
    try:
      self._write(exclusive=True)
    except FileExistsError:
      holder = self._read()  # Another run got there first.
      raise self._refuse(holder or {}) from None
    holder = self._read()
    if holder is not None and not self._mine(holder):
      raise self._refuse(holder)  # A gs:// race: the other run's write landed last.
    self._thread = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
    self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self._write(exclusive=False)
      except (OSError, tf.errors.OpError) as e:
        logging.warning("Could not refresh %s: %s", self.path, e)

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      if self._mine(self._read()):
        tf.io.gfile.remove(self.path)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
