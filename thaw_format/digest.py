"""Identity digests: of a model config, and of a set of weights (cheap: built on per-tensor CRC32C)."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

from . import mover
from .document import canonical_json
from .tensor import as_tensor


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
