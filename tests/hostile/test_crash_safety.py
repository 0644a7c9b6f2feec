"""Crash safety: a writer process SIGKILLed at each step of a save, and readers racing a writer that replaces the file.

Invariants: the path always reads as a complete snapshot (the previous one or a new one, byte for byte); a
partial file never reads as valid; readers see the old snapshot or the new one, never a mix. SIGKILL stops the
process, not the machine: what a power cut does to unsynced pages is the fsyncs' job and is not tested here.
"""

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import thaw_format as tf
from hostile.writer_child import SAVE_POINTS, STREAM_POINTS, crash_snapshot

CHILD = Path(__file__).with_name("writer_child.py")


@pytest.fixture(scope="module")
def known():
    """Snapshot id -> (label, snapshot) for the previous snapshot P and the child's A and B."""
    out = {}
    for label in ("P", "A", "B"):
        snapshot = crash_snapshot(label)
        tf.dumps(snapshot)  # sets snapshot.id
        out[snapshot.id] = (label, snapshot)
    return out


def start_writer(path: Path, mode: str, point: str = "") -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, str(CHILD), str(path), mode] + ([point] if point else []),
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def stop(child: subprocess.Popen) -> None:
    child.kill()
    child.wait()
    child.stdout.close()


def identify(path: Path, known: dict) -> str:
    """The label of the complete snapshot at `path`, or "partial" if it does not read; anything else fails."""
    try:
        snapshot = tf.load(path)
    except tf.CorruptSnapshotError:
        return "partial"
    label, expected = known[snapshot.id]
    assert snapshot == expected, f"{path} has {label}'s id but not its content"
    return label


def kill_at(path: Path, mode: str, point: str, known: dict) -> tuple[str, list[str]]:
    """Start the writer, SIGKILL it once it reports it stopped at `point`; what is at the path, and what each
    leftover temporary reads as."""
    child = start_writer(path, mode, point)
    try:
        assert child.stdout.readline().strip() == f"at {point}"
    finally:
        stop(child)
    temporaries = sorted(path.parent.glob(f".{path.name}.*.thaw-tmp"))
    left_over = [identify(t, known) for t in temporaries]
    for temporary in temporaries:
        temporary.unlink()
    return identify(path, known) if path.exists() else "absent", left_over


# Killed at each step of tf.save(A) over the previous snapshot P: what the path holds, and the temporary left.
SAVE_OUTCOMES = {
    "created": ("P", ["partial"]),
    "header": ("P", ["partial"]),
    "half_data": ("P", ["partial"]),
    "data": ("P", ["partial"]),
    "trailer": ("P", ["A"]),  # complete but not renamed: a valid snapshot, never the one at the path
    "synced": ("P", ["A"]),
    "renamed": ("A", []),
}


@pytest.mark.parametrize("point", SAVE_POINTS)
def test_sigkilled_atomic_save_leaves_the_old_or_the_new_snapshot(tmp_path, known, point):
    path = tmp_path / "engine.thaw"
    tf.save(next(s for label, s in known.values() if label == "P"), path)
    before = path.read_bytes()
    at_path, left_over = kill_at(path, "save", point, known)
    assert (at_path, left_over) == SAVE_OUTCOMES[point]
    if at_path == "P":
        assert path.read_bytes() == before  # the target is never touched before the rename


@pytest.mark.parametrize("point", STREAM_POINTS)
def test_sigkilled_streaming_write_leaves_a_partial_file_that_never_reads(tmp_path, known, point):
    path = tmp_path / "stream.thaw"
    assert kill_at(path, "stream", point, known) == ("partial", [])


def test_readers_racing_a_replacing_writer_see_whole_snapshots(tmp_path, known):
    path = tmp_path / "shared.thaw"
    child = start_writer(path, "save")
    seen, lazily = Counter(), Counter()
    try:
        while not path.exists():
            time.sleep(0.01)
        deadline = time.monotonic() + 20.0  # ends early, once both snapshots were seen both ways
        while time.monotonic() < deadline and (len(seen) < 2 or len(lazily) < 2 or sum(seen.values()) < 20):
            seen[identify(path, known)] += 1
            with tf.open(path) as f:  # opened before a replace, read after: still the snapshot it opened
                time.sleep(0.02)
                snapshot = f.snapshot()
                label, expected = known[f.id]
                assert snapshot == expected
                lazily[label] += 1
    finally:
        stop(child)
    assert set(seen) == {"A", "B"} and set(lazily) == {"A", "B"}, (seen, lazily)
