"""Calling a scheduler method by name and getting its outcome back through a small shared-memory block.

`Engine.collective_rpc` returns nothing and flattens any failure into an AssertionError message, so the caller
keeps a block of RESULT_BYTES per engine and each thaw scheduler method writes into it the length and JSON
of {"value": ...} or {"error": class name, "message": ...}; the calling side returns the value or raises the
error again (thaw_format.sdk.error_data says as what). No file and no pickle either way; snapshots themselves
travel as sources (thaw_format.sdk.shared), of which only the name passes through here.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import weakref
from multiprocessing import shared_memory
from typing import Any, Callable

from thaw_format.sdk import error_data
from thaw_format.sdk.shared import open_segment

RESULT_BYTES = 1 << 16
_LENGTH = struct.Struct("<I")


def report(result: str, work: Callable[[], Any]) -> None:
    """Scheduler side: run `work`, and record what it returned (plain JSON) or raised in the block `result`."""
    try:
        outcome = {"value": work()}
    except Exception as exc:  # reported to the caller, who raises it again
        kind, message = error_data.as_data(exc)
        outcome = {"error": kind, "message": message}
    encoded = json.dumps(outcome).encode()
    if len(encoded) > RESULT_BYTES - _LENGTH.size:  # an error's message is what can grow: keep its head
        encoded = json.dumps({"error": outcome.get("error", "RuntimeError"),
                              "message": str(outcome.get("message", "a result too large"))[: RESULT_BYTES // 8]}).encode()
    fd = open_segment(result, os.O_RDWR)  # the caller's block, tracked and unlinked by the caller
    try:
        with mmap.mmap(fd, RESULT_BYTES) as block:
            block[_LENGTH.size : _LENGTH.size + len(encoded)] = encoded
            _LENGTH.pack_into(block, 0, len(encoded))
    finally:
        os.close(fd)


def _block(engine) -> shared_memory.SharedMemory:
    """The engine's result block, created on its first call and reused by every later one (a fresh block per call
    cost a create, two resource-tracker messages and an unlink: milliseconds on a busy machine); unlinked with
    the engine, or by the resource tracker if this process dies."""
    block = engine.__dict__.get("_thaw_rpc_block")
    if block is None:
        block = engine._thaw_rpc_block = shared_memory.SharedMemory(create=True, size=RESULT_BYTES)
        weakref.finalize(engine, _release, block)
    return block


def _release(block: shared_memory.SharedMemory) -> None:
    block.close()
    block.unlink()


def call(engine, method: str, **params) -> Any:
    """Engine side: call scheduler `method`; return what it returned, or raise what it raised. One call at a time
    per engine, as SGLang's collective_rpc itself."""
    block = _block(engine)
    _LENGTH.pack_into(block.buf, 0, 0)  # so that a call whose method wrote nothing reads as such
    engine.collective_rpc(method, result=block.name, **params)
    (length,) = _LENGTH.unpack_from(block.buf, 0)
    if not length:
        raise RuntimeError(f"{method}: the SGLang scheduler answered nothing")
    outcome = json.loads(bytes(block.buf[_LENGTH.size : _LENGTH.size + length]))
    if "error" not in outcome:
        return outcome["value"]
    raise error_data.rebuilt(outcome["error"], outcome["message"], where=f"{method} failed in the SGLang scheduler: ")
