"""weights_changed on MLX (the tests of tests/weights_changed_checks.py): the trainer's step is `model.load_weights`;
captures with weights hold the live weights; a model built in memory is named by its live weights again."""

import mlx.core as mx
import numpy as np
import pytest

import thaw_format
import weights_changed_checks as checks
from thaw_conformance import zoo
from thaw_format.numpy import from_numpy
from thaw_mlx import MLXEngine, model_weights
from weights_changed_checks import *  # noqa: F403  the tests, written once for every engine
from weights_changed_checks import test_a_model_built_in_memory_is_named_by_its_live_weights_again  # noqa: F401
from zoo import make_model

PROMPT = [(7 * i + 3) % 251 for i in range(70)]
EMBED = "model.embed_tokens.weight"


def _flip_embedding(model) -> mx.array:
    """The trainer's step: every row of the embedding moved."""
    new = model.model.embed_tokens.weight[::-1]
    model.load_weights([(EMBED, new)], strict=False)
    mx.eval(model.parameters())
    return new


def _live(engine) -> dict:
    return {name: bytes(t.data) for name, t in model_weights(engine.model).items()}


@pytest.fixture
def updated():
    """An engine of a checkpoint; the digest of the new weights under checkpoint names."""
    from safetensors.numpy import load_file

    directory = zoo.make_model("llama")
    engine = MLXEngine.start(str(directory))

    def step() -> str:
        weights = load_file(str(directory / "model.safetensors"))
        weights[EMBED] = np.array(_flip_embedding(engine.model))
        return thaw_format.weights_digest({name: from_numpy(a) for name, a in weights.items()})

    yield checks.update(engine, PROMPT, step, live=lambda: _live(engine))
    engine.close()


@pytest.fixture
def in_memory():
    engine = MLXEngine(make_model("llama"))
    return checks.InMemory(engine, PROMPT, lambda: _flip_embedding(engine.model),
                           lambda: thaw_format.weights_digest(model_weights(engine.model)))
