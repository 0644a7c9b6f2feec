"""thaw's errors across vLLM's process boundaries, as plain data.

In vLLM's default multiprocessing mode the client, the engine core and the workers are separate processes, and
vLLM turns an exception in a callee into a plain Exception (a utility call from the client) or a RuntimeError
(a collective_rpc from the engine core) carrying only its text. Worse, a collective_rpc reads its ranks' replies
in order and raises at the first failure, leaving the other ranks' replies queued: each later call on every rank
would then read the reply of the call before it (a tensor-parallel capture sealing pages a rank is still
writing). So a callee never raises through vLLM: it returns any exception as {"error": {"type", "message"}}, and
the caller, once it has read every rank's reply, raises it again: a snapshot's own error (a corrupt chunk, an
incompatible layout) as the thaw_format error it was, which a caller must be able to catch by class; a builtin
one as its class; any other as a RuntimeError naming its type (its text kept whole: lent.sending matches a
remote read's refusal in it).
"""

from __future__ import annotations

import builtins
import functools

from thaw_format import errors


def as_data(fn):
    """Wrap a callee: an Exception it raises is returned as {"error": ...} instead."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            return {"error": {"type": type(exc).__name__, "message": _text(exc)}}

    return call


def _text(exc: Exception) -> str:
    """The message an exception was raised with (its str where that is not one string: an OSError's errno)."""
    return exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)


def is_error(result) -> bool:
    """Whether a callee returned an error as data."""
    return isinstance(result, dict) and result.get("error") is not None


def unwrap(result):
    """A callee's result; an error it returned as data is raised (see the module's docstring for its class)."""
    if not is_error(result):
        return result
    kind, message = result["error"]["type"], result["error"]["message"]
    snapshot_error = getattr(errors, kind, None)
    if isinstance(snapshot_error, type) and issubclass(snapshot_error, errors.SnapshotError):
        raise snapshot_error(message)
    builtin = getattr(builtins, kind, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        raise builtin(message)
    raise RuntimeError(f"{kind}: {message}")


def unwrap_each(replies: list) -> list:
    """Every rank's result of a collective_rpc, once every rank's reply is read; the first error any rank
    returned is raised."""
    return [unwrap(reply) for reply in replies]


def unwrap_all(replies: list):
    """The first rank's result of a collective_rpc (unwrap_each)."""
    return unwrap_each(replies)[0]
