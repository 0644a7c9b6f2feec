"""What model an engine runs, and where its weights came from: the identity a restore is checked against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import thaw_format
from thaw_format.torch import from_torch

# Fields of config.json that describe the file rather than the model; dtype is compared on its own.
_NOT_MODEL_FIELDS = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")
SNAPSHOT_KEY = "thaw_snapshot"  # model_loader_extra_config key naming a snapshot (path or shm://name)


def model_config_dict(vllm_config) -> dict:
    path = Path(vllm_config.model_config.model) / "config.json"
    config = json.loads(path.read_text())
    return {k: v for k, v in config.items() if k not in _NOT_MODEL_FIELDS}


def dtype_name(vllm_config) -> str:
    return str(vllm_config.model_config.dtype).removeprefix("torch.")


def model_info(vllm_config, weights_digest: Optional[str] = None) -> thaw_format.ModelInfo:
    config = model_config_dict(vllm_config)
    return thaw_format.ModelInfo(
        architecture=(config.get("architectures") or [config.get("model_type", "?")])[0],
        config_digest=thaw_format.config_digest(config),
        dtype=dtype_name(vllm_config),
        weights_digest=weights_digest,
        config=config,
    )


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
