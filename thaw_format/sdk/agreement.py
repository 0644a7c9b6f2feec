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

T = TypeVar("T")


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
            raise error_data.rebuilt(*error, where=f"rank {rank}: ")
    return value


def from_first(group, work: Callable[[], T]) -> T:
    """Run `work` on the first rank alone and return its value (plain JSON: a tuple comes back a list) on every
    rank; raise its exception on every rank."""
    failure, outcome = None, {}
    if dist.get_rank(group) == 0:
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
        raise error_data.rebuilt(*first["error"], where="rank 0: ")
    return first["value"]


def agree_on(group, what: str, value, error: type[Exception] = RuntimeError) -> None:
    """Raise `error` on every rank unless every rank holds the same `value` (plain JSON) of `what`."""
    values = gathered(group, value)
    if any(other != values[0] for other in values):
        raise error(f"the ranks differ in {what}: {', '.join(map(str, values))} (by rank)")


def gathered(group, value) -> list:
    """Every rank's `value` (plain JSON), in rank order: exchanged as bytes, no pickle."""
    ranks = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ranks)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=group)
    padded = torch.zeros(max(int(size) for size in sizes), dtype=torch.uint8)
    padded[: len(data)] = data
    received = [torch.empty_like(padded) for _ in range(ranks)]
    dist.all_gather(received, padded, group=group)
    return [json.loads(bytes(got[: int(size)].numpy())) for got, size in zip(received, sizes)]
