"""The package's version, written once (pyproject.toml's `version`), never copied into the code.

Run from a checkout (pyproject.toml of the `thaw` project beside the package: a clone, or an editable install),
that file says it, whatever another copy installed in the environment says; installed, the distribution's
metadata does (importlib.metadata); neither, it is "unknown".
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def package_version() -> str:
    from_checkout = _checkout_version(_PYPROJECT)
    if from_checkout is not None:
        return from_checkout
    try:
        return metadata.version("thaw")
    except metadata.PackageNotFoundError:
        return "unknown"


def _checkout_version(pyproject: Path) -> str | None:
    """The [project] table's version in the thaw project's pyproject.toml, or None (no such file, another project).
    Read by pattern, not tomllib, which Python 3.10 lacks; the file is ours and keeps these lines simple."""
    try:
        text = pyproject.read_text(encoding="utf-8")
    except OSError:
        return None
    table = re.search(r"(?ms)^\[project\]\s*$(.*?)(?=^\[|\Z)", text)
    name = re.search(r'(?m)^name\s*=\s*"([^"]*)"', table.group(1)) if table else None
    version = re.search(r'(?m)^version\s*=\s*"([^"]*)"', table.group(1)) if table else None
    return version.group(1) if name and name.group(1) == "thaw" and version else None
