"""clean_exit.run: the tool's exit status and output survive an abort in native teardown."""

import os
import subprocess
import sys
import textwrap

import pytest

# A tool whose work is done when teardown aborts, as XLA's CPU runtime sometimes does when
# a worker thread releases a numpy buffer while Python finalizes ("terminate called
# without an active exception", -6): here a module global aborts when finalization
# deletes it. It also leaves output unflushed, an atexit handler and a non-daemon thread.
_TOOL = textwrap.dedent("""
    import atexit, os, sys, threading, time
    from paligemma import clean_exit

    class AbortsInTeardown:
      def __del__(self):
        os.abort()

    teardown = AbortsInTeardown()

    def slow_write(path):
      time.sleep(0.3)
      open(path, "w").write("thread")

    def main(how, out):
      atexit.register(lambda: open(out + ".atexit", "w").write("atexit"))
      threading.Thread(target=slow_write, args=(out + ".thread",)).start()
      sys.stdout.write("work done")  # No newline: left in the buffer of a pipe.
      if how == "raise":
        raise ValueError("bad input")
      if how == "exit":
        sys.exit("error: bad key")
      return int(how) if how.isdigit() else ["a result, not a status"]

    if sys.argv[1] == "plain":
      sys.exit(main(sys.argv[2], sys.argv[3]))
    clean_exit.run(main, sys.argv[2], sys.argv[3])
    """)


def _tool(tmp_path, wrapper, how):
  out = str(tmp_path / f"{wrapper}-{how}")
  proc = subprocess.run([sys.executable, "-c", _TOOL, wrapper, how, out], capture_output=True,
                        text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
  return proc, out


def test_plain_exit_aborts_in_teardown(tmp_path):
  """The failure clean_exit is for: the work is done and the status still says abort."""
  proc, _ = _tool(tmp_path, "plain", "0")
  assert proc.returncode == -6, proc
  assert proc.stdout == "work done"


@pytest.mark.parametrize("how, status", [("0", 0), ("3", 3), ("result", 0), ("exit", 1),
                                         ("raise", 1)])
def test_clean_exit_keeps_status_output_threads_and_atexit(tmp_path, how, status):
  proc, out = _tool(tmp_path, "clean", how)
  assert proc.returncode == status, proc
  assert proc.stdout == "work done"
  assert open(out + ".thread").read() == "thread"  # Waited for, as exit waits.
  assert open(out + ".atexit").read() == "atexit"  # Run, as exit runs them.
  if how == "exit":
    assert proc.stderr.strip() == "error: bad key"
  if how == "raise":
    assert "Traceback" in proc.stderr and proc.stderr.strip().endswith("ValueError: bad input")
