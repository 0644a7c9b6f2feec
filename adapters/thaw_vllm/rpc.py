"""thaw_format's errors across vLLM's process boundaries, as plain data.

In vLLM's default multiprocessing mode the client, the engine core and the worker are three processes, and
vLLM turns an exception in a callee into a plain Exception (a utility call from the client) or a RuntimeError
(a collective_rpc from the engine core) carrying only its text. A snapshot's own error (a corrupt chunk, an
incompatible layout) is what a caller must be able to catch by class, so the callee returns it as
{"error": {"type", "message"}} and the caller raises it again as the thaw_format error it was.
"""

from __future__ import annotations

import functools

from thaw_format import errors


def as_data(fn):
    """Wrap a callee: a thaw_format SnapshotError it raises is returned as {"error": ...} instead."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except errors.SnapshotError as exc:
            return {"error": {"type": type(exc).__name__, "message": exc.args[0] if exc.args else str(exc)}}

    return call


def unwrap(result):
    """A callee's result; an error it returned as data is raised as its own class (SnapshotError if unknown)."""
    error = result.get("error") if isinstance(result, dict) else None
    if error is None:
        return result
    kind = getattr(errors, error["type"], None)
    if not (isinstance(kind, type) and issubclass(kind, errors.SnapshotError)):
        kind = errors.SnapshotError
    raise kind(error["message"])
