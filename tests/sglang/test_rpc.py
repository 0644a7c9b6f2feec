"""thaw_sglang.rpc across processes of one family (the engine and its scheduler share one resource tracker).

The scheduler used to attach the caller's result block through SharedMemory and drop it from the shared
tracker, so the caller's own unlink unregistered it a second time: a KeyError traceback from the tracker on
every call. The scenario runs in a fresh interpreter whose stderr, the tracker's too, must stay clean.
"""

from __future__ import annotations

import textwrap

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
