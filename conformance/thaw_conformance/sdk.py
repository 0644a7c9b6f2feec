"""The adapter SDK: what an engine driver gives the conformance suite. This module is the whole contract.

A driver wraps one engine and its thaw adapter (never private engine internals directly). The suite only ever:

    engine = driver.start(arch, workdir)          # a fresh engine serving a zoo model, in this process
    engine.generate(prompt_ids, max_tokens, sampling) -> Generation
    engine.capture(path)                          # save everything the engine holds: weights, cached KV, in-flight
    engine.restore(path)                          # replace the engine's cache/requests with a snapshot's
    engine.weights() / engine.kv()                # the live state, as thaw_format Tensors / a Snapshot
    engine.submit(...) / step() / drain()         # in-flight requests (feature "mid_stream")
    engine.fork(n, context)                       # n engines holding this one's cached context (feature "fork")
    engine.close()

Rules every driver keeps, because the checks rely on them:
- `generate` is deterministic for a given engine state: greedy, or seeded sampling with `Sampling.seed`.
- `Generation.cached_tokens` is the engine's own count of prompt tokens it did not recompute (the prefix
  cache hit), never a number the driver derives from what it expects.
- `restore` checks the snapshot before touching the engine and raises thaw_format's CorruptSnapshotError or
  IncompatibleSnapshotError on bad input; after such an error the engine is unchanged.
- `restore` may be called on an engine that has served requests, as long as none is in flight.
- A feature the adapter cannot do raises `Unsupported(reason)`: the receipt marks the check "not supported by
  the adapter", never passed. `start` raising it marks every check of that architecture so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, runtime_checkable

from thaw_format import Snapshot, Tensor

# Features a driver may declare; a check that needs a missing feature is reported as not supported.
FEATURES = ("logprobs", "seeded", "fork", "mid_stream", "mid_stream_seeded")


class Unsupported(Exception):
    """The adapter cannot do this; the message says what is missing."""


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: temperature 0 is greedy; otherwise seeded sampling over the full distribution."""

    temperature: float = 0.0
    seed: Optional[int] = None

    @property
    def name(self) -> str:
        return "greedy" if self.temperature == 0 else f"seeded({self.seed})"


GREEDY = Sampling()


def seeded(seed: int) -> Sampling:
    return Sampling(temperature=1.0, seed=seed)


@dataclass
class Generation:
    token_ids: list[int]
    cached_tokens: int  # prompt tokens served from the engine's cache, as the engine itself reports
    logprobs: Optional[list[float]] = None  # log-probability of each sampled token, where the engine exposes it


@runtime_checkable
class Engine(Protocol):
    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> Generation:
        """Run one request to completion (exactly max_tokens tokens: no stop tokens) and return it."""

    def capture(self, path: Path) -> None:
        """Save a snapshot of everything the engine holds (weights, cached KV, in-flight requests) to path."""

    def restore(self, path: Path) -> None:
        """Load path and replace the engine's cached KV (and in-flight requests) with the snapshot's."""

    def weights(self) -> dict[str, Tensor]:
        """The engine's live weights under the names its snapshots use."""

    def kv(self) -> Snapshot:
        """The engine's live cached KV as a Snapshot with `kv` and `prefix` (and no weights)."""

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> str:
        """Start a request without finishing it; returns its id (feature "mid_stream")."""

    def step(self) -> None:
        """Advance every in-flight request by one token."""

    def drain(self) -> dict[str, list[int]]:
        """Run every in-flight request (submitted or restored) to completion: request id -> all output token ids."""

    def fork(self, n: int, context: Sequence[int]) -> list["Engine"]:
        """n engines (the adapter's fork: processes, shared buffers...) holding this engine's cached KV of
        `context`; the suite only calls generate (with prompts that extend the context) and close on them."""

    def close(self) -> None:
        """Free the engine; the driver may start another one afterwards."""


@runtime_checkable
class Driver(Protocol):
    name: str  # the engine's name in the receipt: "vllm", "mlx", ...
    features: frozenset  # a subset of FEATURES

    def versions(self) -> dict[str, str]:
        """Versions worth a receipt line: the engine, its framework, the adapter."""

    def architectures(self) -> list[str]:
        """Zoo architecture names this driver can start, in receipt order."""

    def start(self, arch: str, workdir: Path) -> Engine:
        """A fresh engine serving the tiny seeded model of `arch`; workdir is for model files and scratch."""


@dataclass
class Workload:
    """The prompts and lengths every check uses, the same for every engine so that receipts compare."""

    prompt: list[int] = field(default_factory=lambda: [(7 * i + 3) % 200 + 3 for i in range(70)])
    first_tokens: int = 6  # generated before the snapshot
    continue_tokens: int = 8  # generated after it, by parent and child alike
    mid_stream_tokens: int = 12  # total length of the in-flight request
    mid_stream_after: int = 5  # steps taken before the in-flight capture
    fork_n: int = 2
    fork_archs: Optional[tuple] = None  # architectures the fork check runs on (None: all); forks cost engine starts
    seed: int = 1234
