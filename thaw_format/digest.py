"""Identity digests: of a model config, and of a set of weights (cheap: built on per-tensor CRC32C)."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional

from . import mover
from .document import canonical_json
from .snapshot import ModelInfo
from .tensor import as_tensor

# Fields of a Hugging Face config.json that describe the file, not the model (dtype is compared on its own).
CHECKPOINT_FILE_FIELDS = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of the config's canonical JSON (sorted keys, no spaces)."""
    return "sha256:" + hashlib.sha256(canonical_json(dict(config))).hexdigest()


def weights_digest(tensors: Mapping[str, Any]) -> str:
    """SHA-256 over (name, dtype, shape, CRC32C of the bytes) of every tensor, in name order.

    An identity check for "is this the same model", not a cryptographic commitment to the bytes.
    """
    entries = []
    for name in sorted(tensors):
        t = as_tensor(tensors[name])
        entries.append([name, t.dtype, list(t.shape), f"{mover.crc32c(t.data):08x}"])
    return "sha256:" + hashlib.sha256(canonical_json(entries)).hexdigest()


def checkpoint_model_info(config: Mapping[str, Any], dtype: str, weights_digest: Optional[str] = None) -> ModelInfo:
    """The identity of a model loaded from a Hugging Face checkpoint, the same in every engine.

    architecture: `architectures[0]` (else `model_type`); config digest: config.json less its file fields.
    Adapters that agree on this can restore each other's snapshots of one checkpoint.
    """
    model_config = {k: v for k, v in config.items() if k not in CHECKPOINT_FILE_FIELDS}
    return ModelInfo(
        architecture=(model_config.get("architectures") or [model_config.get("model_type", "unknown")])[0],
        config_digest=config_digest(model_config),
        dtype=dtype,
        weights_digest=weights_digest,
        config=model_config,
    )
