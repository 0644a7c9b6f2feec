"""Durable agent threads: a thread's KV saved after each turn, and restored when the thread resumes in an
engine that no longer holds it (evicted, or a new process), so the next turn prefills only its new tokens.

A saved snapshot is used only if it is this thread's (its recorded thread id), fits this engine (the
adapter's own identity and layout check: model, dtype, page size) and its saved tokens begin the new prompt
for at least one page; otherwise the turn prefills as usual and the reason is logged. Restored KV is keyed by
token ids, so even a wrongly chosen snapshot could cost a cache miss, never a wrong token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import thaw_format
from thaw_format import IncompatibleSnapshotError, SnapshotError
from thaw_format.sdk.contract import lineage_now

from .chat_tokens import Prompt
from .engine_loop import EngineLoop, shared_prefix
from .thread_store import ThreadStore

log = logging.getLogger(__name__)
KEY = "thaw_langgraph"  # snapshot.metadata[KEY] = {"thread_id": ..., "text": ..., "token_ids": [...]}


@dataclass
class SavedThread:
    snapshot: thaw_format.Snapshot
    history: Prompt  # the prompt and reply of the turn it was saved after


def load(loop: EngineLoop, store: ThreadStore, thread_id: str) -> Optional[SavedThread]:
    """The thread's snapshot if it is this thread's and fits the engine; else None (and why, in the log)."""
    try:
        snapshot = store.load(thread_id)
    except SnapshotError as exc:  # damaged or unreadable: prefill instead
        return _refused(thread_id, f"unreadable: {exc}")
    if snapshot is None:
        return None
    recorded = snapshot.metadata.get(KEY, {})
    if recorded.get("thread_id") != thread_id:
        return _refused(thread_id, f"foreign: it records thread {recorded.get('thread_id')!r}")
    if snapshot.kv is None or snapshot.prefix is None:
        return _refused(thread_id, "it holds no KV pages")
    try:
        loop.call(lambda engine: engine.check(snapshot))
    except IncompatibleSnapshotError as exc:
        return _refused(thread_id, f"incompatible with this engine: {exc}")
    return SavedThread(snapshot, Prompt(recorded["text"], list(recorded["token_ids"])))


def resume(loop: EngineLoop, saved: SavedThread, thread_id: str, prompt: Sequence[int]) -> str:
    """Make the engine hold the saved pages that begin `prompt`: "resident" if it already does, else
    "restored" (a restore needs an idle engine: it waits for requests in flight), or "stale"."""
    page = saved.snapshot.kv.page_size
    pages = len(shared_prefix([saved.history.ids, list(prompt)])) // page
    if pages == 0:
        _refused(thread_id, "stale: the thread's prompt no longer begins with the saved tokens")
        return "stale"
    chain = list(prompt[: pages * page])

    def restore_unless_held(engine) -> str:
        held = engine.capture(include_weights=False, chains=[chain]).prefix
        if held is not None and sum(len(tokens) for tokens in held.tokens) >= len(chain):
            return "resident"
        engine.restore(saved.snapshot)
        return "restored"

    status = loop.call(restore_unless_held, idle=True)
    log.info("thread %r: %d saved KV pages %s", thread_id, pages, status)
    return status


def save(loop: EngineLoop, store: ThreadStore, thread_id: str, history: Prompt) -> None:
    """Save the engine's cached pages of `history` (a turn's prompt and reply) as the thread's snapshot."""
    snapshot = loop.call(lambda engine: engine.capture(include_weights=False, chains=[history.ids]))
    snapshot.metadata[KEY] = {"thread_id": thread_id, "text": history.text, "token_ids": history.ids}
    snapshot.lineage = thaw_format.Lineage(label=f"thread {thread_id}", created=lineage_now())
    store.save(thread_id, snapshot)


def _refused(thread_id: str, reason: str) -> None:
    log.warning("thread %r: saved KV not used, the turn prefills (%s)", thread_id, reason)
    return None
