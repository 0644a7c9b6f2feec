"""Calling a scheduler method by name and getting its outcome back through a small JSON file.

`Engine.collective_rpc` returns nothing and flattens any failure into an AssertionError message, so each
thaw scheduler method writes {"value": JSON} or {"error": class name, "message": ...} to `result_path`, and
the calling side returns the value or raises the same thaw_format error class again. No pickle either way.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import thaw_format

# Errors that keep their class across the process boundary; anything else arrives as a RuntimeError.
_KNOWN_ERRORS = {
    cls.__name__: cls
    for cls in (
        thaw_format.SnapshotError,
        thaw_format.CorruptSnapshotError,
        thaw_format.UnsupportedVersionError,
        thaw_format.IncompatibleSnapshotError,
    )
}


def report(result_path: str, work: Callable[[], Any]) -> None:
    """Scheduler side: run `work`, and record what it returned (plain JSON) or raised."""
    try:
        outcome = {"value": work()}
    except Exception as exc:  # reported to the caller, who raises it again
        outcome = {"error": type(exc).__name__, "message": str(exc)}
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(outcome, f)


def call(engine, method: str, **params) -> Any:
    """Engine side: call scheduler `method`; return what it returned, or raise what it raised."""
    fd, result_path = tempfile.mkstemp(prefix="thaw-sglang-", suffix=".json")
    os.close(fd)
    try:
        engine.collective_rpc(method, result_path=result_path, **params)
        with open(result_path, encoding="utf-8") as f:
            outcome = json.load(f)
    finally:
        os.unlink(result_path)
    if "error" not in outcome:
        return outcome["value"]
    error = _KNOWN_ERRORS.get(outcome["error"])
    if error is None:
        raise RuntimeError(f"{method} failed in the SGLang scheduler: {outcome['error']}: {outcome['message']}")
    raise error(outcome["message"])
