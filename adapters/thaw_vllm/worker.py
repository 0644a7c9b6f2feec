"""ThawWorkerExtension: thaw's methods on vLLM's worker (which holds the KV tensors), called by name through
`collective_rpc` from the engine core or the client. vLLM mixes the class into its worker
(`worker_extension_cls`); arguments and results are plain data, snapshots travel through shared memory."""

from __future__ import annotations

import thaw_format
import torch
import vllm
from thaw_format.torch import from_torch, to_torch

from . import _internals, identity, transport
from .layout import NATIVE_LAYOUT, blocks_to_pages, pages_to_blocks


class ThawWorkerExtension:
    def thaw_describe(self) -> dict:
        """The identity and KV layout a snapshot must match."""
        caches = _internals.kv_cache_tensors(self)
        info = identity.model_info(self.vllm_config, self.thaw_weights_digest())
        return {
            "model": {"architecture": info.architecture, "config_digest": info.config_digest, "dtype": info.dtype,
                      "weights_digest": info.weights_digest},
            "kv": {"num_layers": len(caches), "dtype": identity.kv_dtype(self), "num_kv_heads": caches[0].shape[1],
                   "head_dim": caches[0].shape[-1] // 2, "page_size": self.vllm_config.cache_config.block_size},
        }

    def thaw_weights_digest(self, tensors=None) -> str:
        """The digest of the weights the engine loaded, computed once (from `tensors` if the caller has them)."""
        if getattr(self, "_thaw_digest", None) is None:
            self._thaw_digest = thaw_format.weights_digest(tensors or identity.checkpoint_weights(self.vllm_config))
        return self._thaw_digest

    def thaw_capture(self, plan: dict, include_weights: bool, local: bool) -> dict:
        """Assemble the snapshot the engine core planned (pages, block ids, requests) and publish it (shared
        memory, or in-process when the client is here too); the client reads and releases it."""
        shared = transport.publish(_build_snapshot(self, plan, include_weights), local=local)
        shared.detach()
        return {"source": shared.source}

    def thaw_stage(self, source: str) -> None:
        """Read and verify a snapshot before the engine core changes anything."""
        self._thaw_staged = transport.read(source)

    def thaw_write(self, pages: list[int], block_ids: list[int], tails: dict[str, int], rng_keys: list[str]) -> None:
        """Write the staged snapshot's pages into the given blocks; stage resumed requests' tails and RNG."""
        snapshot, self._thaw_staged = self._thaw_staged, None
        caches = _internals.kv_cache_tensors(self)
        layers = [(to_torch(layer.tensors["k"]), to_torch(layer.tensors["v"])) for layer in snapshot.kv.layers]
        index = torch.tensor(pages, dtype=torch.long)
        for cache, (k, v) in zip(caches, layers):
            cache[block_ids] = pages_to_blocks(k[index], v[index])
        connector = _internals.worker_connector()
        for key, page in tails.items():
            connector.staged_tails[key] = (caches, [pages_to_blocks(k[page : page + 1], v[page : page + 1])[0].clone()
                                                    for k, v in layers])
        requests = {r.id: r for r in snapshot.scheduler.requests} if snapshot.scheduler else {}
        for key in rng_keys:
            connector.staged_rng[key] = (self, to_torch(requests[key].rng_state).clone())


def _build_snapshot(worker, plan: dict, include_weights: bool) -> thaw_format.Snapshot:
    config = worker.vllm_config
    layers = []
    for cache in _internals.kv_cache_tensors(worker):
        k, v = blocks_to_pages(cache, plan["block_ids"])
        layers.append(thaw_format.KVLayer("attention", {"k": from_torch(k), "v": from_torch(v)},
                                          num_kv_heads=cache.shape[1], head_dim=cache.shape[-1] // 2))
    requests = []
    for r in plan["requests"]:
        generator = _internals.sampling_generator(worker, r["vllm_id"])
        requests.append(thaw_format.Request(
            id=r["id"], status=r["status"], prompt_token_ids=r["prompt_token_ids"],
            output_token_ids=r["output_token_ids"], sampling=thaw_format.SamplingParams(**r["sampling"]),
            num_computed_tokens=r["num_computed_tokens"], pages=r["pages"],
            rng_state=None if generator is None else from_torch(generator.get_state()),
        ))
    weights = None
    if include_weights:
        tensors = identity.checkpoint_weights(config)
        weights = thaw_format.Weights(tensors=tensors, checkpoint_names={n: n for n in tensors})
    digest = worker.thaw_weights_digest(weights.tensors if weights else None)
    bs = plan["block_size"]
    return thaw_format.Snapshot(
        model=identity.model_info(config, digest),
        weights=weights,
        kv=thaw_format.KVCache(page_size=bs, dtype=identity.kv_dtype(worker), layers=layers),
        prefix=thaw_format.PrefixTree(parents=plan["parents"], tokens=plan["tokens"], hash=thaw_format.NativeHash(
            algorithm=plan["algorithm"], tokens_per_hash=bs, hashes=plan["hashes"], seed=plan["seed"])),
        scheduler=thaw_format.SchedulerState(requests=requests),
        engine=thaw_format.EngineInfo(name="vllm", version=vllm.__version__, attention_backend="CPU_ATTN",
                                      native_kv_layout=NATIVE_LAYOUT, extra={"block_size": bs}),
        lineage=thaw_format.Lineage(created=_now()),
    )


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
