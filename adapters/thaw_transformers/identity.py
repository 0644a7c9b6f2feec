"""Which model the engine serves: a Hugging Face checkpoint loaded with transformers, its identity, its weights
and the layout of its cache.

The identity is the checkpoint's (spec 5.1: thaw_format.checkpoint_model_info over config.json and
checkpoint_weights_digest over its *.safetensors), the same values vLLM, SGLang and MLX write for the same
files, so that snapshots cross engines. Weights are captured under transformers' parameter names.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from transformers import AutoModelForCausalLM

from thaw_format import (
    IncompatibleSnapshotError,
    ModelInfo,
    Tensor,
    checkpoint_model_info,
    checkpoint_weights_digest,
    weights_digest,
)
from thaw_format.torch import from_torch, to_torch

from . import _internals
from .pages import LayerLayout


def load(checkpoint: str | os.PathLike, dtype: str = "float32", device: str = "cpu") -> torch.nn.Module:
    """The checkpoint's model with transformers, in `dtype` on `device`, ready for inference."""
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(torch_dtype, torch.dtype):  # getattr alone raised AttributeError naming torch, not dtype=
        raise ValueError(f"dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16', 'float16')")
    config = Path(checkpoint) / "config.json"
    if not config.is_file():  # else transformers takes the path for a Hub repo id and names that instead
        raise FileNotFoundError(errno.ENOENT, "not a Hugging Face checkpoint directory (no config.json; a Hub id "
                                "must be downloaded first, e.g. with huggingface_hub.snapshot_download)", str(config))
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype).to(device).eval()


def model_info(model: torch.nn.Module, checkpoint: str | os.PathLike | None = None) -> ModelInfo:
    """The identity of the checkpoint directory the model was loaded from (spec 5.1); without one (a model built
    in memory), of its own config and parameters, which no other engine shares."""
    dtype = str(model.dtype).removeprefix("torch.")
    if checkpoint is not None:
        config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
        return checkpoint_model_info(config, dtype, checkpoint_weights_digest(checkpoint))
    return checkpoint_model_info(model.config.to_dict(), dtype, weights_digest(model_weights(model)))


def layouts_of(model: torch.nn.Module) -> list[LayerLayout]:
    """Each layer's cache layout, read from the cache of a one-token forward (whatever the architecture)."""
    cache = _internals.new_cache(model.config)
    with torch.inference_mode():
        _internals.forward(model, torch.zeros((1, 1), dtype=torch.long, device=model.device), cache)
    mla = getattr(model.config, "kv_lora_rank", None) is not None  # DeepSeek: the cache holds latents
    layouts = []
    for i in range(len(cache.layers)):
        keys, values = _internals.layer_kv(cache, i)
        layouts.append(LayerLayout("mla" if mla else "attention", keys.shape[1], keys.shape[3], values.shape[3],
                                   _internals.sliding_window(cache, i)))
    return layouts


def model_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every parameter under its transformers name (a tied weight once), sharing memory on the CPU."""
    return {name: from_torch(p) for name, p in model.named_parameters()}


def check_weights(model: torch.nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Refuse weights that are not exactly the model's parameters by name, dtype and shape."""
    params = dict(model.named_parameters())
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise IncompatibleSnapshotError(f"weights: missing {missing[:3]}, unknown {extra[:3]} (of {len(params)})")
    for name, p in params.items():
        t = tensors[name]
        if getattr(torch, t.dtype, None) is not p.dtype or tuple(t.shape) != tuple(p.shape):
            raise IncompatibleSnapshotError(f"weights/{name}: the snapshot has {t.dtype}{list(t.shape)}, the model "
                                            f"{str(p.dtype).removeprefix('torch.')}{list(p.shape)}")


def load_weights(model: torch.nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy checked weights into the model's parameters, in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(to_torch(tensors[name]))
