"""What model an engine runs, and where its weights came from: the identity a restore is checked against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import thaw_format
from thaw_format.torch import from_torch

SNAPSHOT_KEY = "thaw_snapshot"  # model_loader_extra_config key naming a snapshot (path or shm://name)


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


def kv_dtype(worker) -> str:
    from ._internals import kv_cache_tensors

    return str(kv_cache_tensors(worker)[0].dtype).removeprefix("torch.")
