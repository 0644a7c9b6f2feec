"""An exception as plain data, and back: how an adapter's processes tell each other that a call failed.

An exception is never pickled between processes: its class may not be importable there, or not rebuilt from its
args (mover.RemoteReadError takes five), and a pickle is no protocol. It travels as (class name, message). The
receiver raises a snapshot's own error (a corrupt chunk, an incompatible layout, a capture refused for weights it
cannot name: UnknownWeightsError) as the thaw_format error it was, which a caller must be able to catch by class; a
builtin one as its class; any other as a RuntimeError naming its class, its text kept whole (lent.sending matches a
remote read's refusal, mover.RemoteReadError.REFUSED, in it).
"""

from __future__ import annotations

import builtins

from thaw_format import errors


MESSAGE_HEAD = 16 * 1024  # characters of a message sent: its head, where a refusal's REFUSED text sits


def as_data(exc: BaseException) -> tuple[str, str]:
    """(class name, the message it was raised with: its str where that is not one string, an OSError's errno), the
    message cut to its first MESSAGE_HEAD characters; never raises, whatever the exception's str does."""
    kind = type(exc).__name__
    try:
        message = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    except Exception:  # noqa: BLE001 - a str that raises must not stop the failure from being sent
        message = f"<unprintable {kind}>"
    return kind, message[:MESSAGE_HEAD]


def rebuilt(kind, message, where: str = "") -> Exception:
    """The exception `as_data` described, to raise again (`where`: a prefix for one that becomes a RuntimeError);
    always an exception, whatever the data (a peer's data is not trusted to be well formed)."""
    if not isinstance(kind, str) or not isinstance(message, str):
        return RuntimeError(f"{where}malformed error data")
    snapshot_error = getattr(errors, kind, None)
    builtin = getattr(builtins, kind, None)
    try:
        if isinstance(snapshot_error, type) and issubclass(snapshot_error, errors.SnapshotError):
            return snapshot_error(message)
        if isinstance(builtin, type) and issubclass(builtin, Exception):
            return builtin(message)
    except TypeError:  # a class not built from one message (UnicodeDecodeError takes five)
        pass
    return RuntimeError(f"{where}{kind}: {message}")
