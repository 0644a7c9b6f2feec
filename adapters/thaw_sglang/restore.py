"""Scheduler-side restore: every check first, then weights (unless the engine holds them already), then the
tree rebuilt with its KV written in."""

from __future__ import annotations

import torch
from thaw_format import IncompatibleSnapshotError, Snapshot, check_model

from . import _internals, tensor_parallel
from .kv import scatter_rows
from .identity import check_kv, model_info
from .pages import distinct_token_count, leaf_sequences
from .weights import check_weights, engine_weights_digest, restore_weights


class EngineBusyError(RuntimeError):
    """A restore needs an idle engine: it replaces the whole prefix cache."""


def _loads_weights(scheduler, snapshot: Snapshot) -> bool:
    """Whether the restore loads the snapshot's weights: it carries some the engine does not already hold.

    Weights of the same digest are the engine's own (another engine's snapshot of the same checkpoint carries
    them under that engine's names): only the KV needs to move.
    """
    if snapshot.weights is None or not snapshot.weights.tensors:
        return False
    digest = snapshot.model.weights_digest if snapshot.model is not None else None
    return digest is None or digest != engine_weights_digest(scheduler)


def check_restorable(scheduler, snapshot: Snapshot) -> None:
    """Raise IncompatibleSnapshotError, naming the field, for anything this engine cannot take as it is."""
    if _loads_weights(scheduler, snapshot):
        if tensor_parallel.is_parallel(scheduler):
            raise IncompatibleSnapshotError("weights: a tensor-parallel engine takes only snapshots of the weights "
                                            "it holds (thaw_sglang does not shard a snapshot's weights between ranks)")
        check_model(snapshot, model_info(scheduler), check_weights=False)
        check_weights(scheduler, snapshot.weights)
    else:
        check_model(snapshot, model_info(scheduler, engine_weights_digest(scheduler)))
        scheduler.thaw_in_place.check(snapshot)
    if snapshot.kv is None:
        return
    check_kv(scheduler, snapshot)
    if snapshot.prefix is None or snapshot.prefix.num_pages != snapshot.kv.num_pages:
        pages = None if snapshot.prefix is None else snapshot.prefix.num_pages
        raise IncompatibleSnapshotError(f"prefix: {pages} pages for {snapshot.kv.num_pages} KV pages")
    needed, capacity = distinct_token_count(snapshot.prefix), _internals.pool_capacity(scheduler)
    if needed > capacity:
        raise IncompatibleSnapshotError(f"kv: the snapshot needs {needed} KV slots, the engine's pool has {capacity}")


def restore_state(scheduler, snapshot: Snapshot) -> None:
    """Make the engine hold exactly the snapshot's weights (if carried) and prefix cache."""
    check_restore(scheduler, snapshot)
    apply_restore(scheduler, snapshot)


def check_restore(scheduler, snapshot: Snapshot) -> None:
    """Everything restore_state checks before it changes anything: an idle engine, a snapshot it can take."""
    if not _internals.is_idle(scheduler):
        raise EngineBusyError("the engine has requests in flight; restore into an idle engine")
    check_restorable(scheduler, snapshot)


def apply_restore(scheduler, snapshot: Snapshot) -> None:
    """restore_state's changes, once check_restore has passed."""
    if _loads_weights(scheduler, snapshot):
        restore_weights(scheduler, snapshot)
    if not _internals.flush(scheduler):
        raise EngineBusyError("SGLang refused to flush its cache")
    if snapshot.kv is not None:
        try:
            _rebuild_tree(scheduler, snapshot)
        except BaseException:
            # The tree is inserted before its KV is written, and a scatter reading the client's memory can fail
            # partway (the sender's pages gone: EFAULT): flushed, no prefix is served from stale or partial slots.
            _internals.flush(scheduler)
            raise


def _rebuild_tree(scheduler, snapshot: Snapshot) -> None:
    """Insert every leaf chain through SGLang's own tree insert, then write all new slots' KV at once.

    SGLang's tree holds whole pages of its own page size only (its allocator hands out whole pages): of each
    chain, the tokens that fill whole pages are restored, and a resumed request recomputes the rest."""
    page = _internals.engine_page_size(scheduler)
    rows, slots = [], []
    for sequence in leaf_sequences(snapshot.prefix, snapshot.kv.page_size):
        held = len(sequence.tokens) // page * page
        if not held:
            continue
        tokens = sequence.tokens[:held]
        owned = _internals.match(scheduler, tokens)
        fresh = _internals.allocate(scheduler, held - len(owned))
        _internals.insert(scheduler, tokens, torch.cat([owned, fresh]), owned_prefix=len(owned))
        rows.append(sequence.rows[len(owned) : held])
        slots.append(fresh)
    if slots:
        k_buffers, v_buffers = _internals.kv_buffers(scheduler)
        scatter_rows(snapshot.kv, k_buffers, v_buffers, torch.cat(rows), torch.cat(slots),
                     tensor_parallel.share(scheduler))
