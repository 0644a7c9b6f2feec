"""Shared SGLang engines for the thaw_sglang tests: one parent and its four forks, and one plain engine (`llama`).

An SGLang Engine start costs 20-60 s on this machine, so the engines are session fixtures and the parent's
state, its snapshot and its reference continuations are prepared once, in `family`.
"""

import os
from dataclasses import dataclass

import pytest

import engine_guard

# Engines run on CPU; set before SGLang reads it (the edge of the test run).
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

ENGINE_ARGS = dict(
    device="cpu",
    load_format="safetensors",
    skip_tokenizer_init=True,
    attention_backend="torch_native",
    dtype="float32",
    max_total_tokens=4096,
    random_seed=0,
    disable_cuda_graph=True,
)
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}

SHARED = list(range(100, 170))  # 70 tokens both prompts start with: the pages they share
PROMPT_A = SHARED + [7, 8, 9]
PROMPT_B = SHARED + [11, 12]
SUFFIXES = ([21], [22, 23], [24, 25, 26], [27, 28, 29, 30])


@pytest.fixture(scope="session")
def thaw_sglang():
    return engine_guard.require("thaw_sglang", "install it with scripts/setup-sglang.sh")


@pytest.fixture(scope="session")
def zoo():
    return engine_guard.require("thaw_conformance.zoo", "the repository must be installed (pip install -e .)")


@pytest.fixture(scope="session")
def engines(thaw_sglang):
    """Start engines on demand; every engine started (forks included) is shut down at the end."""
    started = []

    def start(model_path, **overrides):
        engine = thaw_sglang.ThawEngine(model_path=str(model_path), **{**ENGINE_ARGS, **overrides})
        started.append(engine)
        return engine

    start.adopt = started.extend
    yield start
    for engine in started:
        engine.shutdown()


@pytest.fixture(scope="session")
def llama(zoo, engines):
    """A plain llama engine, outside the family, shared by test_abort and test_kv_transport in either order: each
    test leaves it idle and unpaused, and checks its leaks with `no_new_leaks`. test_kv_transport refuses it
    remote reads for good (remote.refuse), so a test that needs them (test_partial_restore) starts its own."""
    return engines(zoo.make_model("llama"))


@pytest.fixture
def no_new_leaks(llama):
    """SGLang's own pool-leak check (it runs whenever the scheduler idles) fires on `llama` nowhere in the test:
    its count over the engine's life would blame a test for a leak of any test before it."""
    before = llama.leak_warnings()
    yield
    assert llama.leak_warnings() == before, "SGLang's pool-leak check fired on the llama engine during this test"


def generate(engine, input_ids, params=GREEDY):
    out = engine.generate(input_ids=list(input_ids), sampling_params=dict(params))
    return out["output_ids"], out["meta_info"]["cached_tokens"]


@dataclass
class Family:
    parent: object
    children: list
    snapshot: object  # the parent's state when it forked
    child_snapshot: object  # children[0]'s state right after its restore
    continued_prefix: list  # PROMPT_A and its output: what each continuation starts with
    restored_prefix_len: int  # tokens of continued_prefix the parent's radix tree holds
    references: list  # the parent's greedy continuation after each suffix


@pytest.fixture(scope="session")
def family(thaw_sglang, zoo, engines):
    parent = engines(zoo.make_model("llama"))
    output_a, _ = generate(parent, PROMPT_A)
    generate(parent, PROMPT_B)
    snapshot = thaw_sglang.capture(parent)
    children = parent.fork(n=4)
    engines.adopt(children)
    child_snapshot = thaw_sglang.capture(children[0])
    continued = PROMPT_A + output_a
    # The last output token was sampled but never fed back, so the tree holds every token before it.
    references = [generate(parent, continued + suffix)[0] for suffix in SUFFIXES]
    return Family(parent, children, snapshot, child_snapshot, continued, len(continued) - 1, references)
