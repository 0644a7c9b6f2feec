"""thaw_transformers: Hugging Face transformers as a thaw engine, the reference implementation of the adapter
contract (thaw_format.sdk.contract). Read engine.py first.

    from thaw_transformers import TransformersEngine
    from thaw_format.sdk import greedy
    engine = TransformersEngine.start(checkpoint_dir)        # device="cuda" on a GPU
    engine.generate(prompt_ids, greedy(8))                   # Generation(token_ids, cached_tokens, logprobs)
    thaw_format.save(engine.capture(), "s.thaw")
    TransformersEngine.start(checkpoint_dir).restore(thaw_format.load("s.thaw"))
"""

from thaw_format.extras import require

require("torch", "transformers", "thaw_transformers")  # before the modules that import them, so the error
require("transformers", "transformers", "thaw_transformers")  # names the extra

from . import _internals  # noqa: F401  (refuses an untested transformers at import)
from .engine import TransformersEngine

__all__ = ["TransformersEngine"]
