"""thaw_mlx: snapshot, restore and fork mlx-lm sessions (model + prompt cache + tokens). Never imports torch.

    snap = thaw_mlx.capture(model, prompt_cache, tokens)      # a thaw_format.Snapshot; save with thaw_format.save
    cache = thaw_mlx.restore(model, snap)                     # refuses another model or layout, changes nothing
    for token in thaw_mlx.generate(model, cache, thaw_mlx.snapshot_tokens(snap), 16): ...
"""

from . import _internals  # noqa: F401  (refuses an untested mlx-lm at import)
from .generate import generate, greedy
from .identity import load_model, model_config, model_info, model_weights
from .session import capture, fork, restore, snapshot_num_computed, snapshot_tokens

__all__ = [
    "capture", "fork", "generate", "greedy", "load_model", "model_config", "model_info", "model_weights", "restore",
    "snapshot_num_computed", "snapshot_tokens",
]
