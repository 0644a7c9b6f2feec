"""How an engine's ranks agree (thaw_format.sdk.agreement, as SGLang's tensor-parallel ranks use it), on two gloo
processes over localhost and no engine: a rank's failure reaches every rank as plain data, whatever its class.

A mover.RemoteReadError is not rebuilt from its args: pickled between the ranks (all_gather_object), it became a
TypeError on every rank, and a restore of an in-memory Snapshot whose remote read the system refused never fell
back to a segment (thaw_format.sdk.lent.sending matches "remote read refused" in the error's text); an exception
no pickle carries left the other rank waiting for good.
"""

import errno
import multiprocessing
import socket

import pytest
import torch.distributed as dist
from thaw_format import CorruptSnapshotError, mover

TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outcome(call):
    try:
        return ("value", call())
    except BaseException as exc:  # noqa: BLE001 - the test compares what each rank raised
        try:
            return ("error", type(exc).__name__, str(exc))
        except ValueError:  # the case whose str raises
            return ("error", type(exc).__name__, None)


def _rank(rank: int, port: int, results) -> None:
    """Every case in turn on this rank (one pair of processes for all: each start imports torch)."""
    from thaw_format.sdk import agreement

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results.put((rank, {case: _outcome(lambda: fn(agreement, rank)) for case, fn in CASES.items()}))
    finally:
        dist.destroy_process_group()


def _refused_on_second(tp, rank):
    def work():
        if rank == 1:
            raise mover.RemoteReadError(errno.EPERM, 1234, 0x1000, 64)
        return "read"
    return tp.agreed(dist.group.WORLD, work)


def _corrupt_on_first(tp, rank):
    def work():
        if rank == 0:
            raise CorruptSnapshotError("tensor 'kv/0/k': checksum mismatch in chunk 0")
        return rank
    return tp.agreed(dist.group.WORLD, work)


def _unpicklable_on_second(tp, rank):
    class Local(Exception):  # a class defined here cannot be pickled at all
        pass

    def work():
        if rank == 1:
            raise Local("gone")
    return tp.agreed(dist.group.WORLD, work)


def _unprintable_on_second(tp, rank):
    class Unprintable(Exception):
        def __str__(self):
            raise ValueError("no text")

    def work():
        if rank == 1:
            raise Unprintable(1, 2)  # two args: as_data asks its str
    return tp.agreed(dist.group.WORLD, work)


def _unencodable_on_second(tp, rank):
    return tp.gathered(dist.group.WORLD, object() if rank == 1 else "plain")


def _oversize_on_second(tp, rank):
    return tp.gathered(dist.group.WORLD, "x" * (tp.MAX_BYTES + 1) if rank == 1 else "small")


def _agreed_value(tp, rank):
    return tp.agreed(dist.group.WORLD, lambda: rank * 10)


def _first_fails(tp, rank):
    def publish():
        raise mover.RemoteReadError(errno.EACCES, 99, 0, 8)
    return tp.from_first(dist.group.WORLD, publish)


def _first_publishes(tp, rank):
    return tp.from_first(dist.group.WORLD, lambda: ("shm://a", "shm://a#64"))


def _first_is_where_from_first_runs(tp, rank):
    return tp.is_first(dist.group.WORLD), tp.from_first(dist.group.WORLD, dist.get_rank)


def _ranks_differ(tp, rank):
    return tp.agree_on(dist.group.WORLD, "the snapshot each rank read", f"sha256:{rank}", CorruptSnapshotError)


def _ranks_same(tp, rank):
    return tp.agree_on(dist.group.WORLD, "the planned pages", "same")


CASES = {fn.__name__.lstrip("_"): fn for fn in (
    _refused_on_second, _corrupt_on_first, _unpicklable_on_second, _unprintable_on_second, _unencodable_on_second,
    _oversize_on_second, _agreed_value, _first_fails, _first_publishes, _first_is_where_from_first_runs, _ranks_differ,
    _ranks_same)}


@pytest.fixture(scope="module")
def outcomes() -> dict:
    """{case: {rank: what the case returned or raised there}}."""
    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), _free_port()
    ranks = [ctx.Process(target=_rank, args=(rank, port, results)) for rank in range(2)]
    for process in ranks:
        process.start()
    try:
        got = dict(results.get(timeout=TIMEOUT) for _ in ranks)
    finally:
        for process in ranks:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    return {case: {rank: got[rank][case] for rank in got} for case in CASES}


def test_a_refused_remote_read_reaches_every_rank_as_such(outcomes):
    got = outcomes["refused_on_second"]
    assert got[1][:2] == ("error", "RemoteReadError")
    assert got[0][:2] == ("error", "RuntimeError")
    assert got[0][2].startswith("rank 1: RemoteReadError: ")
    for _, _, message in got.values():
        assert mover.RemoteReadError.REFUSED in message


def test_a_snapshot_error_keeps_its_class_on_every_rank(outcomes):
    got = outcomes["corrupt_on_first"]
    assert {rank: outcome[:2] for rank, outcome in got.items()} == {0: ("error", "CorruptSnapshotError"),
                                                                   1: ("error", "CorruptSnapshotError")}
    assert "checksum mismatch in chunk 0" in got[1][2]


def test_an_error_no_pickle_can_carry_still_reaches_every_rank(outcomes):
    got = outcomes["unpicklable_on_second"]
    assert got[1] == ("error", "Local", "gone")
    assert got[0] == ("error", "RuntimeError", "rank 1: Local: gone")


def test_an_error_whose_text_raises_still_reaches_every_rank(outcomes):
    got = outcomes["unprintable_on_second"]
    assert got[1][:2] == ("error", "Unprintable")
    assert got[0] == ("error", "RuntimeError", "rank 1: Unprintable: <unprintable Unprintable>")


def test_a_value_one_rank_cannot_encode_raises_on_every_rank(outcomes):
    got = outcomes["unencodable_on_second"]
    assert [outcome[:2] for outcome in got.values()] == [("error", "TypeError")] * 2
    assert "ranks [1]" in got[0][2]


def test_a_value_over_the_cap_raises_on_every_rank(outcomes):
    got = outcomes["oversize_on_second"]
    assert [outcome[:2] for outcome in got.values()] == [("error", "ValueError")] * 2


def test_agreed_returns_each_rank_its_own_value(outcomes):
    assert outcomes["agreed_value"] == {0: ("value", 0), 1: ("value", 10)}


def test_the_first_ranks_failure_reaches_the_others(outcomes):
    got = outcomes["first_fails"]
    assert got[0][:2] == ("error", "RemoteReadError")
    assert got[1][:2] == ("error", "RuntimeError") and mover.RemoteReadError.REFUSED in got[1][2]


def test_the_first_ranks_value_reaches_the_others(outcomes):
    published = ("value", ["shm://a", "shm://a#64"])
    assert outcomes["first_publishes"] == {0: published, 1: published}


def test_the_first_rank_is_the_one_from_first_runs_on(outcomes):
    """One meaning of the first rank: the rank an adapter gives its one-rank duties is where from_first published."""
    assert outcomes["first_is_where_from_first_runs"] == {0: ("value", (True, 0)), 1: ("value", (False, 0))}


def test_every_rank_verifies_a_file_and_the_first_rank_alone_a_segment():
    from thaw_format.sdk.agreement import verifies

    assert [verifies(s, first) for s in ("/x/a.thaw", "shm://seg#64") for first in (True, False)] == \
        [True, True, True, False]


def test_ranks_that_differ_are_refused_on_every_rank(outcomes):
    got = outcomes["ranks_differ"]
    for rank in (0, 1):
        assert got[rank] == ("error", "CorruptSnapshotError",
                             "the ranks differ in the snapshot each rank read: sha256:0, sha256:1 (by rank)")
    assert outcomes["ranks_same"] == {0: ("value", None), 1: ("value", None)}

