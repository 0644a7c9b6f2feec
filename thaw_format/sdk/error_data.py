"""An exception as plain data, and back: how an adapter's processes tell each other that a call failed.

An exception is never pickled between processes: its class may not be importable there, or not rebuilt from its
args (mover.RemoteReadError takes five), and a pickle is no protocol. It travels as (class name, message). The
receiver raises a snapshot's own error (a corrupt chunk, an incompatible layout) as the thaw_format error it was,
which a caller must be able to catch by class; a builtin one as its class; any other as a RuntimeError naming its
class, its text kept whole (lent.sending matches a remote read's refusal, mover.RemoteReadError.REFUSED, in it).
"""

from __future__ import annotations

import builtins

from thaw_format import errors


def as_data(exc: BaseException) -> tuple[str, str]:
    """(class name, the message it was raised with: its str where that is not one string, an OSError's errno)."""
    message = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    return type(exc).__name__, message


def rebuilt(kind: str, message: str, where: str = "") -> Exception:
    """The exception `as_data` described, to raise again (`where`: a prefix for one that becomes a RuntimeError)."""
    snapshot_error = getattr(errors, kind, None)
    if isinstance(snapshot_error, type) and issubclass(snapshot_error, errors.SnapshotError):
        return snapshot_error(message)
    builtin = getattr(builtins, kind, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin(message)
    return RuntimeError(f"{where}{kind}: {message}")
