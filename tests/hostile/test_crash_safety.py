"""Crash safety: a writer process SIGKILLed at random points, and readers racing a writer that replaces the file.

Invariants: the path always reads as a complete snapshot (the previous one or a new one, byte for byte); a
partial file never reads as valid; readers see the old snapshot or the new one, never a mix. SIGKILL stops the
process, not the machine: what a power cut does to unsynced pages is the fsyncs' job and is not tested here.
"""

import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import thaw_format as tf
from hostile.writer_child import crash_snapshot

CHILD = Path(__file__).with_name("writer_child.py")
KILLS = 8


@pytest.fixture(scope="module")
def known():
    """Snapshot id -> (label, snapshot) for the previous snapshot P and the child's A and B."""
    out = {}
    for label in ("P", "A", "B"):
        snapshot = crash_snapshot(label)
        tf.dumps(snapshot)  # sets snapshot.id
        out[snapshot.id] = (label, snapshot)
    return out


def start_writer(path: Path, mode: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, str(CHILD), str(path), mode], stdout=subprocess.PIPE, text=True)
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


def kill_at_random_points(path: Path, mode: str, known: dict, seed: int):
    """Start the writer KILLS times, SIGKILL it after a random delay, and identify what it left."""
    rng = random.Random(seed)
    at_path, left_over = Counter(), Counter()
    for _ in range(KILLS):
        child = start_writer(path, mode)
        try:
            time.sleep(rng.uniform(0.0, 0.2))  # an 8 MiB save takes ~0.05 s here: kills land in every phase
        finally:
            stop(child)
        at_path[identify(path, known)] += 1
        for temporary in path.parent.glob(f".{path.name}.*.thaw-tmp"):
            left_over[identify(temporary, known)] += 1
            temporary.unlink()
    return at_path, left_over


def test_sigkilled_atomic_save_leaves_the_old_or_a_new_snapshot(tmp_path, known):
    path = tmp_path / "engine.thaw"
    tf.save(next(s for label, s in known.values() if label == "P"), path)
    at_path, left_over = kill_at_random_points(path, "save", known, seed=1)
    assert "partial" not in at_path, at_path  # the path itself is never damaged
    assert set(at_path) <= {"P", "A", "B"}
    # Killed mid-save, the temporary file is partial (refused) or complete (a valid new snapshot, not renamed).
    assert set(left_over) <= {"partial", "A", "B"} and sum(left_over.values()) >= KILLS // 2, left_over


def test_sigkilled_streaming_write_never_leaves_a_partial_file_that_reads(tmp_path, known):
    path = tmp_path / "stream.thaw"
    at_path, _ = kill_at_random_points(path, "stream", known, seed=2)
    assert set(at_path) <= {"partial", "A", "B"}
    assert at_path["partial"] >= 1, at_path  # the kills did land mid-write


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
