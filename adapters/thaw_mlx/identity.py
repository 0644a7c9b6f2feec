"""Which model a snapshot belongs to: the config and weights of an mlx-lm model, and a model rebuilt from them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from thaw_format import (
    IncompatibleSnapshotError,
    ModelInfo,
    Snapshot,
    Tensor,
    check_model,
    checkpoint_model_info,
    checkpoint_weights_digest,
    config_digest,
)
from thaw_format import weights_digest as digest_of
from thaw_format.compat import expect_snapshot
from thaw_format.mlx import dtype_name, from_mlx, to_mlx

from . import _internals


def model_config(model: nn.Module) -> dict:
    """The model's ModelArgs as plain JSON: every field the model was built with, defaults included."""
    return json.loads(json.dumps(dataclasses.asdict(model.args)))


def checkpoint_config(config: dict) -> dict:
    """What model_config gives for a model built from this config.json dict, without building it."""
    _, args_class = _internals.model_classes(config)
    return json.loads(json.dumps(dataclasses.asdict(args_class.from_dict(config))))


def model_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter under its mlx-lm name, sharing the model's memory."""
    return {name: from_mlx(array) for name, array in tree_flatten(model.parameters())}


def model_dtype(model: nn.Module) -> str:
    """The dtype of the first floating-point parameter (in model.parameters() order): what the model computes in.
    The module tree is walked only as far as that parameter, since every restore asks (parameters() builds the
    whole tree: 0.9 ms for a 24-layer Qwen2 against 5 µs so, on this project's 2-CPU host at load 4.8)."""
    found = _first_floating(model)
    if found is None:
        raise ValueError("the model has no floating-point parameters")
    return dtype_name(found.dtype)


def _first_floating(value) -> Optional[mx.array]:
    """The first floating-point array among what Module.parameters() would hold of `value`: arrays, dicts and
    lists under a module's keys that do not start with "_"."""
    if isinstance(value, mx.array):
        return value if mx.issubdtype(value.dtype, mx.floating) else None
    if isinstance(value, nn.Module):
        items = (v for k, v in value.items() if not k.startswith("_"))
    elif isinstance(value, dict):
        items = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return None
    return next((found for found in map(_first_floating, items) if found is not None), None)


def checked_info(model: nn.Module, info: Optional[ModelInfo]) -> ModelInfo:
    """`info`, a caller's identity of `model` (model_info's, computed once), once its dtype is the dtype the
    model's parameters have (else ValueError: a snapshot would claim one and hold KV of the other); the model's
    own identity when None. Its config and weights are trusted: checking them is the digest it saves."""
    if info is None:
        return model_info(model)
    dtype = model_dtype(model)
    if info.dtype != dtype:
        raise ValueError(f"info.dtype is {info.dtype!r}, the model's parameters are {dtype!r}: the identity given "
                         "(info=, or the one an MLXEngine was made with, if the model was cast since) is not the "
                         "model's as it is now: compute it again (thaw_mlx.model_info(model), checkpoint=... for a "
                         "checkpoint's) or make a new MLXEngine")
    return info


def model_info(
    model: nn.Module, *, checkpoint: str | os.PathLike | None = None, weights_digest: bool = True
) -> ModelInfo:
    """The model's identity; the weights digest reads every weight once (CRC32C), so it can be skipped.

    `checkpoint`: the Hugging Face checkpoint directory the model was loaded from (mlx_lm.load's path). The
    identity is then the checkpoint's (spec 5.1), the one the vLLM and SGLang adapters derive from the same
    files: architecture architectures[0], config.json less its file fields, and the digest of the checkpoint's
    *.safetensors tensors (what every engine shares; MLX renames, fuses or quantizes them). Without it, for a
    model built in memory, the identity is the model's ModelArgs (architecture: its model_type) and the digest
    is of MLX's own weights. The two never match each other, so a snapshot is checked against the identity
    it was captured with (compute this once and pass it as `info=` to capture, restore and fork).
    """
    dtype = model_dtype(model)
    if checkpoint is not None:
        return checkpoint_info(checkpoint, dtype, weights_digest=weights_digest)
    config = model_config(model)
    digest = digest_of(model_weights(model)) if weights_digest else None
    return ModelInfo(config["model_type"], config_digest(config), dtype, digest, config)


def checkpoint_info(checkpoint: str | os.PathLike, dtype: str, *, weights_digest: bool = True) -> ModelInfo:
    """The identity of the Hugging Face checkpoint in directory `checkpoint`, run at `dtype` (spec 5.1)."""
    config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    return checkpoint_model_info(config, dtype, checkpoint_weights_digest(checkpoint) if weights_digest else None)


def check_snapshot_model(
    model: nn.Module, snapshot: Snapshot, *, check_weights: bool = True, info: Optional[ModelInfo] = None
) -> None:
    """Refuse a snapshot of another model (architecture, config, dtype, and weights when both sides know them).

    `info` is the model's identity when already known (model_info reads every weight to digest them).
    """
    if info is not None:
        check_model(snapshot, info, check_weights=check_weights)
        return
    expect_snapshot(snapshot)  # before its model is read
    want_digest = check_weights and snapshot.model is not None and snapshot.model.weights_digest is not None
    try:
        check_model(snapshot, model_info(model, weights_digest=want_digest), check_weights=check_weights)
    except IncompatibleSnapshotError as exc:
        if _names_a_checkpoint(snapshot):
            raise IncompatibleSnapshotError(
                f"{exc} (the snapshot names its model by a Hugging Face checkpoint; for a model loaded from one, "
                "pass info=thaw_mlx.model_info(model, checkpoint=<its directory>))"
            ) from None
        raise


def _names_a_checkpoint(snapshot: Snapshot) -> bool:
    """Whether the snapshot's identity is a checkpoint's (spec 5.1): its config is a config.json, not ModelArgs."""
    model = snapshot.model
    return model is not None and bool((model.config or {}).get("architectures")) and \
        model.architecture == model.config["architectures"][0]


def load_model(snapshot: Snapshot) -> nn.Module:
    """A new mlx-lm model built from the snapshot's config and carrying the snapshot's weights.

    The model holds exactly the snapshot's weights, so the snapshot's identity is its identity: restore into
    it with info=snapshot.model (needed when the snapshot names a checkpoint, model_info(checkpoint=...)).
    """
    info, weights = snapshot.model, snapshot.weights
    if info is None or info.config is None:
        raise IncompatibleSnapshotError("the snapshot has no model config to build a model from")
    if weights is None or not weights.tensors:
        raise IncompatibleSnapshotError("the snapshot holds no weights (only a reference, or none)")
    model_class, args_class = _internals.model_classes(info.config)
    model = model_class(args_class.from_dict(info.config))
    _quantize_like(model, weights.tensors)
    model.load_weights([(name, to_mlx(t)) for name, t in weights.tensors.items()], strict=True)
    mx.eval(model.parameters())
    return model


def _quantize_like(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Quantize the layers whose weights come quantized (with scales), at the bits and group size their shapes
    imply: an (affine) quantized checkpoint describes itself, so its config need not."""

    def quantization(path: str, module: nn.Module):
        scales = tensors.get(f"{path}.scales")
        if scales is None or not hasattr(module, "to_quantized"):
            return False
        in_dims = module.weight.shape[-1]
        return {"bits": tensors[f"{path}.weight"].shape[-1] * 32 // in_dims, "group_size": in_dims // scales.shape[-1]}

    nn.quantize(model, class_predicate=quantization)
