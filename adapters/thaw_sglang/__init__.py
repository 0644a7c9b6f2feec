"""thaw for SGLang: capture, restore and fork a live SGLang engine (tested with SGLang 0.5.23 on CPU).

    engine = SGLangEngine.start(model_path=..., **sglang_engine_arguments)   # the adapter contract
    parent = ThawEngine(model_path=..., **sglang_engine_arguments)          # or ThawEngine(sglang.Engine, path, ...)
    parent.generate(input_ids=..., sampling_params=...)
    children = parent.fork(n=4)          # four new engines, each holding the parent's prefix cache
    snapshot = capture(parent)           # a thaw_format.Snapshot; restore(engine, snapshot) loads one
    resume(engine, snapshot)             # continue the requests that were waiting or running
    parent.pause(); capture(parent)      # running requests held where they stopped (parent.unpause() goes on)

A snapshot names its weights by the checkpoint's digest (spec 5.1), as every adapter does, so the KV of one
engine restores into another serving the same checkpoint.

The contract class is in `engine.py`, the sglang.Engine subclass in `thaw_engine.py`; the scheduler-side work
lives in `capture.py` / `restore.py`; every private SGLang internal in `_internals.py`.
"""

from thaw_format.extras import require

require("sglang", "sglang", "thaw_sglang")  # before the modules that import it, so the error names the extra

from .engine import SGLangEngine
from .thaw_engine import ThawEngine, capture, restore, resume

__all__ = ["SGLangEngine", "ThawEngine", "capture", "restore", "resume"]
