"""Bulk work with Python's cyclic garbage collector paused.

Reading or writing N tensors makes a few container objects per tensor (JSON entries, regions, views,
tensors) that live until the call returns, none in a reference cycle. The collector counts them: every 700
starts a young collection, and as they pile up it runs full collections, each walking every object the
process holds, which with torch imported is 10^5-10^6. Measured on 20,000 small tensors: 3-4 full
collections per load, costing 3-4 times the load itself. Pausing the collector for the call removes that
and frees nothing later than it would have been: the objects are in use, and the reference counts release
them as before.
"""

from __future__ import annotations

import functools
import gc


def gc_paused(fn):
    """Run fn with the collector disabled, and enable it again after if it was enabled before.

    A nested call, or a caller who disabled the collector, leaves it as found. The flag is process-wide: a
    thread that enables or disables the collector during the call may have its choice undone at the end.
    """

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()

    return paused
