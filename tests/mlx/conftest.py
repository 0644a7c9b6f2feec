import functools

import pytest

import engine_guard

engine_guard.require("mlx_lm", "install the core environment: scripts/setup-core.sh")

import thaw_format  # noqa: E402
from sessions import CASES, start  # noqa: E402


@pytest.fixture(scope="session")
def model_of():
    """One model per case name, shared by every test of the session (models are deterministic and read-only)."""
    return functools.cache(lambda name: CASES[name].model())


@pytest.fixture
def session(model_of):
    """A fresh session for a case name: (model, cache, tokens)."""
    return lambda name: start(CASES[name], model_of(name))


@pytest.fixture
def saved(tmp_path):
    """Save a snapshot under tmp_path and return the path."""
    def save(snapshot, name="session.thaw"):
        path = tmp_path / name
        thaw_format.save(snapshot, path)
        return str(path)
    return save
