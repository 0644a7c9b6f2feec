"""Every committed hostile file gets exactly its expected error class and message, from a path and from memory,
and is refused before the reader allocates more than a small multiple of the file's own size."""

import json
import tracemalloc
from pathlib import Path

import pytest

import thaw_format as tf
from hostile.corpus import CASES

CORPUS = Path(__file__).with_name("corpus")
ENTRIES = json.loads((CORPUS / "index.json").read_text())["cases"]


def outcome(call):
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - anything not a SnapshotError fails the comparison below
        return type(exc).__name__, str(exc)
    return None, ""


def read_path(entry):
    path = CORPUS / entry["file"]
    return lambda: tf.verify(path) if entry["call"] == "verify" else tf.load(path)


def read_memory(entry):
    data = (CORPUS / entry["file"]).read_bytes()
    return lambda: tf.SnapshotFile(data).verify() if entry["call"] == "verify" else tf.loads(data)


def test_index_lists_every_file_and_every_case():
    files = sorted(p.name for p in CORPUS.glob("*.thaw"))
    assert sorted(e["file"] for e in ENTRIES) == files
    assert sorted(f"{name}.thaw" for name in CASES) == files
    assert sum(e["error"] is not None for e in ENTRIES) >= 60


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
@pytest.mark.parametrize("source", [read_path, read_memory], ids=["path", "memory"])
def test_hostile_file_gets_its_error(entry, source):
    error, message = outcome(source(entry))
    assert error == entry["error"], f"{entry['why']}: got {error}: {message}"
    assert entry["match"] in message, f"{entry['why']}: message {message!r} lacks {entry['match']!r}"


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_hostile_file_is_refused_before_allocating(entry):
    """Declared sizes up to 2^64 never turn into allocations: the peak stays within the file's size class."""
    path = CORPUS / entry["file"]
    size = path.stat().st_size
    tracemalloc.start()
    try:
        outcome(read_path(entry))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 4 * size + (256 << 10), f"{entry['file']}: peak {peak} bytes for a {size}-byte file"
