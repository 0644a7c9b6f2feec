"""Tensor-parallel vLLM engines (TP=2) on thaw's KV path: a snapshot holds the pages a TP=1 engine holds (every KV
head), whatever the TP size of the engine it came from or goes to.

Across TP sizes the model's arithmetic differs (each rank reduces its share of every matrix product, and the
ranks' sums are added), so the same prompt gives KV that differs in the last bits and may give other tokens: across
TP sizes these tests compare the bytes of KV a restore wrote, and tokens only within one TP size. The TP=2 engines
run in a helper process (tensor_parallel_helper.py: vLLM caches its thread binding with the first engine of a
process); the TP=1 engine is the session's."""

import os
from types import SimpleNamespace

import numpy
import pytest
from conftest import ENGINE_KWARGS, generate, make_engine, run_helper, trunk_tokens

PROMPT = trunk_tokens(100, seed=2)  # 3 full pages of 32 tokens
SUFFIX = trunk_tokens(20, seed=3)
PARAMS = dict(max_tokens=8, temperature=0.0, ignore_eos=True)
FULL = len(PROMPT) // ENGINE_KWARGS["block_size"] * ENGINE_KWARGS["block_size"]


def _rank_cpus() -> str:
    """VLLM_CPU_OMP_THREADS_BIND for two ranks: this process's CPUs in two halves."""
    cpus = sorted(os.sched_getaffinity(0))
    half = len(cpus) // 2
    return "|".join(",".join(map(str, part)) for part in (cpus[:half], cpus[half:]))


@pytest.fixture(scope="module")
def tp1(vllm, zoo):
    return make_engine(zoo, "llama", "float32")


@pytest.fixture(scope="module")
def run(tp1, zoo, vllm, tmp_path_factory):
    """The helper's report and directory, after the TP=1 engine captured the prompt's pages (out/tp1.thaw)."""
    import thaw_format
    import thaw_vllm

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a TP=2 engine on CPU binds each rank to CPUs of its own: this process has one")
    out = tmp_path_factory.mktemp("tp")
    tp1.reset_prefix_cache()
    generate(tp1, PROMPT, vllm.SamplingParams(**PARAMS))
    thaw_format.save(thaw_vllm.capture(tp1, include_weights=True, chains=[PROMPT]), out / "tp1.thaw")
    config = {"model": str(zoo.make_model("llama")), "prompt": PROMPT, "suffix": SUFFIX, "params": PARAMS,
              "engine_kwargs": dict(ENGINE_KWARGS, dtype="float32", tensor_parallel_size=2),
              "tp1": str(out / "tp1.thaw"), "midstream": [trunk_tokens(70, seed=20), trunk_tokens(45, seed=21)],
              "out": str(out), "env": {"VLLM_CPU_OMP_THREADS_BIND": _rank_cpus()}}
    return run_helper("tensor_parallel_helper.py", config, timeout=600), out


def _kv(path):
    import thaw_format

    snapshot = thaw_format.load(path)
    return [[bytes(layer.tensors[role].data) for role in ("k", "v")] for layer in snapshot.kv.layers]


def test_a_tp2_engine_describes_and_captures_every_kv_head(run):
    """Each rank holds one of the model's two KV heads; the engine, and its snapshot's pages, hold both, and are
    the TP=1 engine's pages of the same prompt up to the last bits of the arithmetic (a head out of place would
    differ entirely)."""
    import thaw_format

    report, out = run
    assert report["describe"]["kv"]["num_kv_heads"] == 2
    tp2, tp1 = thaw_format.load(out / "tp2.thaw"), thaw_format.load(out / "tp1.thaw")
    assert tp2.kv.layers[0].tensors["k"].shape == tp1.kv.layers[0].tensors["k"].shape == (3, 32, 2, 32)
    for a, b in zip(tp2.kv.layers, tp1.kv.layers):
        for role in ("k", "v"):
            x, y = (numpy.frombuffer(t.tensors[role].data, numpy.float32) for t in (a, b))
            assert numpy.allclose(x, y, rtol=1e-4, atol=1e-5)
    assert "2 ranks holds 1 of the 2 KV heads" in tp2.engine.native_kv_layout


def test_a_tp2_snapshot_restored_into_a_tp2_engine_is_hit_and_continues_exactly(run):
    """The restored engine's pages, captured again, are the snapshot's bytes; the prompt again reads its full
    pages from the cache (vLLM's own cached-token count) and gives the parent's tokens (same TP size). The engine
    is the parent, whose blocks held this KV before: the restore resets its prefix cache first, and the next test's
    TP=1 bytes, which it never computed, show a recapture reads what the restore wrote."""
    report, out = run
    assert _kv(out / "tp2_in_tp2.thaw") == _kv(out / "tp2.thaw")
    assert report["restored"]["tp2"] == {"token_ids": report["parent"]["prompt"]["token_ids"],
                                         "num_cached_tokens": FULL}


def test_a_tp1_snapshot_restored_into_a_tp2_engine_is_its_bytes(run):
    """The TP=1 pages differ from the TP=2 engine's own in the last bits (the control: the bytes read back are the
    ones restored, not ones the engine computed), and the restored pages are hit."""
    report, out = run
    assert _kv(out / "tp1_in_tp2.thaw") == _kv(out / "tp1.thaw") != _kv(out / "tp2.thaw")
    assert report["restored"]["tp1"]["num_cached_tokens"] == FULL


def test_ranks_refused_a_remote_read_stay_in_step_and_the_restore_falls_back(run):
    """Every rank refuses to read the client's memory (RemoteReadError, not a snapshot's error): the restore goes
    through the engine's restore segment instead. vLLM raises at the first rank's failure without reading the
    others' replies, so each rank returns its error as data (rpc.py): else every later call of the engine reads
    the reply of the call before it (the fallback's stage the refusal, a capture's seal before its ranks wrote)."""
    report, out = run
    assert (report["restored"]["tp2_sent"], report["restored"]["tp1_sent"]) == ("remote", "segment")
    assert _kv(out / "tp1_in_tp2.thaw") == _kv(out / "tp1.thaw")  # the capture after it is every rank's bytes


def test_a_corrupt_segment_or_file_or_a_replaced_file_is_refused_before_any_rank_writes(run):
    """A segment is verified by its first rank, a file by every rank; the ranks' staged ids must be the planned one."""
    report, _ = run
    for refused in (report["corrupt_refused"], report["corrupt_file_refused"]):  # a segment, a file
        assert "checksum" in refused and "kv/0/k" in refused
    assert "changed while it was read" in report["replaced_file_refused"]
    assert report["after_corrupt"] == {"token_ids": report["parent"]["prompt"]["token_ids"], "num_cached_tokens": FULL}


def test_a_tp2_engine_restores_its_own_lent_capture(run):
    """Its first rank's lent segment, which the other rank reads where it lies."""
    report, out = run
    assert report["restored"]["own_sent"] == "lent"
    assert _kv(out / "own_in_tp2.thaw") == _kv(out / "tp1.thaw")
    assert report["restored"]["own"]["num_cached_tokens"] == FULL


def test_requests_captured_mid_stream_under_tp2_resume_exactly_after_a_restore(run):
    """A partial tail page and the seeded request's generator, staged on every rank, give the parent's tokens."""
    report, _ = run
    captured, final = report["midstream"]["captured"], report["midstream"]["final"]
    assert set(captured) == {"greedy", "seeded"} and captured["seeded"]["rng"] and not captured["greedy"]["rng"]
    for request_id, request in captured.items():
        k = len(request["output_token_ids"])
        assert 5 <= k < 16 and request["output_token_ids"] == final[request_id][:k]
        assert report["restored"]["midstream"][request_id] == {"token_ids": final[request_id],
                                                            "num_cached_tokens": request["num_computed_tokens"]}


def test_a_tp2_snapshot_restored_into_a_tp1_engine_is_its_bytes(run, tp1, vllm):
    import thaw_format
    import thaw_vllm

    _, out = run
    thaw_vllm.restore(tp1, thaw_format.load(out / "tp2.thaw"))
    again = thaw_vllm.capture(tp1, include_weights=False, chains=[PROMPT])
    assert [[bytes(layer.tensors[r].data) for r in ("k", "v")] for layer in again.kv.layers] == _kv(out / "tp2.thaw")
    assert generate(tp1, PROMPT, vllm.SamplingParams(**PARAMS))[1] == FULL


def test_weights_captured_under_tp_are_the_checkpoints_not_a_ranks_shards(run):
    """Each rank holds a shard of every weight; a capture's weights are the checkpoint's, as a TP=1 engine's."""
    import thaw_format

    _, out = run
    tp2, tp1 = thaw_format.load(out / "tp2.thaw"), thaw_format.load(out / "tp1.thaw")
    assert tp2.model.weights_digest == tp1.model.weights_digest
    assert {n: bytes(t.data) for n, t in tp2.weights.tensors.items()} == \
        {n: bytes(t.data) for n, t in tp1.weights.tensors.items()}


def test_a_seal_without_its_capture_published_is_refused(vllm):
    from thaw_vllm.worker import SealError, _sealing

    worker = SimpleNamespace(_thaw_sealing=None)
    with pytest.raises(SealError, match="no capture"):
        _sealing(worker, "shm://a#1")
    worker._thaw_sealing = ("shm://b#1", bytearray(1))
    with pytest.raises(SealError, match="shm://b#1"):
        _sealing(worker, "shm://a#1")
    assert worker._thaw_sealing is None  # dropped: a stale capture is never sealed


def test_a_fork_pool_of_tp2_engines_continues_a_tp2_parent_exactly(run):
    report, _ = run
    assert report["pool"] == {"token_ids": report["parent"]["continued"]["token_ids"], "cached_tokens": FULL}


def _parallel(tp=2, pp=1, dcp=1, pcp=1):
    return SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp, decode_context_parallel_size=dcp,
                           prefill_context_parallel_size=pcp)


@pytest.mark.parametrize("parallel, total, heads, match", [
    (_parallel(tp=2), 1, 1, "tensor_parallel_size=2 over 1 KV heads: each rank holds 1"),  # vLLM replicates it
    (_parallel(tp=4), 2, 1, "tensor_parallel_size=4 over 2 KV heads"),
    (_parallel(tp=1, pp=2), 2, 2, "pipeline_parallel_size=2"),
    (_parallel(tp=2, dcp=2), 2, 1, "decode_context_parallel_size=2"),
])
def test_shares_that_are_not_whole_heads_are_refused(vllm, parallel, total, heads, match):
    """Refused where the engine's layout is described (describe: layout_error), so a capture and a restore refuse
    before the engine is asked anything else (api._check_capturable, api.check_compatible)."""
    from thaw_vllm.tensor_parallel import head_share

    with pytest.raises(NotImplementedError, match=match):
        head_share(parallel, total, heads, 0, 32, 4)


@pytest.mark.parametrize("replies", [
    [{"source": None}, {"source": "shm://a#1", "regions": {}}],  # the first rank's reply listed second
    [{"source": "shm://a#1", "regions": {}}, {"source": None}],
])
def test_the_capture_is_the_one_rank_that_published_its_whatever_the_replies_order(vllm, replies):
    from thaw_vllm.core_ops import _publisher

    assert _publisher(replies) == {"source": "shm://a#1", "regions": {}}


@pytest.mark.parametrize("sources, count", [([None, None], 0), (["shm://a#1", "shm://b#1"], 2)])
def test_a_capture_that_not_exactly_one_rank_published_is_refused_naming_the_count(vllm, sources, count):
    from thaw_vllm.core_ops import _publisher

    with pytest.raises(RuntimeError, match=f"^{count} of 2 tensor-parallel ranks published the capture; exactly one"):
        _publisher([{"source": source} for source in sources])
