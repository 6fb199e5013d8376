"""Ends a command-line tool's process once its work is done, without native teardown.

XLA's CPU runtime can abort a process that is shutting down: a worker thread that
finishes a computation drops the last reference to a numpy array passed in zero-copy;
releasing it needs the GIL; once Python is finalizing, the thread is sent to
pthread_exit, whose unwinding ends in std::terminate ("terminate called without an
active exception", exit status -6 / 134). The tool's work was complete, yet its caller
(a shell script, a job scheduler, CI) sees a failure. `run` calls the tool and `finish`
ends the process as exit would up to finalization (non-daemon threads joined, atexit
handlers run: logging's flush, jax.distributed's shutdown; stdout and stderr flushed),
then with os._exit and the tool's exit status, skipping the finalization and C++ static
destructors where such aborts happen. Nothing of ours needs them: files are closed and
checkpoints waited for before a tool returns.
"""

import atexit
import os
import sys
import threading


def exit_status(code):
  """The process exit status sys.exit(code) gives (printing a non-int code, as it does)."""
  if code is None:
    return 0
  if not isinstance(code, int):
    print(code, file=sys.stderr)
    return 1
  return code & 0xFF


def run(main, *args, **kwargs):
  """Calls main(*args, **kwargs) and ends the process (`finish`): with status 0 when it
  returns, or its return value if that is an int (as sys.exit(main()) would give; any
  other value is the tool's result, not a status); with the SystemExit's status; with 1
  (130 for Ctrl-C) and the traceback printed for any other exception. Never returns."""
  try:
    result = main(*args, **kwargs)
    status = result & 0xFF if isinstance(result, int) else 0
  except SystemExit as e:
    status = exit_status(e.code)
  except BaseException as e:  # pylint: disable=broad-except  # As Python would: traceback.
    sys.excepthook(*sys.exc_info())
    status = 128 + 2 if isinstance(e, KeyboardInterrupt) else 1  # Ctrl-C: as a shell's SIGINT.
  finish(status)


def finish(status):
  """Ends the process with `status` as Python's exit would, up to finalization: waits
  for non-daemon threads, runs the atexit handlers, flushes stdout and stderr; then
  os._exit. Never returns."""
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
      thread.join()
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # A closed pipe or stream: nothing more can be said.
      pass
  os._exit(status)  # pylint: disable=protected-access
