"""A pid that names no process, for tests in any directory (each has its own conftest)."""

import contextlib
import os
import subprocess
import sys


@contextlib.contextmanager
def exited_pid():
    """The pid of a child that has exited, left unreaped for the block (a zombie): reading its memory fails as for
    no process at all (ESRCH), and the pid cannot be given to a new process meanwhile, as a reaped child's can
    (pid_max may be as low as 32768, and on a busy machine the numbers come round)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        yield child.pid
    finally:
        child.wait()
