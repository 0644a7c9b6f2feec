"""Run a shared-memory scenario in a fresh interpreter and fail on any complaint of multiprocessing's resource
tracker (which processes of one family share, and which prints to the same stderr)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


COMPLAINTS = ("KeyError", "resource_tracker", "leaked")


def assert_runs_without_tracker_complaints(script: str, workdir: Path, timeout: float = 600,
                                           complaints: tuple[str, ...] = COMPLAINTS) -> None:
    """`script` must print "done" last and exit 0; its stderr must hold none of `complaints` (by default: no
    mention of the tracker or a KeyError)."""
    path = workdir / "scenario.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("done"), out.stdout
    for complaint in complaints:
        assert complaint not in out.stderr, out.stderr
