"""ThawWorkerExtension: thaw's methods on vLLM's worker (which holds the KV tensors), called by name through
`collective_rpc` from the engine core or the client. vLLM mixes the class into its worker
(`worker_extension_cls`); arguments and results are plain data, snapshots travel through shared memory."""

from __future__ import annotations

import thaw_format
import torch
import vllm
from thaw_format.sdk import lineage_now
from thaw_format.torch import from_torch, to_torch

from . import _internals, identity, transport
from .pages import blocks_to_pages, engine_layout, pages_to_blocks


class ThawWorkerExtension:
    def thaw_describe(self) -> dict:
        """The identity and KV layout a snapshot must match; `layout_error` says why no layout is mapped."""
        info = identity.model_info(self.vllm_config, self.thaw_weights_digest())
        out = {"model": {"architecture": info.architecture, "config_digest": info.config_digest, "dtype": info.dtype,
                         "weights_digest": info.weights_digest}}
        try:
            caches, layout = engine_layout(self)
        except NotImplementedError as exc:
            return {**out, "layout_error": str(exc)}
        block_size, heads, head_dim = layout.page_shape
        return {**out, "kv": {"num_layers": len(caches), "dtype": _dtype_name(caches), "num_kv_heads": heads,
                              "head_dim": head_dim, "page_size": block_size}}

    def thaw_weights_digest(self) -> str:
        """The digest of the weights the engine loaded (spec 5.1), computed once."""
        if getattr(self, "_thaw_digest", None) is None:
            self._thaw_digest = identity.weights_digest(self.vllm_config)
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
        caches, layout = engine_layout(self)
        layers = [(to_torch(layer.tensors["k"]), to_torch(layer.tensors["v"])) for layer in snapshot.kv.layers]
        index = torch.tensor(pages, dtype=torch.long)
        for cache, (k, v) in zip(caches, layers):
            cache[block_ids] = pages_to_blocks(k[index], v[index], layout)
        connector = _internals.worker_connector()
        for key, page in tails.items():
            connector.staged_tails[key] = (caches, [pages_to_blocks(k[page : page + 1], v[page : page + 1], layout)[0]
                                                    for k, v in layers])
        requests = {r.id: r for r in snapshot.scheduler.requests} if snapshot.scheduler else {}
        for key in rng_keys:
            connector.staged_rng[key] = (self, to_torch(requests[key].rng_state).clone())


def _build_snapshot(worker, plan: dict, include_weights: bool) -> thaw_format.Snapshot:
    config = worker.vllm_config
    caches, layout = engine_layout(worker)
    _, heads, head_dim = layout.page_shape
    layers = []
    for cache in caches:
        k, v = blocks_to_pages(cache, plan["block_ids"], layout)
        layers.append(thaw_format.KVLayer("attention", {"k": from_torch(k), "v": from_torch(v)},
                                          num_kv_heads=heads, head_dim=head_dim))
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
    bs = plan["block_size"]
    return thaw_format.Snapshot(
        model=identity.model_info(config, worker.thaw_weights_digest()),
        weights=weights,
        kv=thaw_format.KVCache(page_size=bs, dtype=_dtype_name(caches), layers=layers),
        prefix=thaw_format.PrefixTree(parents=plan["parents"], tokens=plan["tokens"], hash=thaw_format.NativeHash(
            algorithm=plan["algorithm"], tokens_per_hash=bs, hashes=plan["hashes"], seed=plan["seed"])),
        scheduler=thaw_format.SchedulerState(requests=requests),
        engine=thaw_format.EngineInfo(name="vllm", version=vllm.__version__, attention_backend="CPU_ATTN",
                                      native_kv_layout=layout.description, extra={"block_size": bs}),
        lineage=thaw_format.Lineage(created=lineage_now()),
    )


def _dtype_name(caches) -> str:
    return str(caches[0].dtype).removeprefix("torch.")
