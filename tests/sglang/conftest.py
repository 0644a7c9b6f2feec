"""Shared SGLang engines for the thaw_sglang tests: one parent and its four forks (`family`), and one plain engine
(`llama`), each shared by the modules that use it.

An SGLang Engine start costs 20-60 s on this machine, so these two are started once per session; but each idle
engine still polls at a few percent of a CPU, which slowed every later test on 2 cores while ten of them stayed
alive to the session's end. So each shared engine is shut down after the last module that uses it (the modules
that share one run next to each other), and an engine a test or module starts for itself (`engines`,
`module_engines`) is shut down when that test or module ends.
"""

import os
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

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


class Engines:
    """Engines started on demand (`start(model_path, **overrides)`) and forks handed over (`start.adopt`); `close`
    shuts every one of them down."""

    def __init__(self, thaw_sglang):
        self._thaw_sglang = thaw_sglang
        self._started = []

    def __call__(self, model_path, **overrides):
        engine = self._thaw_sglang.ThawEngine(model_path=str(model_path), **{**ENGINE_ARGS, **overrides})
        self._started.append(engine)
        return engine

    def adopt(self, engines):
        self._started.extend(engines)

    def close(self):
        started, self._started = self._started, []
        with ExitStack() as stack:  # the last started first; one failing to shut down leaves none of the rest running
            for engine in started:
                stack.callback(engine.shutdown)


@pytest.fixture
def engines(thaw_sglang):
    """Engines for this test alone, shut down when it ends."""
    with closing(Engines(thaw_sglang)) as start:
        yield start


@pytest.fixture(scope="module")
def module_engines(thaw_sglang):
    """Engines for this module alone, shut down when it ends."""
    with closing(Engines(thaw_sglang)) as start:
        yield start


HERE = Path(__file__).parent
SHARED_ENGINES = ("family", "llama")  # the session fixtures below: several modules use each one's engines
_last_test = {}  # a shared fixture's name -> the test after which its engines are shut down
_running = {}  # a shared fixture's name -> its engines' `close`, while they run


def _ours(items) -> list:
    """The items under this directory: the hooks below are the whole session's, which may collect other areas."""
    return [item for item in items if item.path.is_relative_to(HERE)]


def _module(item):
    """The item's test module; None for an item outside one, which shares no engine."""
    return item.getparent(pytest.Module)


def pytest_collection_modifyitems(items):
    """Modules that share no engine first, then those sharing each one next to each other (in file order within
    each group), so that a shared engine lives across the modules that use it only. Other items keep their places."""
    ours = _ours(items)
    shares = {}
    for item in ours:
        if _module(item) is not None:
            used = (name for name in SHARED_ENGINES if name in getattr(item, "fixturenames", ()))
            shares.setdefault(_module(item), set()).update(used)
    ordered = iter(sorted(ours, key=lambda item: sorted(shares.get(_module(item), ()))))
    mine = set(map(id, ours))
    items[:] = [next(ordered) if id(item) in mine else item for item in items]


def pytest_collection_finish(session):
    """Note, for each shared fixture, the last test of the last module using it (not the last test using it: a
    module fixture using the engine, test_tensor_parallel's `run`, ends with its module)."""
    items = _ours(session.items)
    for name in SHARED_ENGINES:
        users = [index for index, item in enumerate(items) if name in getattr(item, "fixturenames", ())]
        if users:
            last = users[-1]
            while (last + 1 < len(items) and _module(items[last]) is not None
                   and _module(items[last + 1]) is _module(items[last])):
                last += 1
            _last_test[name] = items[last]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)  # the test's fixtures, and at its module's end the module's, end first
    finally:  # even where one of them failed to end: the engines would otherwise idle to the session's end
        for name, last in _last_test.items():
            if last is item and name in _running:
                _running.pop(name)()


@contextmanager
def shared_engines(request, thaw_sglang):
    """Engines for the shared fixture `request` sets up, shut down after its last test (or at the session's end,
    where that test never ran: a run stopped early)."""
    with closing(Engines(thaw_sglang)) as start:
        _running[request.fixturename] = start.close
        yield start


@pytest.fixture(scope="session")
def llama(request, thaw_sglang, zoo):
    """A plain llama engine, outside the family, shared by test_abort and test_kv_transport in either order: each
    test leaves it idle and unpaused, and checks its leaks with `no_new_leaks`. test_kv_transport refuses it
    remote reads for good (remote.refuse), so a test that needs them (test_partial_restore) starts its own."""
    with shared_engines(request, thaw_sglang) as start:
        yield start(zoo.make_model("llama"))


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
def family(request, thaw_sglang, zoo):
    with shared_engines(request, thaw_sglang) as start:
        parent = start(zoo.make_model("llama"))
        output_a, _ = generate(parent, PROMPT_A)
        generate(parent, PROMPT_B)
        snapshot = thaw_sglang.capture(parent)
        children = parent.fork(n=4)
        start.adopt(children)
        child_snapshot = thaw_sglang.capture(children[0])
        continued = PROMPT_A + output_a
        # The last output token was sampled but never fed back, so the tree holds every token before it.
        references = [generate(parent, continued + suffix)[0] for suffix in SUFFIXES]
        yield Family(parent, children, snapshot, child_snapshot, continued, len(continued) - 1, references)
