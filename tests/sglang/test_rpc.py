"""thaw_sglang.rpc across processes of one family (the engine and its scheduler share one resource tracker).

The scheduler used to attach the caller's result block through SharedMemory and drop it from the shared
tracker, so the caller's own unlink unregistered it a second time: a KeyError traceback from the tracker on
every call. The scenario runs in a fresh interpreter whose stderr, the tracker's too, must stay clean.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

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
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
    for complaint in ("KeyError", "resource_tracker", "leaked"):
        assert complaint not in out.stderr, out.stderr
