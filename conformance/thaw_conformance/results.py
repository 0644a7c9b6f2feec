"""Check results: one record per (engine, architecture, check), with a status, what was seen, and its time."""

from __future__ import annotations

import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass

from .sdk import Unsupported

# "unsupported": the adapter lacks what the check needs (never counted as passed);
# "error": the check could not run to a verdict (an exception, or a step it depends on failed);
# "differs": a reported comparison (cross-engine numerics) that is not a pass/fail property of thaw.
STATUSES = ("passed", "failed", "unsupported", "skipped", "error", "differs")

# The per-engine checks, in receipt order, with what each proves.
CHECKS = {
    "weights_identical": "live weights, snapshot file and a fresh process's restored weights are the same bytes",
    "kv_identical": "the KV pages read back after a restore in a fresh process are the captured bytes",
    "prefix_hit_fresh_process": "the fresh process reports the parent's own cached-token count (> 0) for the request",
    "continuation_greedy": "greedy continuation after restore is token-identical to the parent's",
    "continuation_seeded": "seeded-sampling continuation after restore is token-identical to the parent's",
    "logprobs_identical": "the logprobs of both continuations are bit-identical to the parent's",
    "fork_n": "n engines restored from one snapshot each continue exactly as the parent does with their seeds",
    "streaming": "greedy and seeded requests in flight together, stepped: a token per step at most, reported by "
                 "progress(), each ending with the parent's tokens (a batch changes no token); one of two aborted "
                 "mid-stream is reported once, aborted, and is gone, the other ending with the parent's tokens",
    "mid_stream_resume": "a greedy request captured in flight finishes in a fresh process as it did in the parent",
    "mid_stream_resume_seeded": "the same for a seeded request (sampling RNG state restored)",
    "corrupt_refused": "a flipped data byte and a truncated file raise CorruptSnapshotError (also from "
                       "restore_source), the engine's pages unchanged",
    "wrong_model_refused": "another config's snapshot, and KV of other weights, raise IncompatibleSnapshotError from "
                           "check, restore and restore_source, the engine's pages unchanged",
    "kv_control": "noise KV under the same prefix hashes is hit and changes the output (restored bytes are read)",
    "sleep_wake": "an engine put to sleep (thaw_format.sdk.sleep) with greedy requests in flight is woken in a fresh "
                  "process from the file alone: they finish with the tokens each gets alone, reading the restored "
                  "pages (the engine's cached-token count), beside new requests with ids of their own",
}


class CheckFailed(Exception):
    """The check ran and the engine did not do what it must."""


@dataclass
class CheckResult:
    engine: str
    arch: str
    check: str
    status: str
    detail: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class Recorder:
    """Collects results; `with recorder.check(name) as note:` times a check and turns its outcome into a status."""

    def __init__(self, engine: str, arch: str) -> None:
        self.engine, self.arch = engine, arch
        self.results: list[CheckResult] = []

    def add(self, check: str, status: str, detail: str = "", seconds: float = 0.0) -> None:
        self.results.append(CheckResult(self.engine, self.arch, check, status, detail, round(seconds, 4)))

    @contextmanager
    def check(self, name: str):
        notes: list[str] = []
        started = time.perf_counter()
        try:
            yield notes.append
        except Unsupported as exc:
            self.add(name, "unsupported", f"not supported by the adapter: {exc}", time.perf_counter() - started)
        except CheckFailed as exc:
            self.add(name, "failed", str(exc), time.perf_counter() - started)
        except Exception as exc:  # a crash is a verdict too: recorded, and the other checks still run
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.add(name, "error", f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})",
                     time.perf_counter() - started)
        else:
            self.add(name, "passed", "; ".join(notes), time.perf_counter() - started)

    def missing(self, status: str, detail: str, checks=tuple(CHECKS)) -> None:
        """Give each of `checks` not yet recorded this status (an engine that did not start, a step that crashed)."""
        done = {r.check for r in self.results}
        for name in checks:
            if name not in done:
                self.add(name, status, detail)
