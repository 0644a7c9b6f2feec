"""thaw_sglang.rpc across processes of one family (the engine and its scheduler share one resource tracker).

The scheduler used to attach the caller's result block through SharedMemory and drop it from the shared
tracker, so the caller's own unlink unregistered it a second time: a KeyError traceback from the tracker on
every call. The scenario runs in a fresh interpreter whose stderr, the tracker's too, must stay clean.
"""

from __future__ import annotations

import textwrap

from conftest import ENGINE_ARGS
from tracker_scenario import assert_runs_without_tracker_complaints

SCENARIO = textwrap.dedent("""
    import multiprocessing
    from thaw_sglang import rpc

    def echo(result, params):  # a scheduler method, run in the scheduler's process
        rpc.report(result, lambda: params)

    class Hop:  # the engine's collective_rpc hop into a child process, without the engine
        def collective_rpc(self, method, result, **params):
            child = multiprocessing.get_context("fork").Process(target=echo, args=(result, params))
            child.start(); child.join()

    if __name__ == "__main__":
        engine = Hop()
        for i in range(3):
            assert rpc.call(engine, "thaw_echo", n=i) == {"n": i}
        print("done")
""")


def test_a_call_leaves_the_callers_tracker_balanced(tmp_path):
    assert_runs_without_tracker_complaints(SCENARIO, tmp_path)


SHUTDOWN = textwrap.dedent("""
    import os

    if __name__ == "__main__":
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        from thaw_conformance import zoo
        from thaw_format.sdk import greedy
        from thaw_sglang import SGLangEngine

        engine = SGLangEngine.start(model_path=str(zoo.make_model("llama")), **{engine_args!r})
        trunk = list(range(100, 170))
        engine.generate(trunk, greedy(4))
        held = engine.capture(include_weights=False)  # a segment the scheduler lends, still held here
        source = engine.capture_shared(chains=[trunk[:64]])  # the scheduler's reused segment
        engine.restore_source(source)
        engine.close()
        del held
        print("done")
""")


def test_a_shut_down_engine_leaves_no_segment_to_the_tracker(tmp_path):
    """The scheduler's segments (its lent captures, its reused one) are registered with the resource tracker the
    engine's process shares with it, and SGLang ends the scheduler with SIGKILL: the segments used to be left
    to the tracker, which unlinked them at the process's exit with a "leaked shared_memory objects" warning.
    The scheduler now unlinks them when the engine shuts down. (SGLang's own semaphore, which its scheduler
    leaves the same way, is SGLang's.)"""
    script = SHUTDOWN.format(engine_args=ENGINE_ARGS)
    assert_runs_without_tracker_complaints(script, tmp_path, complaints=("KeyError", "died unexpectedly",
                                                                          "leaked shared_memory", "Traceback"))
