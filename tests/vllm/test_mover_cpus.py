"""Where libthaw's threads move KV in a vLLM worker: the worker's own cores plus those vLLM kept beside it for
the engine core and the client (idle while thaw moves KV), unless THAW_VLLM_MOVER_CPUS=rank confines them."""

import pytest


def test_the_mover_adds_the_kept_cores_unless_confined(vllm):
    from thaw_vllm.worker import mover_cpus

    assert mover_cpus({0}, {1}, None) == {0, 1}
    assert mover_cpus({0}, {1}, "node") == {0, 1}
    assert mover_cpus({0, 2}, {1, 3}, "rank") == {0, 2}
    assert mover_cpus({0}, set(), None) == {0}
    with pytest.raises(ValueError, match="THAW_VLLM_MOVER_CPUS='all'"):
        mover_cpus({0}, {1}, "all")


def test_kernel_cpu_lists_are_read_as_the_kernel_writes_them(vllm):
    from thaw_vllm._internals import _cpu_list

    assert _cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert _cpu_list("5") == {5}
    assert _cpu_list("\n") == set()


def test_no_cores_are_borrowed_where_vllm_did_not_choose_the_binding(vllm, monkeypatch):
    """A user's VLLM_CPU_OMP_THREADS_BIND placed the threads; the rest of the node may be another service's."""
    from types import SimpleNamespace

    from thaw_vllm._internals import cpus_kept_beside

    config = SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend="mp", local_world_size=1))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    assert cpus_kept_beside(config, {0}) == set()
    in_process = SimpleNamespace(parallel_config=SimpleNamespace(distributed_executor_backend="uni",
                                                                 local_world_size=1))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    assert cpus_kept_beside(in_process, {0}) == set()


def test_smt_siblings_of_the_workers_cores_are_its_own(vllm):
    from thaw_vllm._internals import _with_siblings

    assert {0} <= _with_siblings({0})  # plus cpu0's hyperthreads where the machine has them
