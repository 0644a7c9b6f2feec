"""SGLang's tensor-parallel ranks on thaw's KV path (thaw_format.sdk.head_share).

Each rank of a TP engine runs a scheduler of its own; the first rank hands every rank the same messages, thaw's
calls included (Engine.collective_rpc reaches each rank's method), and every rank makes the same decisions, so each
holds the same radix tree over the same slots, but only its share of the KV heads. A capture: every rank plans the
same pages, the first publishes the snapshot over all heads, every rank writes its heads of every page into it, and
the first checksums the final bytes. A restore: every rank reads and checks the snapshot, and only once all have
agreed does any change its cache, each writing its heads. The ranks meet over SGLang's CPU group of the TP ranks,
and a rank's failure travels to the others as data (`agreed`), so that no rank waits for one that gave up.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch.distributed as dist
from thaw_format.sdk.head_share import HeadShare, head_share

from . import _internals

T = TypeVar("T")


def share(scheduler) -> HeadShare:
    """This rank's share of the KV heads; NotImplementedError where the KV is split otherwise than by heads."""
    other = _internals.other_parallelism(scheduler)
    if other:
        raise NotImplementedError(f"thaw_sglang maps tensor parallelism only; this engine has "
                                  f"{', '.join(f'{k}={v}' for k, v in other.items())}")
    k_buffers, _ = _internals.kv_buffers(scheduler)
    rank, ranks, _ = _internals.tensor_parallel(scheduler)
    if ranks > 1 and k_buffers[0].device.type != "cpu":
        raise NotImplementedError("thaw_sglang maps tensor parallelism on CPU only")
    _, heads, head_dim = k_buffers[0].shape
    return head_share("thaw_sglang", rank, ranks, heads, _internals.total_kv_heads(scheduler), head_dim,
                      k_buffers[0].element_size())


def is_parallel(scheduler) -> bool:
    return _internals.tensor_parallel(scheduler)[1] > 1


def is_first(scheduler) -> bool:
    return _internals.tensor_parallel(scheduler)[0] == 0


def agreed(scheduler, work: Callable[[], T]) -> T:
    """Run `work` on every rank and return its value once every rank's succeeded; else raise, on every rank, the
    first failing rank's exception."""
    try:
        outcome: tuple[Any, BaseException | None] = (work(), None)
    except Exception as exc:
        outcome = (None, exc)
    _, ranks, group = _internals.tensor_parallel(scheduler)
    outcomes: list = [None] * ranks
    dist.all_gather_object(outcomes, (None, outcome[1]), group=group)
    for _, error in outcomes:
        if error is not None:
            raise error
    return outcome[0]


def from_first(scheduler, work: Callable[[], T]) -> T:
    """Run `work` on the first rank alone and return its value on every rank (raise its exception on every rank)."""
    outcome: list = [(None, None)]
    if is_first(scheduler):
        try:
            outcome = [(work(), None)]
        except Exception as exc:
            outcome = [(None, exc)]
    dist.broadcast_object_list(outcome, group=_internals.tensor_parallel(scheduler)[2], group_src=0)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value
