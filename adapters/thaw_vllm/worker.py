"""ThawWorkerExtension: thaw's methods on vLLM's worker (which holds the KV tensors), called by name through
`collective_rpc` from the engine core or the client. vLLM mixes the class into its worker
(`worker_extension_cls`); arguments and results are plain data, errors too (rpc.as_data: no method raises through
vLLM, which would put the ranks' replies out of step), snapshots travel through shared memory."""

from __future__ import annotations

import copy
import functools
import os

import thaw_format
import vllm
from thaw_format import IncompatibleSnapshotError, mover
from thaw_format.sdk import agreement, lent, lineage_now, remote
from thaw_format.sdk.head_share import HeadShare, check_regions, put_share, take_share
from thaw_format.sdk.inplace import InPlaceWeights
from thaw_format.sdk.shared import owned_segment
from thaw_format.torch import from_torch, to_torch
from thaw_format.writer import EncodedSnapshot, deferred_tensor, reseal, unwritten

from . import _internals, identity, rpc, tensor_parallel, transport
from .pages import NativeLayout, blocks_to_pages, engine_layout, gather_role, pages_to_blocks, scatter_pages


MOVER_CPUS_ENV = "THAW_VLLM_MOVER_CPUS"  # "rank": libthaw moves KV on the worker's own cores only
_MOVER: dict = {}  # what start_mover gave libthaw's pool in this process
os.register_at_fork(after_in_child=_MOVER.clear)  # libthaw forgets its pool in a forked child: start it anew


def mover_cpus(own: set[int], kept: set[int], setting: str | None) -> set[int]:
    """The CPUs libthaw's threads may move KV on, for a worker whose threads vLLM bound to `own`, with `kept`
    the cores vLLM kept beside it for the engine core and the client (_internals.cpus_kept_beside), under the
    user's THAW_VLLM_MOVER_CPUS: unset or "node" both, "rank" the worker's own."""
    if setting in (None, "", "node"):
        return own | kept
    if setting == "rank":
        return set(own)
    raise ValueError(f"{MOVER_CPUS_ENV}={setting!r}: use 'node' (the default) or 'rank'")


def start_mover(vllm_config) -> dict:
    """Start libthaw's thread pool, once per process, on the CPUs a KV move may use; returns them (describe).

    libthaw sizes its pool on first use by the starting thread's affinity, which its threads inherit. vLLM's
    multiprocessing executor binds the worker's threads one core each (on a 2-CPU machine, the one core of the
    rank) and keeps the node's other cores for the engine core and the client. Those wait while thaw moves KV:
    a capture or restore runs between engine steps as one call, the client waiting for the engine core and the
    engine core for this worker (its wait spins on sched_yield, which gives way to runnable threads). So the
    pool starts from this thread widened to both sets, and moves with as many threads as an in-process engine
    gets; vLLM's own threads keep their binding. THAW_VLLM_MOVER_CPUS=rank confines the move to the worker's
    own cores (for a deployment that runs other work on the kept ones). Called before libthaw's first use in
    the worker: thaw's calls and its model loader."""
    if not _MOVER:
        own = _internals.thread_cpus()
        cpus = mover_cpus(own, _internals.cpus_kept_beside(vllm_config, own), os.environ.get(MOVER_CPUS_ENV))
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)
        try:
            mover.backend()  # starts the pool from this thread, its threads on `cpus`
        finally:
            os.sched_setaffinity(0, before)
        _MOVER.update(cpus=sorted(cpus), backend=mover.backend())
    return _MOVER


class ThawWorkerExtension:
    # The id of the snapshot this engine was last restored from (the client's, whichever way it came here:
    # thaw_format.sdk.lent.send): the lineage parent of its captures.
    thaw_restored_from: str | None = None
    # Under tensor parallelism, on the first rank: the source of the capture it published last and the segment's
    # buffer (held, not viewed: a view would keep the segment from closing), which thaw_put_share writes its slabs
    # through and thaw_seal checksums; None outside a capture.
    _thaw_sealing: tuple | None = None

    @rpc.as_data
    def thaw_describe(self) -> dict:
        """The identity and KV layout a snapshot must match; `layout_error` says why no layout is mapped.
        Computed once, and again after the weights change in place (thaw_weights_changed)."""
        _internals.worker_waits_asleep_after_this_call()
        mover_info = start_mover(self.vllm_config)
        if getattr(self, "_thaw_described", None) is None:
            self._thaw_described = {**_describe(self), "mover": dict(mover_info)}
        return self._thaw_described

    @rpc.as_data
    def thaw_weights_changed(self, digest: str | None) -> None:
        """The weights were changed in place (api.weights_changed, once the prefix cache is dropped): the engine's
        identity names them by `digest` from now on (None: unknown)."""
        _internals.worker_waits_asleep_after_this_call()
        self._thaw_in_place = InPlaceWeights().change(digest)
        self._thaw_model = self._thaw_described = None  # made again from the new digest

    @rpc.as_data
    def thaw_capture(self, plan: dict, include_weights: bool, local: bool, shared: bool = False) -> dict:
        """Assemble the snapshot the engine core planned (pages, block ids, requests) and publish it, the KV
        pages gathered by libthaw straight into shared memory with their checksums in the same pass: lent to
        the client (a segment no reader holds, which the client's Snapshot views and gives back when dropped),
        or, `shared`, in this worker's reused segment, valid until the next such capture. In-process (the client
        is here too), gathered into the snapshot's own buffers and handed over as an object."""
        _internals.worker_waits_asleep_after_this_call()
        start_mover(self.vllm_config)
        if local:
            return {"source": transport.LocalSnapshot(_build_snapshot(self, plan, include_weights, gathered=True)).source}
        caches, layout, share = _engine_kv(self)
        if not tensor_parallel.is_first():
            return {"source": None}  # the first rank publishes; every rank then writes its share (thaw_put_share)
        self._thaw_sealing, kept = None, []
        if share.whole:
            fill = {f"kv/{i}/{role}": functools.partial(gather_role, cache, plan["block_ids"], layout, role)
                    for i, cache in enumerate(caches) for role in ("k", "v")}
        else:
            fill = {f"kv/{i}/{role}": functools.partial(_unwritten, kept) for i in range(len(caches))
                    for role in ("k", "v")}
        encoded = EncodedSnapshot(_build_snapshot(self, plan, include_weights, gathered=False))
        publisher = owned_segment(self) if shared else lent.owned_lender(self)
        source = publisher.publish(encoded, fill)
        if share.whole:
            return {"source": source}
        self._thaw_sealing = source, kept[0]
        return {"source": source, "regions": {name: [region.offset, region.end] for (name, _), region
                                              in zip(encoded.tensors, encoded.layout.regions) if name in fill}}

    @rpc.as_data
    def thaw_put_share(self, source: str, block_ids: list[int], regions: dict[str, list[int]]) -> None:
        """Write this rank's KV heads of the given blocks into their slabs of the pages of the capture the first
        rank published in `source` (thaw_capture), at the byte `regions` of its KV tensors the first rank laid out
        (checked here: RegionsError), every rank at once; the first rank checksums them once every rank has
        (thaw_seal). The first rank writes through the buffer it published into, the others map the segment."""
        _internals.worker_waits_asleep_after_this_call()
        caches, layout, share = _engine_kv(self)
        view = _sealing(self, source) if tensor_parallel.is_first() else lent.writable_view(source)
        pages_bytes = {role: len(block_ids) * layout.pages[role].page_bytes * share.ranks for role in ("k", "v")}
        check_regions(regions, len(view), {f"kv/{i}/{role}": pages_bytes[role] for i in range(len(caches))
                                           for role in ("k", "v")})
        offsets = share.slab_offsets(len(block_ids), layout.page_shape[0])
        local = mover.recycled(len(block_ids) * layout.pages["k"].page_bytes)
        for i, cache in enumerate(caches):
            for role in ("k", "v"):
                start, end = regions[f"kv/{i}/{role}"]
                gather_role(cache, block_ids, layout, role, local)
                put_share(local, view[start:end], share, offsets)

    @rpc.as_data
    def thaw_seal(self, source: str, names: list[str]) -> None:
        """On the first rank: checksum the named tensors of the capture it published in `source` once every rank
        has written its share of them (thaw_put_share), from their final bytes, through the buffer it wrote."""
        _internals.worker_waits_asleep_after_this_call()
        if tensor_parallel.is_first():
            view = _sealing(self, source)
            self._thaw_sealing = None
            reseal(view, names)

    @rpc.as_data
    def thaw_stage(self, source: str, verify: bool = True) -> str | None:
        """Read the snapshot `source` names where it lies (a segment this worker lent, a cached mapping, the
        client's memory for a remote source, or in-process the client's Snapshot itself) and check its KV fits
        this engine's, before the engine core changes anything. Every chunk is verified unless `verify` is False:
        a source the client counts as checked (thaw_format.sdk.lent.send's trust rule, or one its caller checked,
        checked_by_caller) or its Snapshot handed over in-process (api.restore); a segment's header is parsed and
        checked either way. Returns the staged snapshot's id: the engine core writes nothing before every rank's
        equals the restore's (core_ops._restore). Under tensor parallelism the first rank alone verifies a
        shared-memory segment (every rank maps its one set of bytes, so its check refuses the restore for all);
        every rank verifies the copy of a file it reads itself. The client's memory (a remote source) is sent as
        checked: the client verified it, and each rank reads its bytes straight from there."""
        _internals.worker_waits_asleep_after_this_call()
        start_mover(self.vllm_config)
        self._thaw_staged = None  # a failed restore's view of a reused segment is dropped here at the latest
        verify = verify and agreement.verifies(source, tensor_parallel.is_first())
        snapshot = transport.read(source, lender=getattr(self, "_thaw_lender", None), verify=verify)
        caches, layout, share = _engine_kv(self)
        _check_kv(snapshot.kv, caches, _page_shape(layout, share))
        self._thaw_staged = snapshot
        return snapshot.id

    @rpc.as_data
    def thaw_write(self, pages: list[int], block_ids: list[int], tails: dict[str, int], rng_keys: list[str]) -> None:
        """Write the staged snapshot's pages into the given blocks; stage resumed requests' tails and RNG."""
        _internals.worker_waits_asleep_after_this_call()
        snapshot, self._thaw_staged = self._thaw_staged, None
        caches, layout, share = _engine_kv(self)
        page_bytes = layout.pages["k"].page_bytes * share.ranks  # a snapshot's page holds every rank's heads
        # A remote source's KV is read where it lies in the client by the scatter (a partial page's too), in one pass.
        layers = [tuple(remote.scatter_view(layer.tensors[role]) for role in ("k", "v"))
                  for layer in snapshot.kv.layers]

        # This rank's slabs in every page a run (or a tail) may hold, over all heads, and a buffer for its K's and
        # V's share of as many, which every run and layer reuses (their scatters copy out of it); none for a whole page.
        rows = layout.page_shape[0]
        if not share.whole:
            offsets = share.slab_offsets(max(len(pages), 1), rows)
            buffers = {role: mover.recycled(len(offsets) * share.slab_bytes) for role in ("k", "v")}

        def own(pages, count, role):  # this rank's heads of `count` pages over all heads
            if share.whole:
                return pages
            return take_share(pages, share, offsets[: count * rows], buffers[role][: count * rows * share.slab_bytes])

        for first, count, at in mover.consecutive_runs(pages):  # consecutive pages are one slice of the snapshot's tensors
            span = slice(first * page_bytes, (first + count) * page_bytes)
            for cache, (k, v) in zip(caches, layers):
                scatter_pages(cache, block_ids[at : at + count], own(k[span], count, "k"), own(v[span], count, "v"),
                              layout)
        connector = _internals.worker_connector()
        for key, page in tails.items():
            span = slice(page * page_bytes, (page + 1) * page_bytes)
            connector.staged_tails[key] = (caches, [
                pages_to_blocks(own(k[span], 1, "k"), own(v[span], 1, "v"), layout, cache.dtype)[0]
                for cache, (k, v) in zip(caches, layers)])
        requests = {r.id: r for r in snapshot.scheduler.requests} if snapshot.scheduler else {}
        for key in rng_keys:
            connector.staged_rng[key] = (self, to_torch(requests[key].rng_state).clone())
        self.thaw_restored_from = snapshot.id


class SealError(RuntimeError):
    """A tensor-parallel capture's share or seal arrived for a capture the first rank did not publish last."""


def _sealing(worker, source: str) -> memoryview:
    """The bytes of the capture the first rank published in `source`, through the buffer it laid them out in;
    SealError for none or another (and that one is dropped)."""
    if worker._thaw_sealing is None or worker._thaw_sealing[0] != source:
        published = worker._thaw_sealing and worker._thaw_sealing[0]
        worker._thaw_sealing = None
        raise SealError(f"{source}: this rank is sealing {published or 'no capture'}")
    return memoryview(worker._thaw_sealing[1]).cast("B")[: lent.parse(source)[1]]


def _in_place(worker) -> InPlaceWeights:
    return getattr(worker, "_thaw_in_place", None) or InPlaceWeights()  # never changed: the loaded weights


def _weights_digest(worker) -> str | None:
    if _in_place(worker).changed:
        return _in_place(worker).digest
    if getattr(worker, "_thaw_digest", None) is None:
        worker._thaw_digest = identity.weights_digest(worker.vllm_config)
    return worker._thaw_digest


def _model_info(worker) -> thaw_format.ModelInfo:
    """The engine's model identity, made on first use (the checkpoint's config.json read from disk then, and the
    weights digest) and kept, not re-read and digested at every capture. Shared by every caller: one that hands it
    out copies it."""
    if getattr(worker, "_thaw_model", None) is None:
        worker._thaw_model = identity.model_info(worker.vllm_config, _weights_digest(worker))
    return worker._thaw_model


def _engine_kv(worker) -> tuple[list, NativeLayout, HeadShare]:
    """engine_layout and this rank's share of the KV heads; NotImplementedError for either not mapped."""
    caches, layout = engine_layout(worker)
    _, heads, head_dim = layout.page_shape
    config = worker.vllm_config
    share = tensor_parallel.head_share(config.parallel_config, config.model_config.get_total_num_kv_heads(), heads,
                                      _internals.tensor_parallel_rank(), head_dim, caches[0].element_size())
    return caches, layout, share


def _page_shape(layout, share: HeadShare) -> tuple[int, int, int]:
    """A snapshot's page, over every rank's heads: (block_size, KV heads, head_dim)."""
    return layout.page_shape[0], share.total_heads, share.head_dim


def _unwritten(kept: list, target, chunk_size: int):
    """writer.unwritten, keeping the buffer `target` views (the whole segment) for the first rank's slabs and
    seal."""
    kept[:] = [target.obj]
    return unwritten(target, chunk_size)


def _describe(worker) -> dict:
    info = _model_info(worker)
    out = {"model": {"architecture": info.architecture, "config_digest": info.config_digest, "dtype": info.dtype,
                     "weights_digest": info.weights_digest},
           "weights_changed": _in_place(worker).changed, "weights_unknown": _in_place(worker).unknown}
    try:
        caches, layout, share = _engine_kv(worker)
    except NotImplementedError as exc:
        return {**out, "layout_error": str(exc)}
    block_size, heads, head_dim = _page_shape(layout, share)
    return {**out, "kv": {"num_layers": len(caches), "dtype": _dtype_name(caches), "num_kv_heads": heads,
                          "head_dim": head_dim, "page_size": block_size}}


def _check_kv(kv, caches, page_shape: tuple[int, int, int]) -> None:
    """The snapshot's KV must be this engine's layers, dtype and page shape (the client checked the same against
    describe(); this guards the bytes the scatter will read)."""
    if kv is None:
        return
    dtype = _dtype_name(caches)
    if len(kv.layers) != len(caches):
        raise IncompatibleSnapshotError(f"kv.layers: the snapshot has {len(kv.layers)}, the engine {len(caches)}")
    for i, layer in enumerate(kv.layers):
        for role in ("k", "v"):
            t = layer.tensors.get(role)
            if t is None or t.dtype != dtype or tuple(t.shape[1:]) != page_shape:
                raise IncompatibleSnapshotError(f"kv.layers[{i}] {role!r}: {t!r}, the engine holds {dtype} pages of "
                                 f"{list(page_shape)}")


def _build_snapshot(worker, plan: dict, include_weights: bool, gathered: bool) -> thaw_format.Snapshot:
    """The snapshot the plan describes. gathered=False leaves the KV tensors deferred, for a fill to write."""
    config = worker.vllm_config
    caches, layout, share = _engine_kv(worker)
    page_shape = _page_shape(layout, share)
    _, heads, head_dim = page_shape
    shape = (len(plan["block_ids"]), *page_shape)
    layers = []
    for cache in caches:
        if gathered:
            k, v = (from_torch(t) for t in blocks_to_pages(cache, plan["block_ids"], layout))
        else:
            k, v = (deferred_tensor(_dtype_name(caches), shape) for _ in range(2))
        layers.append(thaw_format.KVLayer("attention", {"k": k, "v": v}, num_kv_heads=heads, head_dim=head_dim))
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
    if include_weights:  # the client refused one after weights_changed (api._check_capturable)
        tensors = identity.checkpoint_weights(config)
        weights = thaw_format.Weights(tensors=tensors, checkpoint_names={n: n for n in tensors})
    bs = plan["block_size"]
    model = _model_info(worker)
    return thaw_format.Snapshot(
        # gathered: an in-process capture, whose snapshot the caller gets as an object (and may change); an encoded
        # one only reads it
        model=copy.deepcopy(model) if gathered else model,
        weights=weights,
        kv=thaw_format.KVCache(page_size=bs, dtype=_dtype_name(caches), layers=layers),
        prefix=thaw_format.PrefixTree(parents=plan["parents"], tokens=plan["tokens"], hash=thaw_format.NativeHash(
            algorithm=plan["algorithm"], tokens_per_hash=bs, hashes=plan["hashes"], seed=plan["seed"])),
        scheduler=thaw_format.SchedulerState(requests=requests),
        engine=thaw_format.EngineInfo(name="vllm", version=vllm.__version__, attention_backend="CPU_ATTN",
                                      native_kv_layout=_native_description(layout, share), extra={"block_size": bs}),
        lineage=thaw_format.Lineage(parent=worker.thaw_restored_from, created=lineage_now()),
    )


def _native_description(layout, share: HeadShare) -> str:
    if share.whole:
        return layout.description
    return (f"{layout.description}; tensor parallel: each of {share.ranks} ranks holds {share.heads} of the "
            f"{share.total_heads} KV heads of every block (the pages hold all)")


def _dtype_name(caches) -> str:
    return str(caches[0].dtype).removeprefix("torch.")
