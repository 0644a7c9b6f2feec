"""ChatThaw's tests, once per engine (tests/langgraph/engines.py), each a real engine over a tiny zoo model with a
tokenizer trained here (thaw_conformance.chat_tokenizer). vLLM runs in its default multiprocessing mode.

    pytest tests/langgraph --engine mlx --engine transformers     # the engines this environment has

Without --engine every engine is tried. An engine named (or tried) that cannot be imported skips its tests with
the reason, and fails them under THAW_REQUIRE_ENGINES=1 (CI): scripts/test.sh names in each environment the
engines installed there, so none of them can turn into silent skips.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine_guard
import engines as engine_kinds

HERE = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption("--engine", action="append", dest="engines", choices=engine_kinds.ENGINES,
                     help="run the ChatThaw tests on this engine (repeatable; default: every engine)")


def pytest_generate_tests(metafunc):
    if "kind" in metafunc.fixturenames:
        names = metafunc.config.getoption("engines", default=None) or list(engine_kinds.ENGINES)
        metafunc.parametrize("kind", list(dict.fromkeys(names)), indirect=True, scope="session")


@pytest.fixture(scope="session")
def model_dir():
    engine_guard.require("langgraph", "install the [langgraph] extra (the setup scripts do)")
    zoo = engine_guard.require("thaw_conformance.zoo", "the repository must be installed (pip install -e .)")
    from thaw_conformance.chat_tokenizer import add_chat_tokenizer

    # Its own root: the tokenizer files are not part of the zoo's recipe.
    model = zoo.make_model("llama", root=zoo.default_root().parent / "zoo-chat")
    return add_chat_tokenizer(model, vocab_size=zoo.model_config("llama")[1]["vocab_size"])


@pytest.fixture(scope="session")
def kind(request) -> engine_kinds.Kind:
    module, setup = engine_kinds.MODULES[request.param]
    engine_guard.require(module, f"install it with {setup}")
    return engine_kinds.KINDS[request.param]


@pytest.fixture(scope="session")
def engine(kind, model_dir):
    """The session's engine of this kind: the adapter's contract engine."""
    engine = engine_kinds.start(kind.name, model_dir)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def chat(engine, model_dir):
    from thaw_langgraph import ChatThaw

    return ChatThaw(engine=engine, tokenizer=model_dir, max_tokens=16)


@pytest.fixture(scope="session")
def plain(kind, model_dir, engine):
    """generate(prompt ids, max_tokens) -> output ids: the same model without thaw and without a prefix cache,
    one prompt at a time (vLLM and SGLang: an engine of their own, caching off; MLX: mlx-lm's generate_step;
    transformers: its generate)."""
    generate, close = engine_kinds.plain(kind.name, model_dir, engine)
    yield generate
    close()


@pytest.fixture
def evict(kind, engine):
    """Empty the engine's prefix cache, on its engine loop's thread once it is idle, as heavy traffic would."""
    from thaw_langgraph.engine_loop import loop_for

    return lambda: loop_for(engine).call(lambda e: engine_kinds.evict(kind.name, e), idle=True)


def run_script(script: str, *args: str, timeout: int = 600) -> str:
    """Run tests/langgraph/<script> in a new process with this interpreter; returns its stdout."""
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ))
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout
