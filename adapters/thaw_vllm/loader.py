"""load_format="thaw": vLLM loads a model's weights from a thaw snapshot (a path or shm://name).

    vllm.LLM(model_dir, load_format="thaw", model_loader_extra_config={"thaw_snapshot": path})

The model directory still supplies config.json; the weights come from the snapshot, checksums verified, and
must match the config (vLLM's own weight loader checks every tensor's name and shape).
"""

from __future__ import annotations

from vllm.config import get_current_vllm_config_or_none
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from thaw_format.torch import to_torch

from . import transport
from .identity import record_loaded, snapshot_source
from .worker import start_mover


class ThawModelLoader(BaseModelLoader):
    def download_model(self, model_config) -> None:
        return

    def load_weights(self, model, model_config) -> None:
        config = get_current_vllm_config_or_none()  # set while vLLM builds the model (not on a later reload)
        if config is not None:
            start_mover(config)  # before libthaw's first use in this process
        source = snapshot_source(self.load_config)
        snapshot = transport.read(source)
        if snapshot.weights is None or not snapshot.weights.tensors:
            raise ValueError(f"snapshot {source} holds no weights (captured with include_weights=False?)")
        model.load_weights((name, to_torch(t)) for name, t in snapshot.weights.tensors.items())
        record_loaded(source, snapshot)

