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
