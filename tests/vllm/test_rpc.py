"""thaw_vllm.rpc: a snapshot's error crosses vLLM's process boundaries as data and is raised again as itself
(test_lent_kv checks the whole way, worker -> engine core -> client, on a multiprocessing engine)."""

import pytest

import thaw_format


def test_snapshot_errors_travel_as_data_and_come_back_as_their_class(vllm):
    from thaw_vllm import rpc

    @rpc.as_data
    def callee(exc):
        raise exc

    for kind in (thaw_format.CorruptSnapshotError, thaw_format.IncompatibleSnapshotError):
        data = callee(kind("kv/0/k chunk 3: checksum mismatch"))
        assert data == {"error": {"type": kind.__name__, "message": "kv/0/k chunk 3: checksum mismatch"}}
        with pytest.raises(kind, match="^kv/0/k chunk 3: checksum mismatch$"):
            rpc.unwrap(data)
    with pytest.raises(ValueError, match="not a snapshot's"):  # other errors are vLLM's to report
        callee(ValueError("not a snapshot's"))
    with pytest.raises(thaw_format.SnapshotError, match="odd"):  # a name that is no thaw_format error class
        rpc.unwrap({"error": {"type": "SystemExit", "message": "odd"}})
    assert rpc.unwrap({"source": "shm://x#1"}) == {"source": "shm://x#1"}
