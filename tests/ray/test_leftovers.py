"""thaw_ray.leftovers: a process records what it and its children hold in /dev/shm, and once they have ended a
sweep unlinks what nobody uses, never a file a live process maps, nor anything while one of the recorded processes
lives on; what no pool swept is swept by the next actor's start on the node."""

import json
import os
import signal
import subprocess
import sys
import uuid
from multiprocessing import resource_tracker, shared_memory

import pytest

import engine_guard
from descendants import HAS_PROC

pytestmark = pytest.mark.skipif(not HAS_PROC, reason="reads processes from /proc (Linux)")
engine_guard.require("ray", "install the [ray] extra (scripts/setup-core.sh does)")

# Two segments made and held by a child of the recording process (as an engine's process holds them), recorded,
# then named on stdout; both left out of the resource tracker, which would unlink them at the process's exit.
_RECORDING = """
import subprocess, sys, time
from multiprocessing import resource_tracker, shared_memory
from pool_engines import HOLDING
from thaw_ray import leftovers
recorder = leftovers.Recorder(sys.argv[1])
holder = subprocess.Popen([sys.executable, "-c", HOLDING], stdout=subprocess.PIPE, text=True)
kept = holder.stdout.readline().strip()
mine = shared_memory.SharedMemory(create=True, size=4096)
resource_tracker.unregister(mine._name, "shared_memory")
recorder.record()
print(kept, mine.name, holder.pid, flush=True)
time.sleep(3600)
"""


@pytest.fixture
def recorded():
    """(actor id, the recording process, its child, [the child's segment, its own]), ended and unlinked after."""
    from pool_engines import worker_env
    from thaw_ray import leftovers

    actor = f"test-{uuid.uuid4().hex}"  # no actor's: a sweep of it touches nothing of a real one
    process = subprocess.Popen([sys.executable, "-c", _RECORDING, actor], stdout=subprocess.PIPE, text=True,
                               stderr=subprocess.PIPE, env={**os.environ, **worker_env()})
    line = process.stdout.readline().split()
    if len(line) != 3:
        _end(process.pid)
        pytest.fail(f"the recording process failed: {process.communicate()[1]}")
    kept, mine, child = line
    yield actor, process, int(child), [kept, mine]
    _end(process.pid, int(child))
    process.communicate()
    for name in (kept, mine):
        if os.path.exists(f"/dev/shm/{name}"):
            os.unlink(f"/dev/shm/{name}")
    leftovers.forget(actor)


def _end(*pids: int) -> None:
    """SIGKILL those of `pids` still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_sweep_unlinks_what_the_ended_processes_held_but_not_what_a_live_process_maps(recorded) -> None:
    from thaw_ray import leftovers

    actor, process, child, (kept, mine) = recorded
    assert os.path.exists(leftovers.manifest_path(actor))
    other = shared_memory.SharedMemory(name=kept)  # this process maps the child's segment: in use
    resource_tracker.unregister(other._name, "shared_memory")  # not this process's to unlink
    try:
        _end(process.pid, child)
        process.wait()
        assert leftovers.sweep(actor, wait_s=30) == [mine]
        assert os.path.exists(f"/dev/shm/{kept}") and not os.path.exists(f"/dev/shm/{mine}")
    finally:
        other.close()
    assert os.path.exists(leftovers.manifest_path(actor))  # kept for what was in use, swept once no longer
    assert leftovers.sweep(actor, wait_s=0) == [kept]
    assert not os.path.exists(leftovers.manifest_path(actor)) and not os.path.exists(f"/dev/shm/{kept}")


def test_nothing_is_swept_while_a_recorded_process_lives(recorded) -> None:
    """The actor's child outlives it (no raylet ended it): what it holds stays, and the manifest with it, for a
    sweep once it has ended (leftovers.sweep_ended at the node's next actor's start)."""
    from thaw_ray import leftovers

    actor, process, child, names = recorded
    _end(process.pid)
    process.wait()
    assert leftovers.sweep(actor, wait_s=0.5) == []
    assert all(os.path.exists(f"/dev/shm/{name}") for name in names)
    assert os.path.exists(leftovers.manifest_path(actor))
    _end(child)
    assert sorted(leftovers.sweep(actor, wait_s=30)) == sorted(names)


def test_an_actors_start_sweeps_what_ended_actors_left_on_its_node(recorded, ray_cluster) -> None:
    """A manifest no pool swept (Ray shut down before the pool's close, say), its processes ended: the next actor
    started on the node sweeps it (every node is this machine here)."""
    from thaw_conformance.template.adapter import ToyThawEngine
    from thaw_ray import RayForkPool, leftovers

    actor, process, child, names = recorded
    _end(process.pid, child)
    process.wait()
    with RayForkPool(ToyThawEngine.start(vocab_size=1024), workers=1):
        assert not any(os.path.exists(f"/dev/shm/{name}") for name in names)
        assert not os.path.exists(leftovers.manifest_path(actor))


def test_a_file_left_out_is_never_recorded_though_the_recording_process_maps_it() -> None:
    """The parent's segment, mapped by an actor on its node (thaw_ray.actor: Recorder.leave_out before its restore
    reads it): made after the Recorder, as a parent's first capture may be, it is still not the actor's to sweep;
    a file mapped beside it, not left out, is recorded."""
    from thaw_ray import leftovers

    recorder = leftovers.Recorder(f"test-{uuid.uuid4().hex}")
    segments = [shared_memory.SharedMemory(create=True, size=4096) for _ in range(2)]  # mapped here, made since
    try:
        parents, engines = segments
        recorder.leave_out(parents.name)
        recorder.record()
        with open(leftovers.manifest_path(recorder.actor_id)) as manifest:
            files = json.load(manifest)["files"]
        assert engines.name in files and parents.name not in files
    finally:
        leftovers.forget(recorder.actor_id)
        for segment in segments:
            segment.close()
            segment.unlink()


def test_a_failing_sweep_or_record_never_fails_an_engines_start(monkeypatch) -> None:
    from thaw_ray import leftovers
    from thaw_ray.actor import PoolActor

    def broken(*args):
        raise OSError("broken here")

    actor = PoolActor()
    actor.recorder = leftovers.Recorder(f"test-{uuid.uuid4().hex}")  # as in an actor
    monkeypatch.setattr(leftovers, "sweep_ended", broken)
    monkeypatch.setattr(leftovers, "_family", broken)
    spec = {"factory": "thaw_conformance.template.adapter:ToyThawEngine.start", "kwargs": {"vocab_size": 1024}}
    assert actor.start(json.dumps(spec)) is None
    actor.close()  # outside an actor (no Ray id): its engine's close alone, this process's resource tracker kept


def test_an_actor_that_cannot_read_dev_shm_records_nothing_and_still_starts(monkeypatch) -> None:
    from thaw_ray import leftovers

    def broken(*args):
        raise PermissionError("/dev/shm unreadable here")

    monkeypatch.setattr(leftovers, "shm_inodes", broken)
    assert leftovers.Recorder.made(f"test-{uuid.uuid4().hex}") is None


def test_a_manifest_that_is_not_one_is_removed_by_the_sweep() -> None:
    from thaw_ray import leftovers

    path = leftovers.manifest_path(f"test-{uuid.uuid4().hex}")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "w") as out:
        out.write('{"processes": ')  # cut short
    leftovers.sweep_ended()
    assert not os.path.exists(path)


def test_a_manifests_new_copy_whose_writer_was_killed_is_removed_by_the_sweep() -> None:
    """A writer SIGKILLed between writing a manifest's new copy and renaming it leaves `<manifest>.<pid>.new`: the
    sweep removes it once that process has ended, and leaves a live writer's."""
    from thaw_ray import leftovers

    writer = subprocess.Popen([sys.executable, "-c", ""])
    writer.wait()  # its pid now names no process
    path = leftovers.manifest_path(f"test-{uuid.uuid4().hex}")
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    killed, live = f"{path}.{writer.pid}.new", f"{path}.{os.getpid()}.new"
    try:
        for new in (killed, live):
            with open(new, "w") as out:
                out.write('{"processes": ')  # cut short, as a write killed midway leaves it
        leftovers.sweep_ended()
        assert not os.path.exists(killed)
        assert os.path.exists(live)
    finally:
        for new in (killed, live):
            leftovers.forget_path(new)
