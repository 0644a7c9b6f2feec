"""Identity digests: of a model config, and of a set of weights (cheap: built on per-tensor CRC32C)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from . import mover
from .document import canonical_json
from .paths import open_regular
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
    for name, value in tensors.items():
        t = as_tensor(value)
        entries.append([name, t.dtype, list(t.shape), mover.crc32c(t.data)])
    return _digest(entries)


_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def checked_digest(digest: Optional[str]) -> Optional[str]:
    """`digest` if it has weights_digest's form ("sha256:" and 64 lowercase hex digits), or None; ValueError
    otherwise (a digest a caller names weights by: weights_changed)."""
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise ValueError(f"a weights digest is thaw_format.weights_digest(tensors) ('sha256:' and 64 lowercase hex "
                         f"digits), not {digest!r}")
    return digest


def _digest(entries: list) -> str:
    """Spec section 7: SHA-256 of the canonical JSON of [[name, dtype, shape, crc hex], ...] sorted by name."""
    rows = [[name, dtype, shape, f"{crc:08x}"] for name, dtype, shape, crc in sorted(entries, key=lambda e: e[0])]
    return "sha256:" + hashlib.sha256(canonical_json(rows)).hexdigest()


# safetensors dtype codes -> thaw dtype names
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
    "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}


def checkpoint_weights_digest(model_dir) -> str:
    """`weights_digest` of a Hugging Face checkpoint's *.safetensors files, tensors as the files store them.

    Every engine that loads the checkpoint computes this same value, whatever it renames, fuses or casts, so
    one engine's KV can be matched to another's weights. Reads the files' own headers (no torch, no copy).
    """
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    entries = []
    for path in files:
        with os.fdopen(open_regular(str(path), ValueError), "rb") as f, \
                mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                header_len = int.from_bytes(view[:8], "little")
                header = json.loads(bytes(view[8 : 8 + header_len]))
                header.pop("__metadata__", None)
                base = 8 + header_len
                for name, entry in header.items():
                    start, end = entry["data_offsets"]
                    crc = mover.crc32c(view[base + start : base + end])
                    entries.append([name, _SAFETENSORS_DTYPES[entry["dtype"]], list(entry["shape"]), crc])
            finally:
                view.release()
    return _digest(entries)


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
