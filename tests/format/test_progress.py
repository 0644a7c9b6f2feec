"""Progress hooks (the CLI's bars: thaw verify, inspect --verify, convert; the library's save, load and verify)
advance within a tensor, in steps of whole chunks, so a file of one huge tensor does not sit at 0 until its end.
Correctness only: the calls a recording sink receives, never timing."""

import pytest

import thaw_format as tf
from thaw_format import mover
from thaw_format.snapshot import Snapshot, Weights
from thaw_format.tensor import Tensor

STEP = 64 << 10
SIZE = 1 << 20  # one tensor of 16 steps


@pytest.fixture
def one_big_tensor(monkeypatch):
    monkeypatch.setattr(mover, "_PROGRESS_BYTES", STEP)
    monkeypatch.setattr(mover, "_PROGRESS_PIECE_BYTES", STEP)
    data = bytes(range(256)) * (SIZE // 256)
    return Snapshot(weights=Weights(tensors={"w": Tensor("uint8", [SIZE], data)})), data


def _advances_within_the_tensor(calls: list) -> None:
    assert sum(calls) == SIZE and max(calls) <= STEP and len(calls) >= SIZE // STEP, calls


def test_save_load_and_verify_report_one_tensor_as_they_go(one_big_tensor, tmp_path):
    snapshot, data = one_big_tensor
    path = tmp_path / "one.thaw"
    calls = []
    tf.save(snapshot, path, chunk_size=4096, progress=calls.append)
    _advances_within_the_tensor(calls)
    for load in (lambda sink: tf.load(path, progress=sink), lambda sink: tf.load(path, mmap=True, progress=sink)):
        calls = []
        assert bytes(load(calls.append).weights.tensors["w"].data) == data
        _advances_within_the_tensor(calls)
    calls = []
    tf.verify(path, progress=calls.append)
    _advances_within_the_tensor(calls)


def test_a_filled_save_reports_one_tensor_as_it_goes(one_big_tensor, tmp_path):
    """A tensor a fill gathers into a stage (the one-pass path of engines' saves) is reported as its stage goes
    out, not once written whole."""
    from thaw_format.writer import EncodedSnapshot, deferred_tensor

    snapshot, data = one_big_tensor
    deferred = Snapshot(weights=Weights(tensors={"w": deferred_tensor("uint8", [SIZE])}))
    fill = {"weights/w": lambda target, chunk_size: mover.copy_with_crcs(data, target, chunk_size)}
    path, calls = tmp_path / "filled.thaw", []
    EncodedSnapshot(deferred, chunk_size=4096).save(path, calls.append, fill)
    _advances_within_the_tensor(calls)
    assert path.read_bytes() == tf.dumps(snapshot, chunk_size=4096)


def test_diff_reports_one_tensor_as_it_goes_and_names_a_bad_chunk_past_its_first_piece(one_big_tensor, tmp_path):
    from thaw_format.diff import diff

    snapshot, data = one_big_tensor
    other = Snapshot(weights=Weights(tensors={"w": Tensor("uint8", [SIZE], data[::-1])}))
    a, b = tmp_path / "a.thaw", tmp_path / "b.thaw"
    tf.save(snapshot, a, chunk_size=4096)
    tf.save(other, b, chunk_size=4096)
    calls = []
    with tf.open(a) as fa, tf.open(b) as fb:
        report = diff(fa, fb, calls.append)
    assert sum(calls) == 2 * SIZE and max(calls) <= STEP and len(calls) >= 2 * SIZE // STEP, calls
    (differ,) = report["tensors"]["differ"]
    assert (differ["a"]["crc32c"], differ["b"]["crc32c"]) == (f"{mover.crc32c(data):08x}",
                                                               f"{mover.crc32c(data[::-1]):08x}")
    with tf.open(b) as fb:
        at = fb.info("weights/w")[2].offset + SIZE // 2 + 5  # in chunk 128, the ninth piece
    with open(b, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    with tf.open(a) as fa, tf.open(b) as fb, pytest.raises(tf.CorruptSnapshotError, match="in chunk 128,"):
        diff(fa, fb)
