"""Where thaw_conformance runs from: a repository checkout, or a package installed without one.

In a checkout the engine virtualenvs (scripts/setup-*.sh), the caches and spec/vectors lie beside the package;
installed (`pip install thaw[mlx]`), none of them exist, and the suite uses the current interpreter, the user's
cache directory and the golden vectors shipped inside the package.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

_ROOT = Path(__file__).resolve().parents[2]
CHECKOUT: Optional[Path] = _ROOT if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "spec").is_dir() else None


def cache_dir() -> Path:
    """`<checkout>/.cache` (ignored by git), else `$XDG_CACHE_HOME/thaw` (default ~/.cache/thaw)."""
    if CHECKOUT is not None:
        return CHECKOUT / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "thaw"
