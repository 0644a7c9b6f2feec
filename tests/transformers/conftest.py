import functools

import pytest

import engine_guard

engine_guard.require("transformers", "install the core environment: scripts/setup-core.sh")
engine_guard.require("thaw_transformers", "the repository must be on the path (pip install -e .)")

import thaw_format  # noqa: E402
from thaw_conformance import zoo  # noqa: E402
from thaw_conformance.models import checkpoint  # noqa: E402
from thaw_transformers import TransformersEngine  # noqa: E402

# The conformance workload's prompt: 70 tokens, two full pages of 32 and a partial one.
PROMPT = [(7 * i + 3) % 200 + 3 for i in range(70)]
# A gemma2 whose window (8 tokens) the prompt passes many times over, so sliding layers drop tokens.
SMALL_WINDOW = {"sliding_window": 8, "tie_word_embeddings": True}


@functools.cache
def model_dir(arch: str, small_window: bool = False):
    return zoo.make_model(arch, **SMALL_WINDOW) if small_window else checkpoint(arch)


@functools.cache
def _loaded(arch: str, small_window: bool):
    """The model and its identity, loaded and digested once per session and architecture."""
    engine = TransformersEngine.start(str(model_dir(arch, small_window)))
    return engine.model, engine.info


def shared_engine(arch: str = "llama", small_window: bool = False) -> TransformersEngine:
    model, info = _loaded(arch, small_window)
    return TransformersEngine(model, checkpoint=model_dir(arch, small_window), info=info)


@pytest.fixture
def engine():
    """A fresh engine (its own prefix cache) over a model shared by the session's engines of that architecture;
    tests that load weights use fresh_engine instead."""
    return shared_engine


@pytest.fixture
def fresh_engine():
    return lambda arch="llama", small_window=False: TransformersEngine.start(str(model_dir(arch, small_window)))


@pytest.fixture
def saved(tmp_path):
    def save(snapshot, name="snapshot.thaw"):
        path = tmp_path / name
        thaw_format.save(snapshot, path)
        return path
    return save


def page_bytes(snapshot) -> dict:
    """Every page's bytes per layer and role, keyed by the page's token ids from its root."""
    from thaw_conformance.compare import pages_by_prefix
    return {prefix: [(role, bytes(t.data)) for role, t in parts] for prefix, parts in pages_by_prefix(snapshot).items()}
