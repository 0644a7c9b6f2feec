"""Progress bars for long reads and writes: tqdm (the `thaw[cli]` extra), on stderr, when stdout is a terminal.

Every command-line tool of the project gets its bar here; the reader and writer take the returned callable as
their `progress` hook (called with the bytes done since the last call).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Optional


@contextmanager
def progress_bar(label: str, total: int) -> Iterator[Optional[Callable[[int], None]]]:
    """A byte-counting bar, or None when stdout is not a terminal or tqdm is not installed (no bar then)."""
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    # sys.stdout or sys.stderr is None when the command started with that descriptor closed (`>&-`, `2>&-`)
    if tqdm is None or total <= 0 or sys.stdout is None or sys.stderr is None or not sys.stdout.isatty():
        yield None
        return
    # leave=False: the bar disappears when done, so only the command's own result stays on the screen
    with tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              leave=False, mininterval=0.2) as bar:
        yield bar.update
