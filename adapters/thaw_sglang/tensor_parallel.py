"""SGLang's tensor-parallel ranks on thaw's KV path (thaw_format.sdk.head_share).

Each rank of a TP engine runs a scheduler of its own; the first rank hands every rank the same messages, thaw's
calls included (Engine.collective_rpc reaches each rank's method), and every rank makes the same decisions, so each
holds the same radix tree over the same slots, but only its share of the KV heads. A capture: every rank plans the
same pages, the first publishes the snapshot over all heads, every rank writes its heads of every page into it, and
the first checksums the final bytes. A restore: every rank reads and checks the snapshot, and only once all have
agreed does any change its cache, each writing its heads. The ranks meet over SGLang's CPU group of the TP ranks,
and a rank's failure travels to the others as plain data (thaw_format.sdk.agreement), so that no rank waits for one
that gave up.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from thaw_format.sdk import agreement
from thaw_format.sdk.head_share import HeadShare, head_share

from . import _internals

T = TypeVar("T")


def share(scheduler) -> HeadShare:
    """This rank's share of the KV heads; NotImplementedError where the KV is split otherwise than by heads (SGLang
    pads KV heads on CPU to a multiple of the ranks: refused as heads that do not divide evenly)."""
    k_buffers, _ = _internals.kv_buffers(scheduler)
    rank, ranks, _ = _internals.tensor_parallel(scheduler)
    _, heads, head_dim = k_buffers[0].shape
    mine = head_share("thaw_sglang", rank, ranks, heads, _internals.total_kv_heads(scheduler), head_dim,
                      k_buffers[0].element_size(), other=_internals.other_parallelism(scheduler))
    if ranks > 1 and k_buffers[0].device.type != "cpu":  # after head_share: other parallelism is named first
        raise NotImplementedError("thaw_sglang maps tensor parallelism on CPU only")
    return mine


def is_parallel(scheduler) -> bool:
    return _internals.tensor_parallel(scheduler)[1] > 1


def is_first(scheduler) -> bool:
    """thaw_format.sdk.agreement.is_first over the TP ranks (the rank from_first publishes on)."""
    return agreement.is_first(_internals.tensor_parallel(scheduler)[2])


def agreed(scheduler, work: Callable[[], T]) -> T:
    """thaw_format.sdk.agreement.agreed over the TP ranks."""
    return agreement.agreed(_internals.tensor_parallel(scheduler)[2], work)


def from_first(scheduler, work: Callable[[], T]) -> T:
    """thaw_format.sdk.agreement.from_first over the TP ranks."""
    return agreement.from_first(_internals.tensor_parallel(scheduler)[2], work)


def agree_on(scheduler, what: str, value, error: type[Exception] = RuntimeError) -> None:
    """thaw_format.sdk.agreement.agree_on over the TP ranks."""
    agreement.agree_on(_internals.tensor_parallel(scheduler)[2], what, value, error)


def gathered(scheduler, value) -> list:
    """thaw_format.sdk.agreement.gathered over the TP ranks."""
    return agreement.gathered(_internals.tensor_parallel(scheduler)[2], value)
