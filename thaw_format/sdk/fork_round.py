"""One fork round of a pool of warm engines, whatever carries it (ForkPool's processes, thaw_ray's Ray actors):
its arguments, checked before the parent is read, its result, and how a failed round is reported."""

from __future__ import annotations

import operator
import reprlib
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

from ..errors import CorruptSnapshotError
from ..snapshot import SamplingParams
from .contract import Generation
from .tokens import token_ids


class PoolWorkerDied(RuntimeError):
    """A pool worker (ForkPool's process, RayForkPool's actor) ended during a round, or failed to start (or was
    given up) before one; the message names it, how it ended (a process's exit status, Ray's error for an
    actor) and, for a failed start, its engine's error."""


class PoolWorkerStarting(PoolWorkerDied):
    """A round failed, before the parent was read, only because workers are still starting (not failed): a
    RayForkPool actor that no node has the resources to place yet. The pool keeps them, and waits for them again
    at the next round: retry later (a node may join). A PoolWorkerDied, so `except PoolWorkerDied` still sees it;
    a round in which any worker failed otherwise raises PoolWorkerDied itself. A pool's first start never raises
    it: the pool is closed then, its workers with it (PoolWorkerDied)."""


@dataclass
class ForkRound:
    """One round's results and where its time went (seconds)."""

    generations: list[Generation]
    kv_bytes: int  # the snapshot moved: the trunk's KV pages and their description
    capture_s: float  # the parent's KV out: its capture of the trunk, published once in shared memory (RayForkPool:
    # and its one ray.put into the object store, if any actor of the round is on another node)
    verify_s: float = 0.0  # ForkPool's one check of every chunk of that capture, before any worker reads it
    # (RayForkPool: 0, each actor checks the segment or the object itself, in its restore_s)
    restore_s: list[float] = field(default_factory=list)  # each worker's KV in (scatter + prefix table)
    generate_s: list[float] = field(default_factory=list)  # each worker's suffix prefill + decode
    total_s: float = 0.0
    # how each worker got the KV: "segment" (the parent's shared memory, read in place: ForkPool's workers,
    # RayForkPool's actors on the parent's node) or "object" (RayForkPool's actors on other nodes: the round's one
    # ray.put, put only when one of them is in the round)
    kv_via: list[str] = field(default_factory=list)

    def add(self, reply: dict) -> None:
        """A worker's answer to the round ({"generation": ..., "restore_s": ..., "generate_s": ..., "via": ...})."""
        self.generations.append(Generation(**reply["generation"]))
        self.restore_s.append(reply["restore_s"])
        self.generate_s.append(reply["generate_s"])
        self.kv_via.append(reply["via"])


class RoundArguments(NamedTuple):
    """A round's arguments as checked_round returns them: plain lists, and the parent's page size."""

    context: list[int]
    page: int
    suffixes: list[list[int]]
    params: list[SamplingParams]

    @property
    def full(self) -> int:
        """The tokens of the context's full pages: the KV a round hands over."""
        return len(self.context) // self.page * self.page


def checked_round(parent, n: int, workers: int, context, suffixes, params) -> RoundArguments:
    """A round of n children on a pool of `workers`, every argument checked (ValueError or TypeError naming it)
    before the parent is read: the parent is only asked its page_size()."""
    if not 1 <= n <= workers:
        raise ValueError(f"this pool has {workers} workers; a round takes 1..{workers}, got {n}")
    if len(suffixes) != n:
        raise ValueError(f"{n} children need {n} suffixes, got {len(suffixes)}")
    suffixes = [token_ids(suffix, f"suffix {i}") for i, suffix in enumerate(suffixes)]
    params = params_per_child(params, n)
    context = token_ids(context, "the context")
    page = parent_page_size(parent)
    if len(context) < page:  # no full page: nothing to hand over (an engine may refuse the empty KV)
        raise ValueError(f"a fork round's context needs at least one full page ({page} tokens, the parent's "
                         f"page_size()), whose KV the workers take; got {len(context)} tokens: generate on the "
                         "parent instead")
    return RoundArguments(context, page, suffixes, params)


def parent_page_size(parent) -> int:
    """The parent's page_size(): the pool hands over its full pages only. An engine's pages are its own (vLLM's
    CPU blocks are 128 tokens by default): cut at 32 for every engine, a 100-token trunk moved no KV from such a
    parent, and every worker prefilled it all, without a word."""
    method = getattr(parent, "page_size", None)
    if not callable(method):
        raise TypeError(f"a fork round's parent must say its page_size() (thaw_format.sdk.contract); "
                        f"{type(parent).__name__} has none")
    page = method()
    if isinstance(page, bool) or not isinstance(page, int) or page < 1:
        raise TypeError(f"the parent's page_size() returned {page!r}, not a whole number of tokens >= 1")
    return page


def params_per_child(params, n: int) -> list[SamplingParams]:
    """One SamplingParams per child: `params` for all, or its n items; TypeError or ValueError otherwise."""
    if isinstance(params, SamplingParams):
        return [params] * n
    if isinstance(params, Sequence) and not isinstance(params, (str, bytes)) and \
            all(isinstance(p, SamplingParams) for p in params):
        if len(params) != n:
            raise ValueError(f"{n} children take one SamplingParams, or {n} (one each), got {len(params)}")
        return list(params)
    raise TypeError(f"a fork round's params is a thaw_format.SamplingParams (greedy(n), seeded(...)) or one per "
                    f"child, not {type(params).__name__} {reprlib.repr(params)}")


def whole_workers(workers) -> int:
    """`workers` as an int: a whole number (an int or any integer with __index__, e.g. numpy's, but not a bool),
    at least 1."""
    try:
        count = operator.index(workers)
    except TypeError:
        count = None
    if count is None or isinstance(workers, bool):  # True is an int, and started one worker
        raise TypeError(f"a fork pool's workers is a whole number of engines, not {type(workers).__name__} "
                        f"{workers!r}")
    if count < 1:
        raise ValueError(f"a fork pool needs workers >= 1, got {count}")
    return count


def round_failure(failures: Sequence[Exception], replaced: bool) -> Exception:
    """The error a round with these failures (one per worker that failed) raises: PoolWorkerDied if a worker
    died (`replaced`: the pool is replacing it), CorruptSnapshotError if every worker refused the round's
    snapshot as damaged, else RuntimeError; its message names each, and says the parent engine is untouched."""
    died = any(isinstance(f, PoolWorkerDied) for f in failures)
    if died:
        kind = PoolWorkerDied
    elif all(isinstance(f, CorruptSnapshotError) for f in failures):
        kind = CorruptSnapshotError
    else:
        kind = RuntimeError
    replacing = ", dead workers are being replaced" if died and replaced else ""
    return kind("; ".join(str(f) for f in failures) + f": the fork round failed (the parent engine is "
                f"untouched{replacing})")
