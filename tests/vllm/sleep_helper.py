"""New-process side of tests/vllm/test_sleep.py: start a VLLMEngine, run tests/sleep_checks.py's two requests
part way and sleep it to a file. argv[1] is JSON: model, engine_kwargs, path. Prints "THAW_RESULT <json>":
the requests' references and whether the engine was closed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: sleep_checks

from sleep_checks import sleep_midway  # noqa: E402


def main() -> None:
    config = json.loads(sys.argv[1])
    from thaw_vllm import VLLMEngine

    engine = VLLMEngine.start(config["model"], **config["engine_kwargs"])
    want = sleep_midway(engine, config["path"])
    print("THAW_RESULT " + json.dumps({"want": want, "closed": engine.llm is None}), flush=True)


if __name__ == "__main__":
    main()
