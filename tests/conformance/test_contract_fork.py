"""thaw_format.sdk.fork on the template's contract engine: in-process children share the parent's cache, process
children are equal engines started from launch_spec(), and what does not fit is refused by name."""

import os
import signal

import pytest

from thaw_conformance.template.driver import driver
from thaw_format.sdk import ForkPool, LaunchSpec, Unsupported, fork, generate_all, greedy, seeded

CONTEXT = list(range(3, 40))
PROMPT = CONTEXT + [41, 42, 43]


@pytest.fixture
def parent(tmp_path):
    engine = driver().start("toy", tmp_path)
    engine.generate(CONTEXT, greedy(1))
    yield engine
    engine.close()


@pytest.mark.parametrize("processes", [False, True])
def test_children_continue_the_context_as_the_parent_does(parent, processes):
    want = [parent.generate(PROMPT, seeded(7 + i, 6)) for i in range(2)]
    children = fork(parent, 2, context=CONTEXT, processes=processes)
    try:
        for i, child in enumerate(children):
            got = child.generate(PROMPT, seeded(7 + i, 6))
            assert got.token_ids == want[i].token_ids and got.logprobs == want[i].logprobs
            assert got.cached_tokens == want[i].cached_tokens > 0  # the context's pages, from cache
    finally:
        for child in children:
            child.close()


def test_a_prompt_that_does_not_extend_the_context_is_refused(parent):
    [child] = fork(parent, 1, context=CONTEXT)
    with pytest.raises(ValueError, match="does not extend"):
        child.generate(PROMPT[1:], greedy(2))


def test_a_missing_capability_is_unsupported_before_anything_starts(parent):
    class NoProcesses(type(parent)):
        @classmethod
        def capabilities(cls):
            return frozenset({"fork"})

    with pytest.raises(Unsupported, match="fork_processes"):
        fork(NoProcesses(parent.engine), 2, context=CONTEXT, processes=True)
    with pytest.raises(ValueError, match="n >= 1"):
        fork(parent, 0, context=CONTEXT)


def test_an_engine_started_with_arguments_its_spec_cannot_hold_is_not_started_again(parent):
    """A launch spec that says it lost arguments (unrecorded: not JSON-able) would start a different engine: a
    process fork and a fork pool refuse it, naming them, before any process starts or the parent is read."""
    class Unrecorded(type(parent)):
        def launch_spec(self):
            spec = super().launch_spec()
            return LaunchSpec(spec.factory, spec.kwargs, frozenset({"compilation_config"}))

    engine = Unrecorded(parent.engine)
    engine.capture_shared = None  # reading the parent at all would fail with a TypeError, not Unsupported
    with pytest.raises(Unsupported, match="fork: the engine was started with compilation_config"):
        fork(engine, 2, context=CONTEXT, processes=True)
    with pytest.raises(Unsupported, match="ForkPool: the engine was started with compilation_config"):
        ForkPool(engine, workers=1)


def test_children_and_prompts_must_pair_up(parent):
    """generate_all gives each child one prompt: a count that differs is refused, not cut to the shorter."""
    children = fork(parent, 2, context=CONTEXT)
    for prompts in ([PROMPT], [PROMPT] * 3):
        with pytest.raises(ValueError, match=f"2 children and {len(prompts)} prompts"):
            generate_all(children, prompts, greedy(2))


def test_the_template_has_the_contracts_shared_memory_methods(parent, tmp_path):
    """capture_shared / restore_source are contract methods (SharedKV), so the template an author copies has them."""
    source = parent.capture_shared(chains=[CONTEXT])
    child = driver().start("toy", tmp_path)
    try:
        child.restore_source(source)
        assert child.generate(PROMPT, greedy(3)) == parent.generate(PROMPT, greedy(3))
    finally:
        child.close()


@pytest.mark.parametrize("n", [True, 2.0, "2"])
def test_n_is_a_whole_number_of_children(parent, n):
    # True forked one child, "2" failed comparing a str with an int, 2.0 failed later in range()
    with pytest.raises(TypeError, match="fork's n is a whole number of children"):
        fork(parent, n, context=CONTEXT)


@pytest.mark.parametrize("context", ["3456", [3.0, 4.5], [True, 4]])
def test_the_context_is_token_ids(parent, context):
    # int() read a str's digits as ids and cut 4.5 to 4
    with pytest.raises(TypeError, match="fork's context is a sequence of token ids"):
        fork(parent, 1, context=context)


def test_a_process_child_that_died_is_named_with_the_signal_that_ended_it(parent):
    [child] = fork(parent, 1, context=CONTEXT, processes=True)
    child.process.kill()
    child.process.wait()
    with pytest.raises(RuntimeError, match=r"exited with status -9 \(killed by SIGKILL\)"):
        child.generate(PROMPT, greedy(2))  # was BrokenPipeError from the write, or "exited with -9"
    child.close()


def test_close_kills_a_child_that_does_not_end_in_time(parent):
    [child] = fork(parent, 1, context=CONTEXT, processes=True)
    os.kill(child.process.pid, signal.SIGSTOP)  # stopped, it never reads the end of its input
    child.close(timeout=0.5)  # TimeoutExpired went to the caller and the child lived on
    assert child.process.poll() is not None


def test_a_dead_child_fails_generate_all_once_the_others_have_answered(parent):
    """generate_all stopped at the first dead child: a child sent its prompt before it was left with its reply
    waiting, and that reply then answered the child's next request (another prompt's tokens, without a word)."""
    children = fork(parent, 2, context=CONTEXT, processes=True)
    try:
        children[1].process.kill()
        children[1].process.wait()  # its stdin has no reader: the send to it fails
        with pytest.raises(RuntimeError, match=r"fork child \d+ exited with status -9 \(killed by SIGKILL\)"):
            generate_all(children, [PROMPT, PROMPT], greedy(4))
        other = CONTEXT + [50, 51]
        assert children[0].generate(other, greedy(4)).token_ids == parent.generate(other, greedy(4)).token_ids
    finally:
        for child in children:
            child.close()
