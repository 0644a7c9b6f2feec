"""What model an engine runs, and where its weights came from: the identity a restore is checked against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import thaw_format
from thaw_format.torch import from_torch

SNAPSHOT_KEY = "thaw_snapshot"  # model_loader_extra_config key naming a snapshot (path or shm://name)
_LOADED_DIGESTS: dict[str, Optional[str]] = {}  # snapshot source -> its weights digest, once loaded here


def dtype_name(vllm_config) -> str:
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def model_info(vllm_config, weights_digest: Optional[str] = None) -> thaw_format.ModelInfo:
    """The checkpoint identity every adapter computes alike (thaw_format.checkpoint_model_info)."""
    config = json.loads((Path(vllm_config.model_config.model) / "config.json").read_text())
    return thaw_format.checkpoint_model_info(config, dtype_name(vllm_config), weights_digest)


def snapshot_source(load) -> Optional[str]:
    """The snapshot an engine loads its weights from (load_format="thaw" in its LoadConfig), else None."""
    if load.load_format != "thaw":
        return None
    extra = load.model_loader_extra_config or {}
    if SNAPSHOT_KEY not in extra:
        raise ValueError(f'load_format="thaw" needs model_loader_extra_config={{"{SNAPSHOT_KEY}": path or shm://name}}')
    return extra[SNAPSHOT_KEY]


def weights_digest(vllm_config) -> Optional[str]:
    """The engine's weights identity (spec 5.1): the checkpoint's own (thaw_format.checkpoint_weights_digest, from
    its safetensors files without loading them), so that every engine serving the checkpoint reports the same;
    for load_format="thaw", the weights digest its snapshot records (None if it records none)."""
    source = snapshot_source(vllm_config.load_config)
    if source is None:
        return thaw_format.checkpoint_weights_digest(vllm_config.model_config.model)
    if source not in _LOADED_DIGESTS:
        raise RuntimeError(f"the weights of snapshot {source} were not loaded in this process")
    return _LOADED_DIGESTS[source]


def record_loaded(source: str, snapshot: thaw_format.Snapshot) -> None:
    """Called by the thaw model loader: the snapshot's weights identity, kept for `weights_digest` (the
    snapshot itself may be gone by then: a shared-memory source is unlinked once its readers are done)."""
    _LOADED_DIGESTS[source] = snapshot.model.weights_digest


def checkpoint_weights(vllm_config) -> dict[str, thaw_format.Tensor]:
    """The weights the engine was loaded from, under checkpoint names.

    On CPU vLLM repacks linear weights for oneDNN and frees the originals, so the live parameters cannot be
    read back; the loaded source (safetensors files, or the snapshot of load_format="thaw") is what it holds.
    """
    source = snapshot_source(vllm_config.load_config)
    if source is not None:
        from .transport import read

        weights = read(source).weights
        if weights is None or not weights.tensors:
            raise ValueError(f"snapshot {source} holds no weights")
        return dict(weights.tensors)
    from safetensors.torch import load_file

    tensors = {}
    for path in sorted(Path(vllm_config.model_config.model).glob("*.safetensors")):
        tensors.update({name: from_torch(t) for name, t in load_file(str(path)).items()})
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors weights in {vllm_config.model_config.model}")
    return tensors
