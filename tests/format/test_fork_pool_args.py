"""ForkPool's arguments are refused by name before any worker starts; a start that fails part way stops the
workers it started. No engine is needed: the spec's factory does not exist, so a worker that did start would
fail the pool with a RuntimeError naming it, not with the errors asserted here."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from thaw_format.sdk import ForkPool, LaunchSpec
from thaw_format.sdk.pool import _Worker

NO_ENGINE = LaunchSpec("thaw_format:no_such_factory", {})


class NotAnEngine:
    def launch_spec(self):
        return {"factory": "thaw_format:no_such_factory"}


@pytest.mark.parametrize("spec", ["x", None, 5, {"factory": "m:f", "kwargs": {}}])
def test_a_spec_that_is_neither_an_engine_nor_a_launch_spec_is_refused_by_name(spec):
    """ForkPool("x", 2) raised AttributeError: 'str' object has no attribute 'launch_spec'."""
    with pytest.raises(TypeError, match=rf"ForkPool takes a contract engine .* or a LaunchSpec, not "
                                        rf"{type(spec).__name__} "):
        ForkPool(spec, 2)


def test_an_engine_whose_launch_spec_is_not_one_is_refused():
    with pytest.raises(TypeError, match="the engine's launch_spec\\(\\) returned dict, not a LaunchSpec"):
        ForkPool(NotAnEngine(), 1)


@pytest.mark.parametrize("workers", [1.5, 2.0, "2", True, None])
def test_workers_that_are_not_a_whole_number_are_refused(workers):
    """A float raised TypeError from range() deep inside; True started one worker."""
    with pytest.raises(TypeError, match=f"workers is a whole number of engines, not {type(workers).__name__}"):
        ForkPool(NO_ENGINE, workers)


def test_an_integer_of_another_type_is_taken_as_a_count_of_workers():
    """numpy.int64(2) (e.g. from a config read with numpy) was refused: 'not int64'. The env check, after the
    workers', refuses the pool, so none starts."""
    with pytest.raises(TypeError, match="a fork pool's env maps names to strings"):
        ForkPool(NO_ENGINE, np.int64(2), env="A=1")
    with pytest.raises(ValueError, match="needs workers >= 1, got 0$"):
        ForkPool(NO_ENGINE, np.int64(0))
    with pytest.raises(TypeError, match="workers is a whole number of engines, not bool"):  # no __index__
        ForkPool(NO_ENGINE, np.bool_(True))


@pytest.mark.parametrize("workers", [0, -1])
def test_fewer_than_one_worker_is_refused(workers):
    with pytest.raises(ValueError, match=f"needs workers >= 1, got {workers}"):
        ForkPool(NO_ENGINE, workers)


def test_more_workers_than_the_open_file_limit_allows_is_refused_before_any_starts():
    """10**9 workers started processes until the OS refused one (each worker's two pipes use open files). Run
    in a process of its own with a low limit, so that a pool without the check starts only a few."""
    out = _under_open_file_limit(40, "ForkPool(LaunchSpec('thaw_format:no_such_factory', {}), 10**9)")
    assert "ValueError: a fork pool of 1000000000 workers needs 2000000000 open files for their pipes; this " \
           "process may open 40 (ulimit -n)" in out, out
    assert out.endswith("no workers left\n"), out


@pytest.mark.parametrize("env", ["A=1", {"A": 1}, {1: "a"}])
def test_an_env_that_is_not_names_to_strings_is_refused(env):
    with pytest.raises(TypeError, match="a fork pool's env maps names to strings"):
        ForkPool(NO_ENGINE, 1, env=env)


def test_a_start_refused_part_way_stops_the_workers_already_started():
    """The workers were started in one list expression: when the OS refused the k-th process, the k-1 started
    were never stopped (the cleanup covered only their start-up). With the limit below, limit // 2 workers pass
    the pool's check, the first starts (six descriptors: three pipes) and a later one is refused."""
    out = _under_open_file_limit(20, "ForkPool(LaunchSpec('thaw_format:no_such_factory', {}), 10)")
    assert "OSError: [Errno 24] Too many open files" in out and out.endswith("no workers left\n"), out


def _under_open_file_limit(limit: int, statement: str) -> str:
    """Run `statement` in a new process whose open-file limit is `limit`; its error and whether any child
    process was left behind."""
    script = textwrap.dedent(f"""
        import os, resource
        from thaw_format.sdk import ForkPool, LaunchSpec

        resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        try:
            {statement}
        except Exception as exc:
            print(f"{{type(exc).__name__}}: {{exc}}")
        try:
            os.waitpid(-1, os.WNOHANG)
            print("workers left")
        except ChildProcessError:
            print("no workers left")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_a_worker_whose_send_failed_is_killed_quietly():
    """kill() closed stdin unguarded: after a failed send, the close flushed the bytes still buffered and raised
    BrokenPipeError, which stopped the Ctrl-C handler's loop part way (later workers kept generating, and the
    caller saw BrokenPipeError instead of its KeyboardInterrupt). This worker's engine does not exist: it exits."""
    worker = _Worker("0", {"factory": NO_ENGINE.factory, "kwargs": {}}, dict(os.environ))
    assert "no_such_factory" in worker.receive()["error"]
    worker.process.wait(60)
    assert worker.send({"prompt": [1] * 1000}) is False
    worker.kill()
    assert worker.process.stdin.closed and worker.process.stdout.closed
