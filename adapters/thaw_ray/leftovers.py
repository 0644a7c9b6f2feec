"""What an actor's engine leaves in /dev/shm when the actor ends without closing it, and its removal (Linux).

An engine's processes register their shared memory with multiprocessing's resource tracker, which unlinks it once
they have ended (vLLM's engine core in its multiprocessing mode: segments of hundreds of MiB and a named
semaphore); SGLang's scheduler unlinks its segments itself, at its engine's shutdown. The actor's tracker dies
with the actor, and its engine's processes with it where the raylet is a subreaper (the cluster's
`kill_child_processes_on_worker_exit_with_raylet_subreaper`; without it they live on, and what they hold is kept),
so an actor that ends without closing its engine (SIGKILLed, or killed by the pool) leaves their files in /dev/shm
for good. So each actor writes down, in a manifest on its node, its processes (pid and start time) and the /dev/shm
files they map or hold open (name and inode), leaving out every file that was there before its engine started:
every RECORD_EVERY_S while its engine starts (thaw_ray.actor), once it has started, and after each round
(`Recorder`). When the pool finds an actor dead, or kills one whose engine did not close, it runs `sweep` on the
actor's node: once those processes have ended, each name that is still the regular file of this user's recorded
(its inode) and that no live process maps or holds open is unlinked; one a live process uses is kept in the
manifest, for a later sweep; each actor's start sweeps the manifests on its node whose processes have all ended
(`sweep_ended`: those no pool swept, and those kept; and a manifest's new copy whose writer was killed before
renaming it). Not seen: a file made after the last record, and the processes of other users, whose /proc entries
this user cannot read (an engine's files are its user's own, mode 0600). The manifests are read only from one fixed
directory of this user's own (`MANIFESTS`), which no other user can write to: the same for every process of the
node, whatever its environment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import time
from typing import Optional

SHM = "/dev/shm"
RECORDS = sys.platform.startswith("linux") and os.path.isdir(SHM)  # where /proc and /dev/shm tell
SWEEP_WAIT_S = 60.0  # how long a sweep waits for the dead actor's processes to end (the raylet kills them)
# fixed, not the process's temporary directory: the sweep task runs under its own runtime_env, not the actor's
MANIFESTS = f"/tmp/thaw-ray-{os.getuid()}"
log = logging.getLogger(__name__)
_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Log a warning the first time this process meets it: a record's failure recurs at every round."""
    if message not in _warned:
        _warned.add(message)
        log.warning("thaw_ray.leftovers: %s", message)


def manifest_path(actor_id: str) -> str:
    """The actor's manifest on its node."""
    return os.path.join(MANIFESTS, f"{actor_id}.json")


def _own_directory() -> bool:
    """Whether the manifests' directory is this user's own, which no other user can write to (made so if need
    be): one made by another user under that name could name files for a sweep to unlink (warned once)."""
    os.makedirs(MANIFESTS, mode=0o700, exist_ok=True)
    status = os.lstat(MANIFESTS)  # the name itself: a link to elsewhere is not this user's directory
    if stat.S_ISDIR(status.st_mode) and status.st_uid == os.getuid() and not status.st_mode & 0o022:
        return True
    warn_once(f"{MANIFESTS} is not a directory of this user's own that only it can write to: nothing is recorded "
              "or swept")
    return False


def shm_files() -> dict[str, int]:
    """The files in /dev/shm now, by name: their inodes."""
    with os.scandir(SHM) as entries:
        return {entry.name: entry.inode() for entry in entries}


def shm_inodes() -> set[int]:
    """The inodes of the files in /dev/shm now."""
    return set(shm_files().values())


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


def _load(path: str) -> Optional[dict]:
    """A manifest, or None if there is none; one that is not what `record` writes is removed (warned)."""
    try:
        with open(path) as manifest:
            loaded = json.load(manifest)
        if isinstance(loaded.get("processes"), list) and isinstance(loaded.get("files"), dict):
            return loaded
    except FileNotFoundError:
        return None
    except (ValueError, AttributeError):
        pass
    warn_once(f"{path} is not a manifest of thaw_ray's: removed")
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    return None


def _write(path: str, manifest: dict) -> None:
    """Write it whole (a sweep may read it meanwhile), or remove it when it names no file."""
    if not manifest["files"]:
        forget_path(path)
        return
    new = f"{path}.{os.getpid()}.new"  # a sweep on the node and a new actor's may write the same manifest at once
    with open(new, "w") as out:
        json.dump(manifest, out)
    os.replace(new, path)


def _forget_unfinished(name: str) -> None:
    """`<manifest>.<pid>.new` (_write) whose writer has ended: it was killed (SIGKILL) before renaming it, and
    nothing else will; one whose writer lives may yet be renamed."""
    pid = name.rsplit(".", 2)[-2]
    if pid.isdigit() and _stat(pid) is None:
        forget_path(os.path.join(MANIFESTS, name))


def forget_path(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def forget(actor_id: str) -> None:
    """Drop the actor's manifest: its engine closed, leaving nothing."""
    forget_path(manifest_path(actor_id))


def _living(processes: list) -> list:
    return [entry for entry in processes if _started(entry[0]) == entry[1]]


class Recorder:
    """An actor's records, made in its process: built before its engine starts, so that no file already in
    /dev/shm is ever recorded (nor swept), however the engine uses it."""

    def __init__(self, actor_id: str) -> None:
        self.actor_id = actor_id
        self.before = shm_inodes() if RECORDS else set()
        self._present = None  # the /dev/shm inodes the last record saw: the same again, it reads nothing more

    @classmethod
    def made(cls, actor_id: str) -> Optional["Recorder"]:
        """A Recorder, or None (warned once) where /dev/shm cannot be read: never the actor's failure."""
        try:
            return cls(actor_id)
        except Exception as exc:
            warn_once(f"actor {actor_id} records nothing: {type(exc).__name__}: {exc}")
            return None

    def leave_out(self, name: str) -> None:
        """Never record the /dev/shm file `name` (as it is now: its inode), which the engine reads but another
        process owns (the parent's segment, handed to an actor on its node): a sweep would unlink it from under its
        owner. Best effort, as a record: a file gone is nothing to leave out."""
        try:
            self.before.add(os.stat(os.path.join(SHM, name)).st_ino)
        except OSError:
            pass

    def record(self) -> None:
        """Best effort (a failure is warned once, never raised): write down this process's family and the /dev/shm
        files they hold now, keeping from earlier records the files still there (a file the engine no longer maps
        may still be its own, left to its tracker) and the processes still running."""
        try:
            if RECORDS and _own_directory():
                self._record()
        except Exception as exc:
            warn_once(f"recording what actor {self.actor_id}'s engine holds in {SHM} failed: "
                      f"{type(exc).__name__}: {exc}")

    def _record(self) -> None:
        # Nothing made or removed in /dev/shm since the last record: it stands (one scandir a round, not a walk of
        # /proc). A process started since is not written down, but a sweep never unlinks what a live one holds.
        now = shm_files()  # one read of /dev/shm: what changed, and what the manifest keeps
        present = set(now.values())
        if present == self._present:
            return
        processes = [[pid, _started(pid)] for pid in _family(os.getpid())]
        processes = [entry for entry in processes if entry[1]]
        path = manifest_path(self.actor_id)
        manifest = _load(path) or {"processes": [], "files": {}}
        held = set().union(*(_held(pid) for pid, _ in processes)) - self.before
        manifest["processes"] = processes + [entry for entry in _living(manifest["processes"])
                                             if entry not in processes]
        files = {name: inode for name, inode in manifest["files"].items() if now.get(name) == inode}
        files.update({name: inode for name, inode in now.items() if inode in held})
        manifest["files"] = files
        _write(path, manifest)
        self._present = present


def _in_use() -> set[int]:
    return set().union(*map(_held, _pids()))


def sweep(actor_id: str, wait_s: float = SWEEP_WAIT_S, in_use: Optional[set[int]] = None) -> list[str]:
    """On the actor's node, once it has ended: wait up to `wait_s` for the processes its manifest names to end
    (read again as it waits: the actor may have recorded more before it ended), then unlink each file it names
    that is still the regular file of this user's recorded and that no live process maps or holds open (`in_use`,
    found here unless given). The manifest is dropped, or kept naming the files a live process uses, for a later
    sweep. The names unlinked: none without a manifest (the actor closed its engine, never recorded, or was
    swept), nor while one of its processes lives on (its manifest kept)."""
    if not (RECORDS and _own_directory()):
        return []
    path = manifest_path(actor_id)
    deadline = time.monotonic() + wait_s
    while True:
        manifest = _load(path)
        if manifest is None:
            return []
        if not _living(manifest["processes"]):
            break
        if time.monotonic() >= deadline:
            return []
        time.sleep(0.1)
    in_use = _in_use() if in_use is None else in_use
    removed, kept = [], {}
    try:
        for name, inode in manifest["files"].items():
            try:
                status = os.lstat(os.path.join(SHM, name))
                if not (stat.S_ISREG(status.st_mode) and status.st_uid == os.getuid() and status.st_ino == inode):
                    continue  # not the file recorded: another's, made since
                if inode in in_use:
                    kept[name] = inode
                    continue
                os.unlink(os.path.join(SHM, name))
                removed.append(name)
            except FileNotFoundError:  # gone already (its tracker, or the engine's close)
                pass
            except OSError as exc:
                warn_once(f"sweeping {SHM}/{name} (actor {actor_id}): {type(exc).__name__}: {exc}")
    finally:
        _write(path, {"processes": [], "files": kept})
    return removed


def sweep_ended() -> list[str]:
    """Sweep, on this node, every actor whose manifest is left and whose processes have all ended: those no pool
    swept (Ray shut down before the pool was closed, a driver that exited before its sweep ran) and those whose
    files a live process used at their last sweep. The names unlinked."""
    if not (RECORDS and _own_directory()):
        return []
    in_use, removed = _in_use(), []
    for manifest in os.listdir(MANIFESTS):
        if manifest.endswith(".new"):
            _forget_unfinished(manifest)
        elif manifest.endswith(".json"):
            try:
                removed += sweep(manifest[:-5], 0, in_use)
            except Exception as exc:  # the next manifest all the same
                warn_once(f"sweeping {manifest}: {type(exc).__name__}: {exc}")
    return removed
