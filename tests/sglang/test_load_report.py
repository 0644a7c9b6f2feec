"""SGLang's scheduler makes a load-report file, /dev/shm/sglang_loads_<instance id>_<digest>.shm, and never unlinks
it. thaw's scheduler unlinks its name as soon as SGLang has made it (the scheduler writes it through the descriptor
it holds, and the kernel frees it with the last process holding it). Before, shutdown alone unlinked it: it stayed
for good when the client process was SIGKILLed, or when the engine failed to start after its scheduler had made
it. Each case runs a client process of its own (load_report_client.py), one at a time; run this file on its own,
as it starts no engine in this process."""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time

from conftest import ENGINE_ARGS

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load_report_client.py")
START = 600  # seconds for an engine to start (or fail) on a loaded machine
GONE = 60  # seconds for a killed client's engine processes to end


def _files_of(instance: str) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith("sglang_loads_") and instance in name)


def _client(model_path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, CLIENT, str(model_path), json.dumps(ENGINE_ARGS)],
                            stdout=subprocess.PIPE, text=True)


def _said(client: subprocess.Popen) -> dict:
    """The client's next line ({} if it ended first)."""
    ready, _, _ = select.select([client.stdout], [], [], START)
    if not ready:
        client.kill()
        client.wait()
        raise AssertionError(f"the client said nothing in {START} s")
    line = client.stdout.readline()
    return json.loads(line) if line else {}


def _unlinked(client: subprocess.Popen, instance: str) -> str:
    """The load-report file the engine's scheduler said it unlinked: one SGLang made, for this instance (a file
    SGLang no longer makes, or renamed, fails here rather than leaving the checks after vacuous)."""
    path = _said(client).get("unlinked")
    assert path and instance in os.path.basename(path), f"the scheduler unlinked no load-report file: {path!r}"
    return path


def _running(pid: int) -> bool:
    """Whether the process exists and is no zombie (PID 1 here reaps no orphan: a dead one stays a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # the state follows the command name, which may hold ")"


def _wait_gone(pids: list[int]) -> None:
    """Until none of these processes (the killed client's, not this process's children) runs any more."""
    deadline = time.monotonic() + GONE
    for pid in pids:
        while _running(pid):
            assert time.monotonic() < deadline, f"process {pid} still runs {GONE} s after its client was killed"
            time.sleep(0.2)


def test_a_client_killed_leaves_no_load_report_file(thaw_sglang, zoo):
    client = _client(zoo.make_model("llama"))
    try:
        instance = _said(client)["instance"]
        unlinked = _unlinked(client, instance)
        served = _said(client)
        assert "children" in served, served
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait()
        client.stdout.close()
    _wait_gone(served["children"])
    assert _files_of(instance) == [] and not os.path.exists(unlinked), \
        "the SIGKILLed client's engine left its load-report file in /dev/shm"


def test_an_engine_that_fails_after_its_scheduler_started_leaves_no_load_report_file(thaw_sglang, zoo, tmp_path):
    """A model folder with a config and no weights: the scheduler starts, makes its file, and fails loading its
    weights; SGLang then ends the client process itself (SIGKILL)."""
    shutil.copy(os.path.join(zoo.make_model("llama"), "config.json"), tmp_path / "config.json")
    client = _client(tmp_path)
    try:
        instance = _said(client)["instance"]
        unlinked = _unlinked(client, instance)
        assert "children" not in _said(client), "an engine without weights started"
    finally:
        client.kill()
        client.wait(timeout=GONE)
        client.stdout.close()
    assert _files_of(instance) == [] and not os.path.exists(unlinked), \
        "the engine that failed to start left its load-report file in /dev/shm"
