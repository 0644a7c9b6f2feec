"""The driver's engine as the suite drives it: the adapter class checked against the contract once, and every
contract call's result checked against the type the contract names, so that an adapter that breaks a rule is
told which rule, not shown a crash somewhere inside the suite."""

from __future__ import annotations

from typing import Sequence

from thaw_format import SamplingParams, Snapshot
from thaw_format.sdk import Finished, Generation, Progress, Resumed, adapter_problems

from .results import CheckFailed


class ContractViolation(CheckFailed):
    """The adapter broke a rule of thaw_format/sdk/contract.py; the message names it."""


def checked(engine) -> "CheckedEngine":
    """`engine` (a driver's start) wrapped, once its class is known to be an adapter (name, capabilities and
    the methods they need: thaw_format.sdk.adapter_problems)."""
    problems = adapter_problems(type(engine))
    if problems:
        raise ContractViolation("the adapter class breaks the contract: " + "; ".join(problems))
    return CheckedEngine(engine)


class CheckedEngine:
    """The methods whose results the suite reads are checked here; everything else is the engine's own."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.features = type(engine).capabilities()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        got = self.engine.generate(prompt, params)
        return generation(got, len(prompt), "logprobs" in self.features, f"{self.engine.name}: generate()")

    def capture(self, **options) -> Snapshot:
        return _typed(self.engine.capture(**options), Snapshot, "capture()", "thaw_format.Snapshot")

    def restore(self, snapshot: Snapshot) -> list:
        got = _typed(self.engine.restore(snapshot), list, "restore()", "a list of Resumed")
        return [_typed(r, Resumed, "restore()'s list", "thaw_format.sdk.Resumed") for r in got]

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        return _typed(self.engine.submit(prompt, params), str, "submit()", "the request id, a str")

    def step(self) -> dict:
        return _typed(self.engine.step(), dict, "step()", "a dict: request id -> output token ids")

    def progress(self) -> dict:
        got = _typed(self.engine.progress(), dict, "progress()", "a dict: request id -> Progress")
        for rid, value in got.items():
            _typed(rid, str, "progress()'s keys", "the request id, a str")
            _typed(value, Progress, "progress()'s values", "thaw_format.sdk.Progress")
            if not isinstance(value.token_ids, list) or not all(isinstance(t, int) for t in value.token_ids):
                raise ContractViolation(f"progress(): Progress.token_ids must be a list of int, got "
                                        f"{value.token_ids!r:.80}")
            if value.aborted and not value.finished:
                raise ContractViolation(f"progress(): request {rid} is aborted but not finished: an aborted "
                                        "request's last Progress has finished=True")
        return got

    def abort(self, request_id: str) -> bool:
        return _typed(self.engine.abort(request_id), bool, "abort()",
                      "a bool: True if the request was in flight, False if unknown or finished")

    def finish(self, requests=None) -> dict:
        got = _typed(self.engine.finish(requests), dict, "finish()", "a dict: request id -> Finished")
        for value in got.values():
            _typed(value, Finished, "finish()'s values", "thaw_format.sdk.Finished")
        return got

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list:
        children = _typed(self.engine.fork(n, context=context, processes=processes), list, "fork()", "a list")
        if len(children) != n:
            raise ContractViolation(f"fork({n}) returned {len(children)} children")
        return children


def generation(got, prompt_tokens: int, logprobs: bool, what: str) -> Generation:
    """`got`, checked to be the Generation the contract describes for a prompt of `prompt_tokens` tokens."""
    _typed(got, Generation, what, "thaw_format.sdk.Generation")
    if not isinstance(got.token_ids, list) or not all(isinstance(t, int) for t in got.token_ids):
        raise ContractViolation(f"{what}: Generation.token_ids must be a list of int, got {got.token_ids!r:.80}")
    if not isinstance(got.cached_tokens, int) or not 0 <= got.cached_tokens <= prompt_tokens:
        raise ContractViolation(f"{what}: Generation.cached_tokens must be an int from 0 to the prompt's "
                                f"{prompt_tokens} tokens, got {got.cached_tokens!r}")
    if logprobs and (not isinstance(got.logprobs, list) or len(got.logprobs) != len(got.token_ids)):
        raise ContractViolation(f"{what}: the adapter declares 'logprobs', so Generation.logprobs must hold one "
                                f"float per token ({len(got.token_ids)}), got {got.logprobs!r:.80}")
    return got


def _typed(value, kind: type, what: str, named: str):
    if not isinstance(value, kind):
        raise ContractViolation(f"{what} returned {type(value).__name__}, not {named} (thaw_format/sdk/contract.py)")
    return value
