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
