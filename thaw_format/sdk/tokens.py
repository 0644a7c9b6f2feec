"""Token-id helpers every adapter's prefix cache needs."""

from __future__ import annotations

import operator
import reprlib
from typing import Sequence


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _token(t) -> int:
    if isinstance(t, bool):
        raise TypeError
    return operator.index(t)


def token_ids(ids, what: str) -> list[int]:
    """`ids` (a list, numpy array, ...) as a list of ints; TypeError naming `what` for anything else: a str, an
    int, a float that int() would have cut to another token, or a bool (an int to operator.index)."""
    try:
        if isinstance(ids, (str, bytes)):
            raise TypeError
        return [_token(t) for t in ids]
    except TypeError:
        raise TypeError(f"{what} is a sequence of token ids (whole numbers), not {type(ids).__name__} "
                        f"{reprlib.repr(ids)}") from None
