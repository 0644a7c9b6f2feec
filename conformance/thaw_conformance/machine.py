"""What a receipt says about where it was made: CPU model and flags, memory, GPU and driver, OS, Python, thaw."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import thaw_format

from .checkout import CHECKOUT


def describe() -> dict:
    cpu = _cpuinfo()
    return {
        "cpu": {"model": cpu.get("model name", platform.processor()), "cores": os.cpu_count(),
                "flags": sorted(cpu.get("flags", "").split())},
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "os": {"platform": platform.platform(), "release": _os_release()},
        "python": platform.python_version(),
        "thaw": {"version": thaw_format.__version__, "format": list(thaw_format.FORMAT_VERSION), **_git()},
    }


def _cpuinfo() -> dict:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux: the model name from platform is all there is
        pass
    return info


def _memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict]:
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if not out:
        return []
    gpus = []
    for line in out.splitlines():
        name, driver, memory = (part.strip() for part in line.split(","))
        gpus.append({"name": name, "driver": driver, "memory": memory})
    return gpus


def _os_release() -> Optional[str]:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return None


def _git() -> dict:
    if CHECKOUT is None:  # an installed package: its version is all there is
        return {"git_commit": None}
    commit = _run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"])
    changed = _run(["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"])
    return {"git_commit": commit, "git_uncommitted_changes": bool(changed)} if commit else {"git_commit": None}


def _run(command: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
