"""weights_changed on transformers (the tests of tests/weights_changed_checks.py): the trainer's step is
`load_state_dict`; captures with weights hold the live parameters; a model built in memory is named by its live
parameters again."""

import pytest
import torch
from conftest import PROMPT, model_dir

import thaw_format
import weights_changed_checks as checks
from thaw_format.torch import from_torch
from thaw_transformers import TransformersEngine
from thaw_transformers.identity import model_weights
from weights_changed_checks import *  # noqa: F403  the tests, written once for every engine
from weights_changed_checks import test_a_model_built_in_memory_is_named_by_its_live_weights_again  # noqa: F401

EMBED = "model.embed_tokens.weight"


def _flip_embedding(model) -> torch.Tensor:
    """The trainer's step: every row of the embedding moved, loaded into the running model."""
    new = model.get_input_embeddings().weight.detach().flip(0).clone()
    model.load_state_dict({EMBED: new}, strict=False)
    return new


@pytest.fixture
def updated(fresh_engine):
    """An engine of its own model; the digest of the new weights under checkpoint names."""
    from safetensors.torch import load_file

    engine = fresh_engine()

    def step() -> str:
        weights = load_file(str(model_dir("llama") / "model.safetensors"))
        weights[EMBED] = _flip_embedding(engine.model)
        return thaw_format.weights_digest({name: from_torch(t) for name, t in weights.items()})

    live = lambda: {name: bytes(t.data) for name, t in model_weights(engine.model).items()}  # noqa: E731
    return checks.update(engine, PROMPT, step, live)


@pytest.fixture
def in_memory(fresh_engine):
    engine = TransformersEngine(fresh_engine().model)  # no checkpoint: its identity names its own parameters
    return checks.InMemory(engine, PROMPT, lambda: _flip_embedding(engine.model),
                           lambda: thaw_format.weights_digest(model_weights(engine.model)))


def test_an_in_process_child_knows_its_parents_weights_are_unnamed(updated):
    engine = updated.engine
    engine.weights_changed()
    [child] = engine.fork(1, context=PROMPT[:64])
    with pytest.raises(thaw_format.UnknownWeightsError, match="could not name them"):
        child.capture(include_weights=False)


def test_in_process_children_share_the_change_and_must_be_idle_for_it(updated):
    """They share the model: a change through any of them renames every one and drops every one's old KV."""
    engine = updated.engine
    child, other = engine.fork(2, context=PROMPT[:64])
    rid = other.submit(PROMPT, checks.PARAMS)
    with pytest.raises(RuntimeError, match="needs an idle engine"):
        child.weights_changed(updated.digest)
    assert other.abort(rid) and engine.model_info().weights_digest == updated.old.model.weights_digest
    child.weights_changed(updated.digest)
    for each in (engine, child, other):
        assert each.model_info().weights_digest == updated.digest
        assert each.generate(PROMPT, checks.PARAMS).cached_tokens == 0  # the old weights' KV gone everywhere
