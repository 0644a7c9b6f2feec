"""A tensor-parallel SGLang engine (TP=2) on thaw's KV path: a snapshot holds every KV head whatever the TP size of
the engine it came from or goes to, so TP=1 and TP=2 engines restore each other's snapshots.

Across TP sizes the model's arithmetic differs (each rank reduces its share of every matrix product, and the
ranks' sums are added), so the same prompt gives KV that differs in the last bits and may give other tokens: across
TP sizes these tests compare the bytes of KV a restore wrote and SGLang's cached-token count, and tokens only within
one TP size. The TP=1 engine is a family child, given back as the fork left it.
"""

import dataclasses
import os
import threading
import time

import numpy
import pytest
from conftest import generate
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError

PROMPT = list(range(100, 170))  # 70 tokens: 3 pages of 32, the last short
SUFFIX = [5, 6, 7]


def _rank_cpus() -> str:
    """SGLANG_CPU_OMP_THREADS_BIND for two ranks: this process's CPUs in two halves (one NUMA node here, and SGLang
    binds one rank per node unless told)."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half:]))


def _kv(snapshot):
    return [bytes(t.data) for layer in snapshot.kv.layers for t in (layer.tensors["k"], layer.tensors["v"])]


def _held(thaw_sglang, engine):
    """The engine's KV of PROMPT's pages, captured; and the pages."""
    snapshot = thaw_sglang.capture(engine, include_weights=False, chains=[PROMPT])
    return snapshot.prefix, _kv(snapshot)


@pytest.fixture(scope="module")
def run(thaw_sglang, zoo, module_engines, family, tmp_path_factory):
    """The TP=2 engine (shut down with the module) and a TP=1 one (family.children[3]) after each prefilled PROMPT,
    their captures of its pages (the TP=2 one also into a file), and the TP=2 engine's continuation of
    PROMPT + SUFFIX."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a TP=2 engine on CPU binds each rank to CPUs of its own: this process has one")
    before = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND")
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = _rank_cpus()  # read by the engine's rank processes as they start
    try:
        tp2 = module_engines(zoo.make_model("llama"), tp_size=2)
    finally:
        os.environ.pop("SGLANG_CPU_OMP_THREADS_BIND") if before is None else os.environ.update(
            SGLANG_CPU_OMP_THREADS_BIND=before)
    tp1 = family.children[3]
    generate(tp2, PROMPT)
    generate(tp1, PROMPT)
    out = tmp_path_factory.mktemp("tp")
    tp2_snapshot = thaw_sglang.capture(tp2, include_weights=False, chains=[PROMPT])
    thaw_sglang.capture(tp2, out / "tp2.thaw", include_weights=False, chains=[PROMPT])
    tp1_snapshot = thaw_sglang.capture(tp1, include_weights=False, chains=[PROMPT])
    continued = generate(tp2, PROMPT + SUFFIX)
    yield dict(tp2=tp2, tp1=tp1, tp2_snapshot=tp2_snapshot, tp1_snapshot=tp1_snapshot, file=out / "tp2.thaw",
               continued=continued)
    thaw_sglang.restore(tp1, family.snapshot)


def test_a_tp2_engine_captures_every_kv_head(thaw_sglang, run):
    """Each rank holds one of the model's two KV heads; its snapshot's pages hold both, and are the TP=1 engine's
    pages of the same prompt up to the last bits of the arithmetic (a head out of place would differ entirely).
    Into a file, the same bytes."""
    import thaw_format

    tp2, tp1 = run["tp2_snapshot"], run["tp1_snapshot"]
    assert tp2.kv.layers[0].tensors["k"].shape == tp1.kv.layers[0].tensors["k"].shape == (3, 32, 2, 32)
    assert tp2.prefix == tp1.prefix
    for x, y in zip(_kv(tp2), _kv(tp1)):
        assert numpy.allclose(numpy.frombuffer(x, numpy.float32), numpy.frombuffer(y, numpy.float32),
                              rtol=1e-4, atol=1e-5)
    assert "each of 2 ranks holds 1 of the 2 KV heads" in tp2.engine.native_kv_layout
    assert _kv(thaw_format.load(run["file"])) == _kv(tp2)


def test_a_tp2_snapshot_restored_into_a_tp1_engine_is_its_bytes_and_a_cache_hit(thaw_sglang, run):
    thaw_sglang.restore(run["tp1"], run["tp2_snapshot"])
    assert _held(thaw_sglang, run["tp1"]) == (run["tp2_snapshot"].prefix, _kv(run["tp2_snapshot"]))
    assert generate(run["tp1"], PROMPT + SUFFIX)[1] == len(PROMPT)


def test_a_tp1_snapshot_restored_into_the_tp2_engine_is_its_bytes_and_a_cache_hit(thaw_sglang, run):
    thaw_sglang.restore(run["tp2"], run["tp1_snapshot"])
    assert _held(thaw_sglang, run["tp2"]) == (run["tp1_snapshot"].prefix, _kv(run["tp1_snapshot"]))
    assert generate(run["tp2"], PROMPT + SUFFIX)[1] == len(PROMPT)


def test_a_tp2_snapshot_restored_into_the_tp2_engine_continues_exactly(thaw_sglang, run):
    """Same TP size, same arithmetic: the tokens the engine gave before, read from the restored pages."""
    thaw_sglang.restore(run["tp2"], run["tp2_snapshot"])
    assert generate(run["tp2"], PROMPT + SUFFIX) == run["continued"]
    assert run["continued"][1] == len(PROMPT)
    assert run["tp2"].leak_warnings() == 0


def test_what_a_tp2_engine_cannot_take_is_refused_before_any_rank_changes(thaw_sglang, family, run, tmp_path):
    """Weights it would have to shard, and a corrupt file (every rank reads a file itself): refused on every rank
    before any writes, so the engine holds and serves the pages it held. Its weights are not captured either."""
    engine = run["tp2"]
    thaw_sglang.restore(engine, run["tp2_snapshot"])
    held = _held(thaw_sglang, engine)
    other = dataclasses.replace(family.snapshot, model=dataclasses.replace(family.snapshot.model,
                                                                           weights_digest="0" * 64))
    with pytest.raises(IncompatibleSnapshotError, match="tensor-parallel engine takes only snapshots of the weights"):
        thaw_sglang.restore(engine, other)
    corrupt = tmp_path / "corrupt.thaw"
    data = bytearray(run["file"].read_bytes())
    import thaw_format

    with thaw_format.SnapshotFile(memoryview(data)) as snapshot_file:
        data[snapshot_file.info("kv/0/k")[2].offset + 100] ^= 0x40
    corrupt.write_bytes(data)
    with pytest.raises(CorruptSnapshotError):
        thaw_sglang.restore(engine, str(corrupt))
    with pytest.raises(RuntimeError, match="KV only"):
        thaw_sglang.capture(engine)
    assert _held(thaw_sglang, engine) == held
    assert generate(engine, PROMPT + SUFFIX) == run["continued"]


def test_a_tp2_engine_restores_a_file_and_its_snapshot_loaded_in_memory(thaw_sglang, run):
    """From the file's path (every rank reads and checks it), and from
    thaw_format.load(file) in this process (every rank reads its memory: the remote path): its bytes and a hit."""
    import thaw_format
    from thaw_format.sdk import lent

    engine, expected = run["tp2"], _kv(run["tp2_snapshot"])
    for source in (str(run["file"]), thaw_format.load(run["file"])):
        assert engine.flush_cache().success
        thaw_sglang.restore(engine, source)
        assert _held(thaw_sglang, engine) == (run["tp2_snapshot"].prefix, expected)
    assert lent.last_sent(engine) == "remote"
    assert generate(engine, PROMPT + SUFFIX) == run["continued"]


def test_a_corrupt_segment_unverified_is_refused_on_every_rank_before_any_writes(thaw_sglang, run, tmp_path):
    """A segment loaded with verify=False: the first rank alone verifies the segment every rank maps, and its
    refusal reaches the other rank, so neither rank's cache changes (the capture holds both ranks' heads)."""
    import thaw_format
    from thaw_sglang import thaw_engine

    engine = run["tp2"]
    thaw_sglang.restore(engine, run["tp2_snapshot"])
    held = _held(thaw_sglang, engine)
    corrupt = tmp_path / "corrupt.thaw"
    data = bytearray(run["file"].read_bytes())
    with thaw_format.SnapshotFile(memoryview(data)) as snapshot_file:
        data[snapshot_file.info("kv/1/v")[2].offset + 100] ^= 0x40
    corrupt.write_bytes(data)
    with pytest.raises(CorruptSnapshotError, match="kv/1/v"):
        thaw_sglang.restore(engine, thaw_format.load(corrupt, shared=True, verify=False))
    with pytest.raises(CorruptSnapshotError, match="kv/1/v"):  # a check verifies it as a restore does
        thaw_engine.check(engine, thaw_format.load(corrupt, shared=True, verify=False))
    assert _held(thaw_sglang, engine) == held
    assert generate(engine, PROMPT + SUFFIX) == run["continued"]


def test_ranks_refused_a_remote_read_fall_back_to_the_restore_segment(thaw_sglang, run, monkeypatch):
    """Every rank refused a read of this process's memory (a RemoteReadError, which no pickle rebuilds): the
    refusal reaches the client as such, and the restore goes again through the engine's restore segment."""
    import thaw_format
    from thaw_format.sdk import lent, remote

    publish = remote.publish

    def publish_refused(owner, snapshot):  # a token this process does not hold: the ranks' reads are refused
        source = publish(owner, snapshot)
        if source is None:  # the fallback: refused remote reads, the engine is sent a segment
            return None
        pid, token, rest = source[len(remote.REMOTE_PREFIX):].split("/", 2)
        address, _, value = token.partition("=")
        return f"{remote.REMOTE_PREFIX}{pid}/{address}={bytes(b ^ 0xFF for b in bytes.fromhex(value)).hex()}/{rest}"

    engine = run["tp2"]
    assert engine.flush_cache().success
    monkeypatch.setattr(remote, "publish", publish_refused)
    monkeypatch.setattr(engine, "_thaw_remote_refused", False, raising=False)  # the fallback's mark, undone after
    thaw_sglang.restore(engine, thaw_format.load(run["file"]))
    assert lent.last_sent(engine) == "segment"
    assert _held(thaw_sglang, engine) == (run["tp2_snapshot"].prefix, _kv(run["tp2_snapshot"]))


def test_kv_heads_sglang_pads_on_cpu_are_refused(monkeypatch):
    """SGLang pads 3 KV heads to 4 for two ranks on CPU, rewriting the config's count: each rank holds 2, and
    2 x 2 heads would pass a check against the padded count (total_kv_heads must read the model's own 3)."""
    from types import SimpleNamespace

    import torch
    from thaw_sglang import _internals, tensor_parallel

    config = SimpleNamespace(hf_config=SimpleNamespace(original_total_num_kv_heads=3),
                             get_total_num_kv_heads=lambda: 4)
    scheduler = SimpleNamespace(model_config=config)
    monkeypatch.setattr(_internals, "other_parallelism", lambda _: {})
    monkeypatch.setattr(_internals, "kv_buffers", lambda _: ([torch.empty(8, 2, 32)], [torch.empty(8, 2, 32)]))
    monkeypatch.setattr(_internals, "tensor_parallel", lambda _: (0, 2, "the TP ranks' group"))
    with pytest.raises(NotImplementedError, match="over 3 KV heads: each rank holds 2, 4 in all"):
        tensor_parallel.share(scheduler)


def test_other_parallelism_is_named_before_a_tp_engine_off_cpu_is_refused(monkeypatch):
    """What head_share refuses (here pipeline parallelism) is named first, then a TP engine's KV off the CPU."""
    from types import SimpleNamespace

    import torch
    from thaw_sglang import _internals, tensor_parallel

    monkeypatch.setattr(_internals, "total_kv_heads", lambda _: 4)
    monkeypatch.setattr(_internals, "kv_buffers", lambda _: ([torch.empty(8, 2, 32, device="meta")],) * 2)
    monkeypatch.setattr(_internals, "tensor_parallel", lambda _: (0, 2, "the TP ranks' group"))
    monkeypatch.setattr(_internals, "other_parallelism", lambda _: {"pp_size": 2})
    with pytest.raises(NotImplementedError, match="thaw_sglang maps tensor parallelism only; this engine has pp_size=2"):
        tensor_parallel.share(SimpleNamespace())
    monkeypatch.setattr(_internals, "other_parallelism", lambda _: {})
    with pytest.raises(NotImplementedError, match="thaw_sglang maps tensor parallelism on CPU only"):
        tensor_parallel.share(SimpleNamespace())


def test_a_restore_refused_while_a_request_waits_in_the_paused_engine_leaves_its_cache(thaw_sglang, run):
    """SGLang's own flush ignores a paused engine's waiting requests: a restore refused as busy is refused before
    any rank changes or flushes its cache, so the request that waited then reads the pages kept (a hit)."""
    engine = run["tp2"]
    thaw_sglang.restore(engine, run["tp2_snapshot"])
    engine.pause()
    finished = {}
    waiting = threading.Thread(target=lambda: finished.update(out=generate(engine, PROMPT + SUFFIX)))
    waiting.start()
    try:
        deadline = time.monotonic() + 60
        while True:  # until the request is queued: before, the restore takes the same pages again
            try:
                thaw_sglang.restore(engine, run["tp2_snapshot"])
            except RuntimeError as refused:
                assert "EngineBusyError" in str(refused)
                break
            assert time.monotonic() < deadline, "the request never reached the paused engine"
            time.sleep(0.05)
    finally:
        engine.unpause()
        waiting.join()
    assert finished["out"] == run["continued"]
    assert engine.leak_warnings() == 0


@pytest.fixture
def first_rank(thaw_sglang, monkeypatch):
    """A ThawScheduler as the first of two ranks, its exchanges with the other played here: no engine (the ranks
    of a real one never diverge, nor fail between a publish and their writes, on their own)."""
    from thaw_format.sdk import agreement
    from thaw_sglang import _internals, scheduler_ext, tensor_parallel, transport

    scheduler = object.__new__(scheduler_ext.ThawScheduler)
    scheduler.thaw_restored_from = None
    monkeypatch.setattr(_internals, "tensor_parallel", lambda _: (0, 2, "the TP ranks' group"))
    monkeypatch.setattr(agreement, "is_first", lambda group: True)
    monkeypatch.setattr(agreement, "gathered", lambda group, value: [value, value])
    monkeypatch.setattr(tensor_parallel, "from_first", lambda _, work: scheduler.published.append(work()) or
                        scheduler.published[-1])
    scheduler.published = []
    yield scheduler
    transport.release(scheduler)


def test_ranks_that_planned_other_pages_refuse_the_capture_before_it_is_published(first_rank, monkeypatch):
    """The ranks compare a digest of the pages each planned (Pages.digest) before the first publishes."""
    import thaw_format
    from thaw_format.sdk import agreement
    from thaw_sglang import tensor_parallel

    planned = (thaw_format.Snapshot(), {}, "rank 0's pages")
    monkeypatch.setattr(tensor_parallel, "agreed", lambda _, work: planned)
    monkeypatch.setattr(agreement, "gathered", lambda group, value: [value, "rank 1's pages"])
    outcome = []
    first_rank._thaw_report = lambda result, work: outcome.append(work)
    first_rank.thaw_capture("no result block", page_size=32, weights=False, into="lent")
    with pytest.raises(RuntimeError, match="the ranks differ in the pages planned"):
        outcome[0]()
    assert first_rank.published == []


def test_ranks_that_read_other_snapshots_refuse_the_restore_before_any_writes(first_rank, monkeypatch):
    """The ranks compare the ids of the snapshots each read (a file replaced between two ranks' reads of its path)
    once every rank has staged, and refuse it before any rank writes. (On the TP=2 engine rank 0 reads nothing
    while rank 1 is held stopped, so no engine test places the replacement between the two reads.)"""
    from types import SimpleNamespace

    from thaw_format.sdk import agreement
    from thaw_sglang import tensor_parallel

    staged = []
    monkeypatch.setattr(tensor_parallel, "agreed", lambda _, work: staged.append(work) or SimpleNamespace(id="A"))
    monkeypatch.setattr(agreement, "gathered", lambda group, value: [value, "B"])
    with pytest.raises(CorruptSnapshotError, match="the ranks differ in the snapshot each read from its source"):
        first_rank._thaw_restore_shares("/a/file.thaw", verified=False)
    assert len(staged) == 1  # the stage; the write never ran


def test_a_restore_failing_while_the_ranks_write_flushes_or_names_the_ranks_that_refused(first_rank, monkeypatch):
    """Once every rank staged, a rank failing its writes leaves the ranks' caches differing: every rank flushes,
    and one whose flush SGLang refused is named beside the failure."""
    from types import SimpleNamespace

    from thaw_format.sdk import agreement
    from thaw_sglang import _internals, tensor_parallel

    steps = iter([lambda: SimpleNamespace(id="A"), lambda: (_ for _ in ()).throw(OSError("rank 1: disk gone"))])
    monkeypatch.setattr(tensor_parallel, "agreed", lambda _, work: next(steps)())
    monkeypatch.setattr(agreement, "gathered", lambda group, value: [value, False if value is True else value])
    monkeypatch.setattr(_internals, "flush", lambda _: True)
    with pytest.raises(RuntimeError, match=r"failed partway \(rank 1: disk gone\).* on ranks \[1\]"):
        first_rank._thaw_restore_shares("/a/file.thaw", verified=False)


def test_a_rank_failing_to_learn_whether_it_verifies_still_enters_the_exchange(first_rank, monkeypatch):
    """Everything a rank does before the ranks agree runs inside the exchange: a rank raising before it would leave
    the others waiting in it."""
    from thaw_sglang import tensor_parallel

    entered = []
    monkeypatch.setattr(tensor_parallel, "is_first", lambda _: (_ for _ in ()).throw(OSError("no group")))
    monkeypatch.setattr(tensor_parallel, "agreed", lambda _, work: entered.append(work) or work())
    with pytest.raises(OSError, match="no group"):
        first_rank._thaw_restore_shares("/a/file.thaw", verified=False)
    assert len(entered) == 1


@pytest.mark.parametrize("rank, source, verifies", [(0, "shm://seg#64", True), (1, "shm://seg#64", False),
                                                     (1, "/a/file.thaw", True)])
def test_a_check_verifies_a_segment_once_and_agrees_on_the_snapshot_as_a_restore(first_rank, monkeypatch, rank,
                                                                                 source, verifies):
    """A check reads as a restore does: a segment every rank maps is verified by the first rank alone (a file by
    every rank, each reading its own), and the ranks compare the ids of the snapshots they read."""
    from types import SimpleNamespace

    from thaw_format.sdk import agreement
    from thaw_sglang import scheduler_ext, transport

    reads = []
    monkeypatch.setattr(agreement, "is_first", lambda group: rank == 0)
    monkeypatch.setattr(transport, "read", lambda source, owner, verify: reads.append(verify) or
                        SimpleNamespace(id="A"))
    monkeypatch.setattr(scheduler_ext, "check_restorable", lambda scheduler, snapshot: None)
    outcome = []
    first_rank._thaw_report = lambda result, work: outcome.append(work)
    first_rank.thaw_check("no result block", source)
    outcome[0]()
    assert reads == [verifies]
    monkeypatch.setattr(agreement, "gathered", lambda group, value: [value, value if value is None else "B"])
    with pytest.raises(CorruptSnapshotError, match="the ranks differ in the snapshot each read from its source"):
        outcome[0]()


@pytest.mark.parametrize("path, into", [(True, "lent"), (False, "lent"), (False, "own")])
def test_a_capture_failing_after_the_first_rank_published_unlinks_its_segment(first_rank, monkeypatch, tmp_path,
                                                                              path, into):
    """Another rank failed writing its heads into the published segment: no client will read it, so the first
    rank unlinks it at once (a lent one taken back), whichever segment it was published in."""
    import thaw_format
    from thaw_format.sdk.shared import segment_of
    from thaw_format.writer import deferred_tensor
    from thaw_sglang import tensor_parallel

    def other_rank_failed(_, work):
        raise OSError("rank 1: its heads not written")

    monkeypatch.setattr(tensor_parallel, "agreed", other_rank_failed)
    snapshot = thaw_format.Snapshot(weights=thaw_format.Weights({"t": deferred_tensor("uint8", (4096,))}))
    with pytest.raises(OSError, match="its heads not written"):
        first_rank._thaw_capture_shares(snapshot, {"weights/t": None}, str(tmp_path / "x.thaw") if path else "",
                                        into)
    [(source, _)] = first_rank.published
    name = segment_of(source)[0]
    leaked = os.path.exists(f"/dev/shm/{name}")
    if leaked and (path or into == "own"):  # left without the fix (a lent one is the lender's to unlink)
        os.unlink(f"/dev/shm/{name}")
    assert not leaked


def test_a_failed_reseal_leaves_no_writable_mapping_of_the_segment_cached(first_rank, monkeypatch):
    """The first rank maps the published segment writable to reseal it: a reseal that fails forgets that mapping
    too (lent.forget), as one that succeeds does."""
    import thaw_format
    from thaw_format.sdk import lent
    from thaw_format.writer import deferred_tensor
    from thaw_sglang import scheduler_ext, tensor_parallel

    def reseal_failed(view, names):
        raise OSError("reseal failed")

    mapped, forgotten = [], []
    monkeypatch.setattr(tensor_parallel, "agreed", lambda _, work: None)  # every rank wrote its heads
    monkeypatch.setattr(scheduler_ext, "reseal", reseal_failed)
    monkeypatch.setattr(lent, "writable_view", lambda source: mapped.append(source) or bytearray(8))
    monkeypatch.setattr(lent, "forget", forgotten.append)
    snapshot = thaw_format.Snapshot(weights=thaw_format.Weights({"t": deferred_tensor("uint8", (4096,))}))
    with pytest.raises(OSError, match="reseal failed"):
        first_rank._thaw_capture_shares(snapshot, {"weights/t": None}, "", "own")
    assert mapped and forgotten == [mapped[-1]] * 2  # after the writes, and after the reseal
