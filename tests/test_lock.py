"""One training per workdir: the lock refuses a second run, naming the first."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import tensorflow as tf

from paligemma.trainer import lock as lock_lib


def _dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_holder(path, **fields):
  record = dict(host=socket.gethostname(), pid=os.getpid(), started=time.time(),
                heartbeat=time.time())
  record.update(fields)
  with tf.io.gfile.GFile(path, "w") as f:
    f.write(json.dumps(record))


@pytest.mark.parametrize("root", ["local", "ram://lock-test"])
def test_second_holder_refused_naming_the_first(tmp_path, root):
  workdir = str(tmp_path) if root == "local" else root
  tf.io.gfile.makedirs(workdir)
  with lock_lib.WorkdirLock(workdir) as first:
    holder = json.loads(tf.io.gfile.GFile(first.path).read())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(lock_lib.WorkdirLockedError,
                       match=rf"in use by another training: process {os.getpid()} on host "):
      lock_lib.WorkdirLock(workdir).acquire()
  assert not tf.io.gfile.exists(first.path)  # Released.
  lock_lib.WorkdirLock(workdir).acquire().release()  # Free again.


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
  path = os.path.join(tmp_path, "lock")
  _write_holder(path, pid=_dead_pid())  # A SIGKILLed run on this host.
  with lock_lib.WorkdirLock(tmp_path) as lock:
    assert json.loads(open(lock.path).read())["pid"] == os.getpid()


def test_other_hosts_lock_is_stale_only_without_heartbeat(tmp_path):
  path = os.path.join(tmp_path, "lock")
  _write_holder(path, host="elsewhere", pid=1)
  with pytest.raises(lock_lib.WorkdirLockedError, match="host elsewhere"):
    lock_lib.WorkdirLock(tmp_path).acquire()
  _write_holder(path, host="elsewhere", pid=1,
                heartbeat=time.time() - lock_lib.STALE_SECONDS - 1)
  lock_lib.WorkdirLock(tmp_path).acquire().release()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(lock_lib, "HEARTBEAT_SECONDS", 0.05)
  with lock_lib.WorkdirLock(tmp_path) as lock:
    first = json.loads(open(lock.path).read())["heartbeat"]
    time.sleep(0.5)
    assert json.loads(open(lock.path).read())["heartbeat"] > first
