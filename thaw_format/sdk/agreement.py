"""How the ranks of one engine (a torch.distributed process group: an engine's tensor-parallel ranks over CPU)
agree before any of them changes anything: each runs a step, and only once every rank has succeeded does any go
on; a rank's failure reaches every rank, which raises it, so that no rank waits for good on one that gave up.

What the ranks exchange is plain JSON sent as bytes, never a pickle: a failure as its class name and message
(thaw_format.sdk.error_data), so that an exception no pickle carries, or one not rebuilt from its args
(mover.RemoteReadError), still reaches every rank as what it was.
"""

from __future__ import annotations

import json
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from . import error_data
from .shared import SHM_PREFIX

T = TypeVar("T")

MAX_BYTES = 1 << 20  # the most one rank may send in one exchange: error data is cut to error_data.MESSAGE_HEAD
UNENCODABLE = -1  # the size a rank sends for a value that is not plain JSON: every rank raises, none waits


def agreed(group, work: Callable[[], T]) -> T:
    """Run `work` on every rank and return its value once every rank's succeeded; else raise on every rank: a
    failing rank its own exception, the others the first failing rank's (rebuilt from plain data)."""
    value, failure = None, None
    try:
        value = work()
    except BaseException as exc:  # whatever it is, the other ranks must hear of it or they wait for good
        failure = exc
    errors = gathered(group, None if failure is None else error_data.as_data(failure))
    if failure is not None:
        try:
            raise failure
        finally:
            failure = None  # else this frame, in the traceback, holds it: a cycle keeping work's locals alive
    for rank, error in enumerate(errors):
        if error is not None:
            kind, message = error
            raise error_data.rebuilt(kind, message, where=f"rank {rank}: ")
    return value


def from_first(group, work: Callable[[], T]) -> T:
    """Run `work` on the first rank alone and return its value (plain JSON: a tuple comes back a list) on every
    rank; raise its exception on every rank."""
    failure, outcome = None, {}
    if is_first(group):
        try:
            outcome = {"value": work()}
            json.dumps(outcome)  # what fails to encode fails here, on this rank's side of the exchange
        except BaseException as exc:
            failure, outcome = exc, {"error": error_data.as_data(exc)}
    first = gathered(group, outcome)[0]
    if failure is not None:
        try:
            raise failure
        finally:
            failure = None  # as in agreed
    if "error" in first:
        kind, message = first["error"]
        raise error_data.rebuilt(kind, message, where="rank 0: ")
    return first["value"]


def is_first(group) -> bool:
    """Whether this process is its group's first rank: rank 0 in the order `gathered` lists the ranks' values in, the
    rank from_first runs its work on. The one meaning of "the first rank" for an engine's ranks, whatever rank the
    engine numbers the process by otherwise (its tensor-parallel rank orders the KV heads, not these duties): the
    rank that publishes a capture must be the one that checksums, withdraws and reports it, and verifies a shared
    source for all."""
    return dist.get_rank(group) == 0


def verifies(source: str, first: bool) -> bool:
    """Whether a rank verifies the chunks it reads of `source`: the first rank always; another all but a
    shared-memory segment (every rank maps its one set of bytes, which the first verifies for all, its refusal
    reaching every rank before any writes). A file, each reads, and so verifies, itself."""
    return first or not source.startswith(SHM_PREFIX)


def agree_on(group, what: str, value, error: type[Exception] = RuntimeError) -> None:
    """Raise `error` on every rank unless every rank holds the same `value` (plain JSON) of `what`."""
    values = gathered(group, value)
    if any(other != values[0] for other in values):
        raise error(f"the ranks differ in {what}: {', '.join(map(str, values))} (by rank)")


def gathered(group, value) -> list:
    """Every rank's `value` (plain JSON), in rank order: exchanged as bytes, no pickle. The sizes go first, and
    every rank sees them all: a value one rank could not encode, or one over MAX_BYTES, raises on every rank before
    the bytes are exchanged, so that no rank enters the second exchange alone."""
    ranks = dist.get_world_size(group)
    try:
        encoded = json.dumps(value).encode()
    except Exception:  # noqa: BLE001 - sent as UNENCODABLE: the other ranks must not wait for this one's bytes
        encoded = None
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ranks)]
    own_size = UNENCODABLE if encoded is None else len(encoded)
    dist.all_gather(sizes, torch.tensor([own_size], dtype=torch.int64), group=group)
    sizes = [int(size) for size in sizes]
    if UNENCODABLE in sizes:
        raise TypeError(f"ranks {[r for r, size in enumerate(sizes) if size == UNENCODABLE]} held a value that "
                        "is not plain JSON: nothing was exchanged")
    if max(sizes) > MAX_BYTES:
        raise ValueError(f"the ranks' values are {sizes} bytes (by rank), over the {MAX_BYTES} one exchange takes")
    data = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: len(data)] = data
    received = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(received, padded, group=group)
    return [json.loads(bytes(got[:size].numpy())) for got, size in zip(received, sizes)]
