"""thaw_format.sdk.request_ids.RequestIds: the ids an adapter gives new requests."""

from thaw_format.sdk.request_ids import RequestIds


def test_ids_count_on_and_skip_those_in_flight():
    ids = RequestIds("toy")
    assert [ids.fresh(set()) for _ in range(2)] == ["toy-0", "toy-1"]
    restored = {"toy-2", "toy-3", "other-4"}  # a snapshot's requests keep their ids
    assert ids.fresh(restored) == "toy-4"
    assert ids.fresh(set()) == "toy-5"  # the count goes on past a skipped id; none is given twice
