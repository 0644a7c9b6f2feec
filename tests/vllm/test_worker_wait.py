"""While thaw's engine-core operation waits for the worker's reply, the engine core sleeps on vLLM's own
notification instead of spinning on the core the worker's KV mover shares (_internals.worker_awaited_asleep);
vLLM's spin comes back after the call, however it ends. Real vLLM reader queues' wait objects, no engine."""

from types import SimpleNamespace

import pytest


@pytest.fixture
def reader_conditions(vllm, tmp_path):
    import zmq
    from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

    context = zmq.Context()
    conditions = [SpinCondition(is_reader=True, context=context, notify_address=f"ipc://{tmp_path}/notify-{i}")
                  for i in range(2)]
    yield conditions
    for condition in conditions:
        for socket in (condition.local_notify_socket, condition.read_cancel_socket, condition.write_cancel_socket):
            socket.close(linger=0)
    context.term()


def core_with(conditions):
    return SimpleNamespace(model_executor=SimpleNamespace(
        response_mqs=[SimpleNamespace(_spin_condition=c) for c in conditions]))


def test_the_engine_core_waits_asleep_during_a_call_and_spins_again_after(reader_conditions):
    from thaw_vllm._internals import worker_awaited_asleep

    spins = [c.busy_loop_s for c in reader_conditions]
    assert all(spin > 0 for spin in spins)  # vLLM's default: spin after each message
    with worker_awaited_asleep(core_with(reader_conditions)):
        assert [c.busy_loop_s for c in reader_conditions] == [0, 0]
    assert [c.busy_loop_s for c in reader_conditions] == spins
    with pytest.raises(KeyError):
        with worker_awaited_asleep(core_with(reader_conditions)):
            raise KeyError("the worker's call failed")
    assert [c.busy_loop_s for c in reader_conditions] == spins


def test_an_in_process_executor_has_no_queue_to_wait_on(vllm):
    from thaw_vllm._internals import worker_awaited_asleep

    with worker_awaited_asleep(SimpleNamespace(model_executor=SimpleNamespace())):
        pass


def test_an_unknown_wait_is_refused_before_anything_changes(reader_conditions):
    from thaw_vllm._internals import worker_awaited_asleep

    spins = [c.busy_loop_s for c in reader_conditions]
    with pytest.raises(RuntimeError, match="not the reader side of the SpinCondition"):
        with worker_awaited_asleep(core_with(reader_conditions + [object()])):
            pass
    assert [c.busy_loop_s for c in reader_conditions] == spins


def test_the_queues_of_workers_on_other_nodes_are_left_alone(reader_conditions):
    """A remote worker's reply queue has no spin condition (its reader waits on zmq): nothing to put to sleep."""
    from thaw_vllm._internals import worker_awaited_asleep

    with worker_awaited_asleep(core_with(reader_conditions + [None])):
        assert [c.busy_loop_s for c in reader_conditions] == [0, 0]
