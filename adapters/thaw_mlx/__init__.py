"""thaw_mlx: snapshot, restore and fork mlx-lm sessions (model + prompt cache + tokens). Never imports torch.

    snap = thaw_mlx.capture(model, prompt_cache, tokens)      # a thaw_format.Snapshot; save with thaw_format.save
    cache = thaw_mlx.restore(model, snap)                     # refuses another model or layout, changes nothing
    thaw_mlx.save(path, model, prompt_cache, tokens)          # capture + save in one pass over the KV
    cache, snap = thaw_mlx.load(path, model)                  # load + restore, each KV chunk checked as it moves
    tokens, sampler = thaw_mlx.snapshot_tokens(snap), thaw_mlx.sampler_of(snap)
    for token in thaw_mlx.generate(model, cache, tokens, 16, sampler=sampler): ...

A model loaded from a Hugging Face checkpoint is identified by that checkpoint, as vLLM and SGLang identify it,
so that snapshots cross engines: `info = thaw_mlx.model_info(model, checkpoint=path)` once, then
`capture(..., info=info)` and `restore(..., info=info)`.

`thaw_mlx.MLXEngine` is the adapter contract (thaw_format.sdk.contract) over a model and its sessions:
`MLXEngine.start(checkpoint=path)`, then generate / capture / restore / finish / fork as on every engine.
"""

from thaw_format.extras import require

require("mlx_lm", "mlx", "thaw_mlx")  # before the modules that import it, so the error names the extra

from . import _internals  # noqa: F401  (refuses an untested mlx-lm at import)
from .engine import MLXEngine, SessionsNotHeld
from .files import load, save
from .generate import generate, greedy
from .identity import load_model, model_config, model_info, model_weights
from .pages import num_cached_tokens
from .sampling import Sampler, sampler_of
from .session import capture, fork, restore, snapshot_num_computed, snapshot_tokens

__all__ = [
    "MLXEngine", "Sampler", "capture", "fork", "generate", "greedy", "load", "load_model", "model_config", "model_info", "model_weights",
    "num_cached_tokens", "restore", "sampler_of", "save", "SessionsNotHeld", "snapshot_num_computed",
    "snapshot_tokens",
]
