"""Optional dependencies: importing one that is not installed names the `pip install` extra that brings it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """Import `module`, or raise MissingExtraError saying `pip install 'thaw[extra]'` for `needed_by`."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or module.split(".")[0] != exc.name.split(".")[0]:
            raise  # the module is there but something it imports is broken: that error says more
        raise MissingExtraError(f"{needed_by} needs {module.split('.')[0]}, which is not installed here: "
                                f"pip install 'thaw[{extra}]'", name=exc.name) from exc
