"""fork(engine, n, context=...): n children continuing `context` without its prefill, on any contract engine.

In-process children are views of the parent: each `generate` is the parent's, so they share its cached pages
and no KV bytes move. Process children are equal engines started in worker processes (`thaw_format.sdk.child`)
from the parent's `launch_spec()`, each restoring one KV snapshot of `context` written once for all of them.
Children offer `generate` and `close` only.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from typing import Sequence

from ..snapshot import SamplingParams
from .contract import Engine, Generation, require
from .engine_process import EngineProcess
from .launch import startable_launch_spec
from .shared import capture_shared
from .tokens import token_ids


def fork(engine: Engine, n: int, *, context: Sequence[int], processes: bool = False) -> list:
    """n children of `engine` holding the KV of `context`; their prompts must extend `context`."""
    if isinstance(n, bool) or not hasattr(n, "__index__"):  # range() took True as 1; a float failed later
        raise TypeError(f"fork's n is a whole number of children, not {type(n).__name__} {n!r}")
    n = operator.index(n)
    if n < 1:
        raise ValueError(f"fork needs n >= 1, got {n}")
    context = token_ids(context, "fork's context")  # int() cut a float to another token, read a str's digits
    if not processes:
        require(engine, "fork")
        return [SharedChild(engine, context) for _ in range(n)]
    require(engine, "fork_processes")
    spec = startable_launch_spec(engine, "fork")
    # valid until the engine's next capture_shared: every child has restored it before fork returns
    source = capture_shared(engine, chains=[context])
    config = {"factory": spec.factory, "kwargs": spec.kwargs, "source": source}
    children = []
    try:  # a start refused part way (the OS refuses a process) kills the children started before it
        for _ in range(n):  # they start side by side
            children.append(ProcessChild(context, config))
        for child in children:  # a child has restored the snapshot once it is ready
            child.wait_ready()
    except BaseException:
        for child in children:
            child.kill()
        raise
    return children


def generate_all(children: Sequence, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[Generation]:
    """Each child's prompt, in order: process children all run at once, in-process children one by one.

    A child that fails (a dead one) fails the call only once every other child has answered: a process child's
    reply left unread answered its next request (the first failure stopped the call, and a child sent its prompt
    before it kept that reply waiting). Interrupted (Ctrl-C), the process children still owing a reply are
    killed, for the same reason."""
    if len(prompts) != len(children):  # zip would drop the extra children or prompts without a word
        raise ValueError(f"{len(children)} children and {len(prompts)} prompts: give each child one prompt")
    prompts = [_extends(child.context, prompt) for child, prompt in zip(children, prompts)]  # before any is sent
    outcomes: dict[int, object] = {}  # child index -> its Generation, or its failure
    owing = []  # the process children sent their prompt whose reply is still to be read
    for index, (child, prompt) in enumerate(zip(children, prompts)):
        if isinstance(child, ProcessChild):
            try:
                child.send(prompt, params)
                owing.append(child)
            except RuntimeError as exc:
                outcomes[index] = exc
    try:
        for index, (child, prompt) in enumerate(zip(children, prompts)):
            if index in outcomes:
                continue
            try:
                if isinstance(child, ProcessChild):
                    owing.remove(child)  # read below, whatever comes of it
                    outcomes[index] = child.result()
                else:
                    outcomes[index] = child.generate(prompt, params)
            except Exception as exc:
                outcomes[index] = exc
    except BaseException:
        for child in owing:
            child.kill()
        raise
    failures = [outcome for outcome in outcomes.values() if isinstance(outcome, Exception)]
    if failures:
        raise failures[0] if len(failures) == 1 else RuntimeError("; ".join(map(str, failures)))
    return [outcomes[index] for index in range(len(children))]


def _extends(context: list[int], prompt: Sequence[int]) -> list[int]:
    prompt = token_ids(prompt, "a fork child's prompt")
    if prompt[: len(context)] != context:
        raise ValueError(f"a fork child continues its context of {len(context)} tokens; this prompt does not extend it")
    return prompt


class SharedChild:
    """A child in the parent's process: the parent's engine, serving prompts that extend the context."""

    def __init__(self, parent: Engine, context: list[int]) -> None:
        self.parent, self.context = parent, context

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        return self.parent.generate(_extends(self.context, prompt), params)

    def close(self) -> None:
        self.parent = None


class ProcessChild:
    """A child engine in its own process, spoken to in JSON lines (thaw_format.sdk.child)."""

    def __init__(self, context: list[int], config: dict) -> None:
        self.context = context
        self.process = EngineProcess("thaw_format.sdk.child", config)

    def wait_ready(self) -> None:
        self._receive()

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        self.send(prompt, params)
        return self.result()

    def send(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Start a request in the child; `result()` waits for it (so several children run side by side)."""
        message = {"prompt": _extends(self.context, prompt), "params": dataclasses.asdict(params)}
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except (OSError, ValueError):  # its pipe is gone: say how the child ended, not BrokenPipeError
            raise RuntimeError(f"fork child {self.process.pid} exited with {self.process.exit_status()}") \
                from None

    def result(self) -> Generation:
        return Generation(**self._receive())

    def _receive(self) -> dict:
        try:
            line = self.process.stdout.readline()
        except BaseException:  # interrupted (Ctrl-C): the reply it still owes would answer its next request
            self.kill()
            raise
        if not line:
            raise RuntimeError(f"fork child {self.process.pid} exited with {self.process.exit_status()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"fork child {self.process.pid}: {reply['error']}")
        return reply["generation"] if "generation" in reply else reply

    def kill(self) -> None:
        self.process.kill_quietly()

    def close(self, timeout: float = 120) -> None:
        """End the child: it closes its engine and exits at the end of its input; killed if it has not within
        `timeout` seconds (a child stuck in its engine would otherwise outlive close, holding its memory)."""
        self.process.end(timeout)
