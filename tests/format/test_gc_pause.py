"""Bulk reads and writes pause the cyclic garbage collector and leave it as they found it."""

import gc

import pytest

import thaw_format as tf


def observed_during(call):
    """Whether the collector was enabled while `call` ran (seen from a progress callback inside it)."""
    seen = []
    call(lambda _: seen.append(gc.isenabled()))
    return seen


@pytest.fixture
def path(tmp_path, full_snapshot):
    path = tmp_path / "s.thaw"
    tf.save(full_snapshot, path)
    return path


def test_paused_during_save_and_load_and_enabled_after(tmp_path, full_snapshot, path):
    assert gc.isenabled()
    assert set(observed_during(lambda progress: tf.save(full_snapshot, tmp_path / "t.thaw", progress=progress))) == {False}
    assert set(observed_during(lambda progress: tf.load(path, progress=progress))) == {False}
    assert gc.isenabled()


def test_left_disabled_when_the_caller_disabled_it(path):
    gc.disable()
    try:
        tf.load(path)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_enabled_again_after_an_error(tmp_path):
    (tmp_path / "bad.thaw").write_bytes(b"not a snapshot")
    with pytest.raises(tf.CorruptSnapshotError):
        tf.load(tmp_path / "bad.thaw")
    assert gc.isenabled()
