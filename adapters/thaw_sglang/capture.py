"""Scheduler-side capture: the radix tree as pages, K/V gathered by slot, weights, requests, model and engine."""

from __future__ import annotations

from thaw_format import Lineage, Snapshot, Weights, WeightsRef
from thaw_format.sdk import lineage_now

from . import _internals, tensor_parallel
from .kv import deferred_pages, gather_pages, share_pages
from .identity import engine_info, model_info
from .pages import chain_paths, paginate
from .requests import capture_requests
from .weights import capture_weights, engine_weights_digest


def capture_state(
    scheduler, *, page_size: int, include_weights: bool, label: str | None = None, parent: str | None = None,
    chains: list[list[int]] | None = None, deferred: bool = False, requests: bool = True,
) -> tuple[Snapshot, dict, str | None]:
    """The scheduler's state between two batches, its `fill` functions and, on a tensor-parallel rank, its pages'
    digest (Pages.digest: the ranks compare theirs before any writes; None on one rank, which has none to compare).
    Without weights, the snapshot names them by digest.

    `parent` is the id of the snapshot this engine was restored from, if any; `chains` limits the cached pages
    to those holding these token sequences (requests in flight keep theirs). Without `requests`, KV only (a
    shared capture): no request in flight, nor its pages, which stay this engine's. With `deferred`, the KV tensors
    are left for the returned `fill` functions to gather straight into the snapshot's buffer (write_into);
    otherwise they are gathered here and `fill` is empty. A tensor-parallel rank's KV is always deferred, and its
    `fill` holds the puts of its heads (kv.share_pages), which every rank runs once the first has published the
    snapshot (scheduler_ext); its weights, sharded between the ranks, are named by digest only.
    """
    scheduler.thaw_in_place.check_capture()
    share = tensor_parallel.share(scheduler)
    if include_weights and not share.whole:
        raise NotImplementedError(f"thaw_sglang captures a tensor-parallel engine's KV only ({share.ranks} ranks "
                                  "hold a shard of the weights each): capture it with include_weights=False")
    engine_page = _internals.engine_page_size(scheduler)
    if page_size % engine_page:
        raise ValueError(f"page_size {page_size} is not a multiple of the engine's page size {engine_page}")
    # The weights' identity is their checkpoint's, carried or not (spec 5.1); carried ones keep SGLang's names.
    digest = engine_weights_digest(scheduler)
    weights = capture_weights(scheduler) if include_weights else Weights(ref=WeightsRef(weights_digest=digest))
    live = capture_requests(scheduler) if requests else None
    cached = _internals.radix_paths(scheduler)
    if chains is not None:
        cached = chain_paths(cached, chains)
    pages = paginate(cached + (live.paths if live is not None else []), page_size)
    if live is not None:
        live.assign_pages(pages.tree)
    k_buffers, v_buffers = _internals.kv_buffers(scheduler)
    if not share.whole:
        kv, fill = share_pages(k_buffers, v_buffers, pages.slots, share)
    elif deferred:
        kv, fill = deferred_pages(k_buffers, v_buffers, pages.slots)
    else:
        kv, fill = gather_pages(k_buffers, v_buffers, pages.slots), {}
    return Snapshot(
        model=model_info(scheduler, digest),
        weights=weights,
        kv=kv,
        prefix=pages.tree,
        scheduler=live.state if live is not None else None,
        engine=engine_info(scheduler),
        lineage=Lineage(parent=parent, label=label, created=lineage_now()),
    ), fill, (None if share.whole else pages.digest())
