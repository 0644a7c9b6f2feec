"""Import an engine for a test, or skip with a reason; in CI a missing engine is a failure, not a skip.

CI sets THAW_REQUIRE_ENGINES=1 so that an engine which failed to install cannot turn its tests into
silent skips.
"""

import importlib
import os
from pathlib import Path

import pytest


def require(module: str, why: str = ""):
    """Return the imported module, or skip (fail under THAW_REQUIRE_ENGINES=1) naming what is missing."""
    try:
        imported = importlib.import_module(module)
        if getattr(imported, "__file__", None) is None and all(_in_tests(folder) for folder in imported.__path__):
            # With tests/ on sys.path, `vllm` where vLLM is absent is the namespace package of the tests/vllm folder
            # (an installed namespace package, such as langgraph, has folders outside tests/)
            raise ImportError(f"only the folder {', '.join(dict.fromkeys(imported.__path__))} has that name")
        return imported
    except Exception as exc:  # an engine can fail at import for reasons other than absence
        reason = f"{module} is not importable here ({type(exc).__name__}: {exc})"
        if why:
            reason += f"; {why}"
        if os.environ.get("THAW_REQUIRE_ENGINES") == "1":
            pytest.fail(f"THAW_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def _in_tests(folder: str) -> bool:
    return Path(folder).resolve().is_relative_to(Path(__file__).resolve().parent)
