"""New-process side of tests/vllm/test_weights_changed.py: tests/weights_changed_checks.py on a VLLMEngine in vLLM's
multiprocessing mode (its default: the worker in a process of its own, as an RL framework runs it). argv[1] is
JSON: model, engine_kwargs. The trainer's step sends a function through LLM.collective_rpc, which vLLM pickles only
under VLLM_ALLOW_INSECURE_SERIALIZATION=1 (the test's stand-in for a trainer's worker extension method). Prints
"THAW_RESULT <json>": the checks that passed."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: weights_changed_checks

import weights_changed_checks as checks  # noqa: E402

EMBED = "model.embed_tokens.weight"
CHECKS = ("test_a_named_update_refuses_the_old_snapshot_and_serves_the_new_weights",
          "test_a_capture_with_weights_holds_the_live_weights_or_is_refused",
          "test_an_unnamed_update_refuses_named_snapshots_and_captures",
          "test_a_request_in_flight_or_a_malformed_digest_changes_nothing")


def main() -> None:
    config = json.loads(sys.argv[1])
    import thaw_format
    from safetensors.torch import load_file
    from thaw_format.torch import from_torch
    from thaw_vllm import VLLMEngine

    engine = VLLMEngine.start(config["model"], **config["engine_kwargs"])

    def step() -> str:
        weights = load_file(str(Path(config["model"]) / "model.safetensors"))
        weights[EMBED] = weights[EMBED].flip(0).contiguous()
        new = weights[EMBED]  # in the function's closure: vLLM sends a tensor among args as a list
        engine.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights([(EMBED, new)]))
        return thaw_format.weights_digest({name: from_torch(t) for name, t in weights.items()})

    updated = checks.update(engine, config["prompt"], step, live=None)
    passed = []
    for name in CHECKS:
        getattr(checks, name)(updated)
        passed.append(name)
    engine.close()
    print("THAW_RESULT " + json.dumps({"passed": passed}), flush=True)


if __name__ == "__main__":
    main()
