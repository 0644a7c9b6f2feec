"""ThawWorkerExtension: thaw's methods on vLLM's worker, called by name through `collective_rpc`.

vLLM mixes this class into its worker (`worker_extension_cls`), so the same calls work in-process and in
the default multiprocessing mode. Arguments and results are plain data; snapshots travel through shared
memory named in them, never through pickled objects.
"""

from __future__ import annotations

from . import _shm, identity
from ._registry import engine_state
from .engine_capture import capture_state
from .engine_restore import restore_state


class ThawWorkerExtension:
    def _thaw_state(self):
        state = engine_state(self.vllm_config)
        if state.kv_cache_manager is None:
            raise RuntimeError("thaw's KV connector was not bound to a KV cache manager (multi-rank engine?)")
        state.worker = self
        return state

    def thaw_describe(self) -> dict:
        """The identity and KV layout a snapshot must match, as plain data."""
        self._thaw_state()
        from ._internals import kv_cache_tensors

        caches = kv_cache_tensors(self)
        info = identity.model_info(self.vllm_config)
        return {
            "model": {"architecture": info.architecture, "config_digest": info.config_digest, "dtype": info.dtype},
            "kv": {"num_layers": len(caches), "dtype": identity.kv_dtype(self), "num_kv_heads": caches[0].shape[1],
                   "head_dim": caches[0].shape[-1] // 2, "page_size": self.vllm_config.cache_config.block_size},
        }

    def thaw_capture(self, include_weights: bool, chains) -> dict:
        """Capture into a new shared-memory segment; the caller reads it and unlinks it."""
        snapshot = capture_state(self, self._thaw_state(), include_weights=include_weights, chains=chains)
        shared = _shm.SharedSnapshot(snapshot)
        shared.detach()
        return {"source": shared.source, "nbytes": shared.nbytes}

    def thaw_restore(self, source: str) -> dict:
        """Restore from a snapshot path or shm://name the caller has already checked against thaw_describe."""
        return restore_state(self, self._thaw_state(), _shm.read(source))
