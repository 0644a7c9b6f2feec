"""The ids an adapter gives the requests it is submitted: `prefix-0`, `prefix-1`, ..., skipping any id a request in
flight holds (a restored request keeps the id of its snapshot, which may be one this engine's count names next)."""

from __future__ import annotations

import itertools
from typing import Container


class RequestIds:
    """Fresh request ids for one engine: `ids.fresh(in_use)` is the next `prefix-n` not in `in_use`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._count = itertools.count()

    def fresh(self, in_use: Container[str]) -> str:
        return next(i for i in (f"{self.prefix}-{n}" for n in self._count) if i not in in_use)
