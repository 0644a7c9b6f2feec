"""New-process side of tests/vllm/test_weights_changed.py: tests/weights_changed_checks.py on a VLLMEngine in vLLM's
multiprocessing mode (its default: the worker in a process of its own, as an RL framework runs it). argv[1] is
JSON: model, engine_kwargs. The trainer's step (`trainer_step`, the in-process tests' too) sends a function through
LLM.collective_rpc, which vLLM pickles only under VLLM_ALLOW_INSECURE_SERIALIZATION=1 (the test's stand-in for a
trainer's worker extension method). Prints "THAW_RESULT <json>": the checks that passed."""

import json
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: weights_changed_checks

import weights_changed_checks as checks  # noqa: E402

EMBED = "model.embed_tokens.weight"


def trainer_step(engine, directory) -> Callable[[], str]:
    """The trainer's step on a VLLMEngine of the checkpoint in `directory`: every row of the embedding moved, loaded
    through collective_rpc; it returns the new weights' digest (under checkpoint names)."""
    def step() -> str:
        import thaw_format
        from safetensors.torch import load_file
        from thaw_format.torch import from_torch

        weights = load_file(str(Path(directory) / "model.safetensors"))
        weights[EMBED] = weights[EMBED].flip(0).contiguous()
        new = weights[EMBED]  # in the function's closure: vLLM sends a tensor among args as a list
        engine.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights([(EMBED, new)]))
        return thaw_format.weights_digest({name: from_torch(t) for name, t in weights.items()})

    return step


def main() -> None:
    config = json.loads(sys.argv[1])
    from thaw_vllm import VLLMEngine

    engine = VLLMEngine.start(config["model"], **config["engine_kwargs"])
    updated = checks.update(engine, config["prompt"], trainer_step(engine, config["model"]), live=None)
    passed = []
    for check in checks.CHECKS:
        check(updated)
        passed.append(check.__name__)
    engine.close()
    print("THAW_RESULT " + json.dumps({"passed": passed}), flush=True)


if __name__ == "__main__":
    main()
