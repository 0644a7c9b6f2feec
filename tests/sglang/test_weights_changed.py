"""weights_changed on SGLang (the tests of tests/weights_changed_checks.py): the trainer's step is SGLang's
update_weights_from_tensor (between begin_weight_update and end_weight_update); captures with weights hold the live
parameters."""

import pytest

import weights_changed_checks as checks
from conftest import SHARED
from weights_changed_checks import *  # noqa: F403  the tests, written once for every engine

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def updated(thaw_sglang, zoo, module_engines):
    """An engine of its own; the digest of the new weights under checkpoint names."""
    import thaw_format
    from safetensors.torch import load_file
    from thaw_format.torch import from_torch

    directory = zoo.make_model("llama")
    engine = thaw_sglang.SGLangEngine(module_engines(directory))

    weights = load_file(str(directory / "model.safetensors"))

    def step() -> str:
        weights[EMBED] = weights[EMBED].flip(0).contiguous()
        engine.engine.begin_weight_update()
        ok, message = engine.engine.update_weights_from_tensor([(EMBED, weights[EMBED])], flush_cache=False)
        engine.engine.end_weight_update()
        assert ok, message
        return thaw_format.weights_digest({name: from_torch(t) for name, t in weights.items()})

    def live() -> dict:  # the tensor the step changed, and one SGLang keeps under its checkpoint name unfused
        return {name: weights[name].numpy().tobytes() for name in (EMBED, "model.norm.weight")}

    return checks.update(engine, SHARED + [7, 8, 9], step, live)
