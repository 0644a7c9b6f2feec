"""thaw's errors across vLLM's process boundaries, as plain data.

In vLLM's default multiprocessing mode the client, the engine core and the workers are separate processes, and
vLLM turns an exception in a callee into a plain Exception (a utility call from the client) or a RuntimeError
(a collective_rpc from the engine core) carrying only its text. Worse, a collective_rpc reads its ranks' replies
in order and raises at the first failure, leaving the other ranks' replies queued: each later call on every rank
would then read the reply of the call before it (a tensor-parallel capture sealing pages a rank is still
writing). So a callee never raises through vLLM: it returns any exception as {"error": {"type", "message"}}, and
the caller, once it has read every rank's reply, raises it again (thaw_format.sdk.error_data says as what).
"""

from __future__ import annotations

import functools

from thaw_format.sdk import error_data


def as_data(fn):
    """Wrap a callee: an Exception it raises is returned as {"error": ...} instead."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            kind, message = error_data.as_data(exc)
            return {"error": {"type": kind, "message": message}}

    return call


def is_error(result) -> bool:
    """Whether a callee returned an error as data."""
    return isinstance(result, dict) and result.get("error") is not None


def unwrap(result):
    """A callee's result; an error it returned as data is raised (see the module's docstring for its class)."""
    if not is_error(result):
        return result
    raise error_data.rebuilt(result["error"]["type"], result["error"]["message"])


def unwrap_each(replies: list) -> list:
    """Every rank's result of a collective_rpc, once every rank's reply is read; the first error any rank
    returned is raised."""
    return [unwrap(reply) for reply in replies]


def unwrap_all(replies: list):
    """The first rank's result of a collective_rpc (unwrap_each)."""
    return unwrap_each(replies)[0]
