"""A client process for test_load_report.py. It starts a ThawEngine on the model folder given and prints JSON
lines: {"instance": id} as soon as SGLang has named the engine's instance (before any engine process starts), then
{"unlinked": path or null} from the scheduler process once it has unlinked its load-report file, then
{"children": [pids]} once the engine has served a request (and waits to be killed), or {"failed": message} if the
start raised. A scheduler that fails while starting has SGLang end this process (SIGQUIT, then SIGKILL from
SGLang's own handler) before a word more."""

import json
import os
import sys
import time

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
from thaw_sglang import _internals  # noqa: E402


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


_unlink_load_report = _internals.unlink_load_report


def _unlink_and_say(scheduler):
    """In the scheduler process (SGLang spawns it, which runs this file's top level there too): says what the
    scheduler unlinked, on the stdout it shares with this client."""
    unlinked = _unlink_load_report(scheduler)
    say(unlinked=unlinked)
    return unlinked


_internals.unlink_load_report = _unlink_and_say


def main(model_path: str, engine_args: dict) -> None:
    from sglang.srt.server_args import PortArgs

    import thaw_sglang

    made = PortArgs.init_new

    def init_new(*args, **kwargs):
        port_args = made(*args, **kwargs)
        say(instance=port_args.instance_id)
        return port_args

    PortArgs.init_new = staticmethod(init_new)
    try:
        engine = thaw_sglang.ThawEngine(model_path=model_path, **engine_args)
    except Exception as exc:  # reported to the test, which expects a broken model to fail
        say(failed=f"{type(exc).__name__}: {exc}")
        # At once: Python's exit would wait for SGLang's detokenizer process (not a daemon), which a failed start
        # leaves running; it ends with this process (SGLang's parent-death signal).
        os._exit(0)
    engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})
    say(children=engine.get_all_child_pids())
    time.sleep(3600)  # until the test kills this process


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
