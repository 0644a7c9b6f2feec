"""The one check every adapter's `_internals.py` makes at import: the engine is a version its private internals
were tested with. A version is named exactly ("0.32.0") or by a prefix ending in a dot ("5.24.")."""

from __future__ import annotations

from typing import Sequence


def require_tested(adapter: str, package: str, version: str, tested: Sequence[str]) -> None:
    """Raise ImportError, naming both versions and where to add one, unless `version` is among `tested`."""
    release = version.split("+")[0]  # a local build tag ("+cpu") is the same release
    if any(release == t or (t.endswith(".") and release.startswith(t)) for t in tested):
        return
    names = " or ".join(t + "x" if t.endswith(".") else t for t in tested)
    raise ImportError(f"{adapter} reaches into {package} internals tested with {package} {names} only; this is "
                      f"{package} {version}: test it and add it to {adapter}/_internals.py before using it")
