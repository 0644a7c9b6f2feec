"""What an actor's engine leaves in /dev/shm when the actor ends without closing it, and its removal (Linux).

An engine's processes register their shared memory with multiprocessing's resource tracker, which unlinks it once
they have ended (vLLM's engine core in its multiprocessing mode: segments of hundreds of MiB and a named
semaphore); SGLang's scheduler unlinks its segments itself, at its engine's shutdown. The raylet kills an actor's
tracker and its engine's processes with the actor, so an actor that ends without closing its engine (SIGKILLed,
or killed by the pool) left them in /dev/shm for good. So each actor writes down, in a manifest on its node, its
processes (pid and start time) and the /dev/shm files they map or hold open (name and inode): once its engine
has started and after each round (`record`). When the pool finds an actor dead, or kills one whose engine did
not close, it runs `sweep` on the actor's node: once those processes have ended, each name that is still the
file recorded (its inode) and that no live process maps or holds open is unlinked; each actor's start sweeps the
manifests on its node whose processes have all ended (`sweep_ended`: those no pool swept). What a live process
uses is never removed. Not seen: a file made after the last record, and the processes of other users, whose
/proc entries this user cannot read (an engine's files are its user's own, mode 0600). The manifests are read
only from a directory of this user's own, which no other user can write to.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import sys
import tempfile
import time
from typing import Optional

SHM = "/dev/shm"
RECORDS = sys.platform.startswith("linux") and os.path.isdir(SHM)  # where /proc and /dev/shm tell
SWEEP_WAIT_S = 60.0  # how long a sweep waits for the dead actor's processes to end (the raylet kills them)


def manifest_path(actor_id: str) -> str:
    """The actor's manifest on its node, in this user's directory of the node's temporary one (`_own_directory`)."""
    return os.path.join(tempfile.gettempdir(), f"thaw-ray-{os.getuid()}", f"{actor_id}.json")


def _own_directory() -> bool:
    """Whether the manifests' directory is this user's own, which no other user can write to (made so if need
    be): one made by another user under that name could name files for a sweep to unlink."""
    path = os.path.dirname(manifest_path(""))
    os.makedirs(path, mode=0o700, exist_ok=True)
    status = os.lstat(path)  # the name itself: a link to elsewhere is not this user's directory
    return stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o022


def _stat(pid) -> Optional[list[str]]:
    """The fields of /proc/<pid>/stat after the command's name (state first), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as status:
            return status.read().rpartition(")")[2].split()
    except OSError:
        return None


def _started(pid) -> Optional[str]:
    """When the process started (clock ticks since boot): with its pid, it names the process, not a reuse of it.
    None once it has ended (a zombie too, whose parent has yet to reap it)."""
    fields = _stat(pid)
    return fields[19] if fields and fields[0] != "Z" else None


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _family(pid: int) -> list[int]:
    """`pid` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for other in _pids():
        fields = _stat(other)
        if fields:
            children.setdefault(int(fields[1]), []).append(other)
    found, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _held(pid: int) -> set[int]:
    """The inodes of the /dev/shm files a process maps or holds open: by inode, since a named semaphore is mapped
    under the temporary name glibc made it as."""
    inodes = set()
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
                if len(fields) == 6 and fields[5].startswith(SHM + "/"):
                    inodes.add(int(fields[4]))
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(SHM + "/"):
                    inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return inodes


def _load(path: str) -> dict:
    """A manifest; FileNotFoundError if there is none, or one that is not what `record` writes (written whole)."""
    try:
        with open(path) as manifest:
            return json.load(manifest)
    except ValueError:
        raise FileNotFoundError(f"{path} is not a manifest of thaw_ray's") from None


def record(actor_id: str) -> None:
    """Add this process's family and the /dev/shm files it holds now to the actor's manifest (what an earlier
    record named stays: a file the engine no longer maps may still be its own, left to its tracker)."""
    if not (RECORDS and _own_directory()):
        return
    processes = _family(os.getpid())
    held = set().union(*map(_held, processes))
    path = manifest_path(actor_id)
    manifest = {"processes": [], "files": {}}
    with contextlib.suppress(FileNotFoundError):
        manifest = _load(path)
    known = manifest["processes"]
    known += [entry for entry in ([pid, _started(pid)] for pid in processes) if entry[1] and entry not in known]
    with os.scandir(SHM) as entries:
        manifest["files"].update({entry.name: entry.inode() for entry in entries if entry.inode() in held})
    if not manifest["files"]:  # nothing to sweep (an engine without shared memory: no manifest at all)
        return
    with open(path + ".new", "w") as out:
        json.dump(manifest, out)
    os.replace(path + ".new", path)  # whole, for a sweep that reads it meanwhile


def forget(actor_id: str) -> None:
    """Drop the actor's manifest: its engine closed, leaving nothing."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(manifest_path(actor_id))


def sweep(actor_id: str, wait_s: float = SWEEP_WAIT_S) -> list[str]:
    """On the actor's node, once it has ended: wait up to `wait_s` for the processes its manifest names to end,
    then unlink each file it names that is still the file recorded and that no live process maps or holds open,
    and drop the manifest. The names unlinked: none without a manifest (the actor closed its engine, never
    recorded, or was swept), nor while one of its processes lives on (its manifest kept for a later sweep)."""
    if not (RECORDS and _own_directory()):
        return []
    try:
        manifest = _load(manifest_path(actor_id))
    except FileNotFoundError:
        return []
    deadline = time.monotonic() + wait_s
    while any(_started(pid) == started for pid, started in manifest["processes"]):
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.1)
    in_use = set().union(*map(_held, _pids()))
    removed = []
    for name, inode in manifest["files"].items():
        with contextlib.suppress(FileNotFoundError):  # gone already (its tracker, or the engine's close)
            if os.stat(os.path.join(SHM, name)).st_ino == inode and inode not in in_use:
                os.unlink(os.path.join(SHM, name))
                removed.append(name)
    forget(actor_id)
    return removed


def sweep_ended() -> list[str]:
    """Sweep, on this node, every actor whose manifest is left and whose processes have all ended: those no pool
    swept (Ray shut down before the pool was closed, a driver that exited before its sweep ran). The names
    unlinked."""
    if not (RECORDS and _own_directory()):
        return []
    manifests = os.listdir(os.path.dirname(manifest_path("")))
    return [name for manifest in manifests if manifest.endswith(".json") for name in sweep(manifest[:-5], 0)]
