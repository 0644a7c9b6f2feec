"""The processes a process started, and theirs, from /proc (Linux): for tests that kill a process and check that
nothing it started outlives it, nor leaves shared memory (/dev/shm) that nobody will unlink."""

import contextlib
import os
import sys
import time

import pytest

HAS_PROC = sys.platform.startswith("linux")
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="reads processes from /proc (Linux)")


def _stat(pid: str) -> tuple[int, str]:
    """(parent pid, state) of a process; OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return int(fields[1]), fields[0]


def descendants(pid: int) -> set[int]:
    """The pids of every living process descended from `pid` (its children, theirs, and so on)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid, state = _stat(entry)
        except OSError:  # ended meanwhile
            continue
        if state != "Z":
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` still running (a zombie has ended: its parent has yet to reap it)."""
    running = set()
    for pid in pids:
        try:
            if _stat(str(pid))[1] != "Z":
                running.add(pid)
        except OSError:
            pass
    return running


def outliving(pids: set[int], timeout: float) -> set[int]:
    """Those of `pids` still running after up to `timeout` seconds (empty as soon as none is)."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def zombie(pid: int) -> bool:
    """Whether `pid` has ended and is not yet reaped by its parent."""
    try:
        return _stat(str(pid))[1] == "Z"
    except OSError:  # gone: reaped
        return False


def mapped_segments(pids: set[int]) -> set[str]:
    """The names of the /dev/shm files (POSIX shared memory, semaphores) that any of `pids` maps, as they are named
    there now: found by inode, since glibc maps a named semaphore under the temporary name it made it as."""
    inodes = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
                    if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                        inodes.add(int(fields[4]))
        except OSError:  # ended meanwhile
            continue
    with os.scandir("/dev/shm") as files:
        return {file.name for file in files if file.inode() in inodes}


def lingering(names: set[str], timeout: float) -> set[str]:
    """Those of `names` still in /dev/shm after up to `timeout` seconds (empty as soon as none is)."""
    deadline = time.monotonic() + timeout
    while (left := {name for name in names if os.path.exists(f"/dev/shm/{name}")}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def family(pids: set[int]) -> set[int]:
    """`pids` and every process they started, and theirs, where /proc tells; else none."""
    if not HAS_PROC:
        return set()
    return {member for pid in pids for member in {pid} | descendants(pid)}


def unlink_left_behind(names: set[str]) -> set[str]:
    """Unlink those of `names` that are left behind (left_behind) and return them: a test's cleanup, whatever
    its assertions then say."""
    left = left_behind(names)
    for name in left:
        with contextlib.suppress(FileNotFoundError):  # unlinked meanwhile (by a resource tracker still ending)
            os.unlink(f"/dev/shm/{name}")
    return left


def left_behind(names: set[str]) -> set[str]:
    """Those of `names` still in /dev/shm that no living process maps: memory nobody will unlink. It assumes that
    a segment nobody maps is garbage, which holds for the segments of the processes a test ended (an engine's):
    shared memory kept for a later reader (a snapshot's own segment, awaiting its reader) would be counted too."""
    if not names or not HAS_PROC:
        return set()
    pids = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
    return {name for name in names if os.path.exists(f"/dev/shm/{name}")} - mapped_segments(pids)
