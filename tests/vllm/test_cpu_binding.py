"""thaw's KV connector must not change how vLLM's CPU backend binds the worker: a KV connector makes vLLM keep
one more core back for the engine core, and on a machine with that few cores vLLM then keeps none back and
binds the worker's OpenMP threads to every core (see thaw_vllm._internals.keep_cpu_reservation)."""

import os
import platform

from conftest import ENGINE_KWARGS, run_helper, trunk_tokens


def test_thaw_engine_worker_is_bound_like_a_plain_engines(vllm, zoo):
    config = {"model": str(zoo.make_model("llama")), "prompt": trunk_tokens(40, seed=7),
              "engine_kwargs": dict(ENGINE_KWARGS, dtype="float32", enable_prefix_caching=True)}
    got = run_helper("binding_helper.py", config, timeout=600)
    assert got["thaw"]["thread_cores"] == got["plain"]["thread_cores"]
    assert got["thaw"]["omp_threads"] == got["plain"]["omp_threads"]
    assert got["thaw"]["token_ids"] == got["plain"]["token_ids"]


def test_a_reservation_already_set_is_kept(vllm, monkeypatch):
    from thaw_vllm import _internals, engine_args

    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    engine_args(dtype="float32")
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU")
    _internals.keep_cpu_reservation({"tensor_parallel_size": 2})
    if platform.machine() == "x86_64":  # one core per local rank, as vLLM keeps back for a plain engine
        assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "2"
