"""What a snapshot must match in an SGLang engine: the model, and the KV layout."""

from __future__ import annotations

import sglang
from thaw_format import EngineInfo, ModelInfo, check_kv_layout, checkpoint_model_info

from . import _internals, tensor_parallel


def model_info(scheduler, weights_digest: str | None = None) -> ModelInfo:
    """The checkpoint identity every adapter computes alike (thaw_format.checkpoint_model_info)."""
    return checkpoint_model_info(_internals.hf_config(scheduler), _internals.model_dtype(scheduler), weights_digest)


def engine_info(scheduler) -> EngineInfo:
    share = tensor_parallel.share(scheduler)
    ranks = ("" if share.whole else
             f"; each of {share.ranks} ranks holds {share.heads} of the {share.total_heads} KV heads")
    return EngineInfo(
        name="sglang",
        version=sglang.__version__,
        attention_backend=_internals.attention_backend(scheduler),
        native_kv_layout=f"per-layer token slots [slot, kv_heads, head_dim]{ranks}",
        extra={"page_size": _internals.engine_page_size(scheduler)},
    )


def check_kv(scheduler, snapshot) -> None:
    """Refuse KV this engine's pool cannot hold: layer count, dtype, heads (all ranks' together) and head size."""
    k_buffers, _ = _internals.kv_buffers(scheduler)
    share = tensor_parallel.share(scheduler)
    check_kv_layout(
        snapshot,
        num_layers=len(k_buffers),
        dtype=str(k_buffers[0].dtype).removeprefix("torch."),
        num_kv_heads=share.total_heads,
        head_dim=share.head_dim,
    )
