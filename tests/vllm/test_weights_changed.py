"""weights_changed on vLLM (the tests of tests/weights_changed_checks.py): the trainer's step loads new weights
through LLM.collective_rpc, as an RL framework's worker extension does. A capture with weights is refused: on CPU
vLLM repacks its linear weights, so thaw can read back only the checkpoint's."""

import pytest

import weights_changed_checks as checks
from conftest import ENGINE_KWARGS, make_engine, run_helper, trunk_tokens
from weights_changed_checks import *  # noqa: F403  the tests, written once for every engine
from weights_changed_helper import trainer_step

PROMPT = trunk_tokens(70, seed=3) + trunk_tokens(4, seed=4)


@pytest.fixture(scope="module")
def updated(vllm, zoo):
    """An engine of its own (max_num_seqs sets it apart from the shared ones, whose weights must stay)."""
    import thaw_vllm

    directory = zoo.make_model("llama", dtype="float32")
    engine = thaw_vllm.VLLMEngine(make_engine(zoo, "llama", "float32", max_num_seqs=7))
    return checks.update(engine, PROMPT, trainer_step(engine, directory), live=None)


def test_the_checks_hold_in_vllms_multiprocessing_mode(vllm, zoo):
    """The same checks where the worker runs in a process of its own (vLLM's default): every rank's identity
    changes there, and the client's copies of it are forgotten."""
    config = {"model": str(zoo.make_model("llama", dtype="float32")), "prompt": PROMPT,
              "engine_kwargs": {"dtype": "float32", **ENGINE_KWARGS},
              "env": {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}}  # the trainer's step is a function sent to the worker
    assert run_helper("weights_changed_helper.py", config)["passed"] == [check.__name__ for check in checks.CHECKS]
