"""The modules thaw runs as `python -m` in its child processes (a process fork's children, a fork pool's workers)
are not imported by thaw_format.sdk itself: runpy then warned on every child's stderr, the user's terminal,
"'thaw_format.sdk.child' found in sys.modules after import of package 'thaw_format.sdk' ... unpredictable
behaviour", and the child ran a second copy of the module."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["thaw_format.sdk.child", "thaw_format.sdk.pool_worker"])
def test_a_child_process_s_module_starts_without_runpy_s_warning(module):
    # A config without "parent": the module starts, reports its error on stdout and exits 1.
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "{}"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "found in sys.modules" not in done.stderr and "RuntimeWarning" not in done.stderr, done.stderr
