"""thaw must not change how vLLM's CPU backend binds the worker's own threads: a KV connector makes vLLM keep
one more core back for the engine core, and on a machine with that few cores vLLM then keeps none back and
binds the worker's OpenMP threads to every core (see thaw_vllm._internals.keep_cpu_reservation)."""

import os
import platform

import pytest
from conftest import ENGINE_KWARGS, run_helper, trunk_tokens


@pytest.fixture(scope="module")
def bindings(vllm, zoo):
    """binding_helper's report: a plain engine and a thaw engine, each in vLLM's multiprocessing mode."""
    config = {"model": str(zoo.make_model("llama")), "prompt": trunk_tokens(40, seed=7),
              "engine_kwargs": dict(ENGINE_KWARGS, dtype="float32", enable_prefix_caching=True)}
    return run_helper("binding_helper.py", config, timeout=600)


def test_thaw_engine_worker_is_bound_like_a_plain_engines(bindings):
    got = bindings
    assert got["thaw"]["thread_cores"] == got["plain"]["thread_cores"]
    assert got["thaw"]["omp_threads"] == got["plain"]["omp_threads"]
    assert got["thaw"]["token_ids"] == got["plain"]["token_ids"]


def test_thaw_moves_kv_on_the_workers_cores_and_those_kept_for_the_engine_core(bindings):
    """libthaw's pool in the worker runs on the worker's cores plus the cores vLLM kept on its node for the
    engine core and the client (here the machine's other core); vLLM's own threads keep their binding."""
    from thaw_vllm._internals import _node_cpus

    thaw = bindings["thaw"]
    rank = {core for cores in thaw["thread_cores"] for core in cores}
    cpus = set(thaw["mover"]["cpus"])
    assert cpus == rank | (set(thaw["engine_core_cores"]) & _node_cpus(rank))
    assert f"{min(len(cpus), 16)} threads" in thaw["mover"]["backend"]
    before, after = thaw["threads_before"], thaw["threads_after"]
    assert all(after[tid] == cores for tid, cores in before.items() if tid in after)
    started = [cores for tid, cores in after.items() if tid not in before]
    assert started.count(sorted(cpus)) == min(len(cpus), 16) - 1  # the caller is the pool's first thread


def test_the_worker_waits_asleep_after_thaws_calls(bindings):
    """After one of thaw's calls (describe, capture) the worker waits for vLLM's next message asleep, where
    vLLM's queue reader would spin a core on sched_yield for the rest of a second
    (_internals.worker_waits_asleep_after_this_call). Measured as the worker process's CPU time over 2 idle
    seconds, which a loaded machine does not raise for a sleeping process; a spin would use most of a second."""
    thaw = bindings["thaw"]
    assert thaw["idle_cpu_after_describe"] < 0.3 and thaw["idle_cpu_after_capture"] < 0.3, thaw


def test_a_reservation_already_set_is_kept(vllm, monkeypatch):
    from thaw_vllm import _internals, engine_args

    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    engine_args(dtype="float32")
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU")
    _internals.keep_cpu_reservation({"tensor_parallel_size": 2})
    if platform.machine() == "x86_64":  # one core per local rank, as vLLM keeps back for a plain engine
        assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "2"
