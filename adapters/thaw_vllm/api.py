"""capture / restore / finish: thaw's operations on a running vLLM engine, from the process that owns it."""

from __future__ import annotations

import json
import weakref
from typing import Optional, Sequence

import thaw_format
from thaw_format import IncompatibleSnapshotError
from thaw_format.sdk import Finished, Resumed, lent, pending_requests
from thaw_format import UnknownWeightsError
from thaw_format.digest import checked_digest
from thaw_format.sdk.inplace import check_idle, check_known, check_named
from thaw_format.sdk.shared import checked_by_caller

from . import _internals, rpc, transport
from .requests import resubmit, run_to_completion

WORKER_EXTENSION = "thaw_vllm.worker.ThawWorkerExtension"


def engine_args(**kwargs) -> dict:
    """vllm.LLM / EngineArgs keyword arguments with thaw's worker extension and KV connector added.

    The plain (JSON-able) arguments ride along in the connector's extra config, so that `launch_arguments`
    can start an equal engine in another process (fork, wake) from any LLM made with them: pass every argument
    through here (dtype, block_size, ...). One passed to vllm.LLM beside these is invisible to thaw: neither
    recorded (another engine starts without it) nor refused by sleep.

    On vLLM's CPU backend it also keeps the worker on the cores a plain engine gets (a KV connector would
    otherwise cost the engine core its reserved core: _internals.keep_cpu_reservation).
    """
    from vllm.config import KVTransferConfig

    kwargs.setdefault("enable_prefix_caching", True)
    _internals.keep_cpu_reservation(kwargs)
    plain = {k: v for k, v in kwargs.items() if _json_able(v)}
    unplain = sorted(kwargs.keys() - plain.keys())  # named, so that a sleep knows what its file cannot hold
    kwargs["worker_extension_cls"] = WORKER_EXTENSION
    kwargs["kv_transfer_config"] = KVTransferConfig(
        kv_connector="ThawConnector", kv_connector_module_path="thaw_vllm.connector", kv_role="kv_both",
        kv_connector_extra_config={LAUNCH_KEY: plain, UNPLAIN_KEY: unplain},
    )
    return kwargs


LAUNCH_KEY = "thaw_engine_kwargs"
UNPLAIN_KEY = "thaw_engine_unplain_kwargs"
NOT_ENABLED = ("this vLLM engine runs without thaw's KV connector and worker extension. vLLM lets no plugin turn "
               "a KV connector on, so pass every argument through engine_args where the engine is made: "
               "vllm.LLM(model, **thaw_vllm.engine_args(dtype=..., ...)) (or use thaw_vllm.LLM)")


def _json_able(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def launch_arguments(llm) -> tuple[str, dict, frozenset]:
    """The model and plain construction arguments of an LLM made with `engine_args`: what starts an equal one; and
    the names of its other arguments (not JSON-able), which that start lacks."""
    config = llm.llm_engine.vllm_config
    transfer = config.kv_transfer_config
    if transfer is None or LAUNCH_KEY not in (transfer.kv_connector_extra_config or {}):
        raise RuntimeError(NOT_ENABLED)
    extra = transfer.kv_connector_extra_config
    return config.model_config.model, dict(extra[LAUNCH_KEY]), frozenset(extra.get(UNPLAIN_KEY, ()))


def _rpc(llm, method: str, *args):
    """The worker's `method` on every rank, the first rank's result (an error any rank returned raised: rpc.py)."""
    return rpc.unwrap_all(llm.collective_rpc(method, args=args))


_DESCRIBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # LLM -> describe(LLM)


def describe(llm) -> dict:
    """The engine's model identity and KV layout, as plain data, asked of its worker once per LLM (and again
    after weights_changed), so a restore's check costs no call into the engine."""
    if llm not in _DESCRIBED:
        launch_arguments(llm)  # RuntimeError(NOT_ENABLED) for an engine made without engine_args: no thaw_describe
        _DESCRIBED[llm] = _rpc(llm, "thaw_describe")
    return _DESCRIBED[llm]


def _call(llm, op: str, args: dict) -> dict:
    """thaw's engine-core operation `op` (core_ops.thaw_call); a snapshot's error is raised here as itself."""
    return rpc.unwrap(_internals.call_engine_core(llm, "thaw_call", op, args))


def _chains(chains: Optional[Sequence[Sequence[int]]]) -> Optional[list[list[int]]]:
    return None if chains is None else [list(map(int, c)) for c in chains]


def _check_capturable(llm, include_weights: bool) -> None:
    """Refuse, before the engine is asked anything else, an engine whose KV layout thaw_vllm does not map, or
    whose weights, changed in place, it cannot name or read (thaw_format.sdk.inplace)."""
    engine = describe(llm)
    if engine.get("layout_error") is not None:
        raise NotImplementedError(f"this engine's KV cannot be captured: {engine['layout_error']}")
    check_named(engine["weights_unknown"])
    if include_weights and engine["weights_changed"]:
        raise UnknownWeightsError(
            "capture(include_weights=True): vLLM on CPU reads the weights back from the checkpoint it loaded (its "
            "live parameters are repacked and cannot be read), and they were changed in place since "
            "(weights_changed()): capture with include_weights=False, which names the new weights by digest")


def weights_changed(llm, digest: Optional[str] = None) -> None:
    """The engine's weights were changed in place (VLLMEngine.weights_changed), the engine idle: its prefix cache,
    whose KV is the old weights', is dropped (refused: nothing changed), then every rank names the weights by
    `digest` (None: unknown), and this process's copies of the engine's description are forgotten."""
    launch_arguments(llm)  # RuntimeError(NOT_ENABLED) for an engine made without engine_args
    digest = checked_digest(digest)
    check_idle(bool(llm.llm_engine.get_num_unfinished_requests()))
    _call(llm, "drop_prefix_cache", {})
    _rpc(llm, "thaw_weights_changed", digest)  # thaw_vllm.LLM.collective_rpc forgets its described replies
    _DESCRIBED.pop(llm, None)


def capture(llm, *, include_weights: bool = True, chains: Optional[Sequence[Sequence[int]]] = None) -> thaw_format.Snapshot:
    """Snapshot the engine: prefix-cache pages (all, or those of the named token chains) with their token ids,
    live requests (waiting or mid-generation) and, unless told otherwise, the weights."""
    _check_capturable(llm, include_weights)
    args = {"include_weights": include_weights, "chains": _chains(chains),
            "local": _internals.engine_in_this_process(llm)}
    return transport.read(_call(llm, "capture", args)["source"], unlink=True, keep=True)


def capture_shared(llm, *, chains: Optional[Sequence[Sequence[int]]] = None) -> str:
    """A KV-only capture published in shared memory, its pages gathered by the worker straight into its reused
    segment: "shm://<name>#<nbytes>", valid until this engine's next capture_shared (see VLLMEngine)."""
    _check_capturable(llm, include_weights=False)
    args = {"include_weights": False, "chains": _chains(chains), "local": False, "shared": True}
    return _call(llm, "capture", args)["source"]


def check_compatible(llm, snapshot: thaw_format.Snapshot) -> None:
    """Raise IncompatibleSnapshotError, naming the field and both values, if the engine cannot hold the snapshot."""
    engine = describe(llm)
    thaw_format.check_model(snapshot, thaw_format.ModelInfo(**engine["model"]))
    check_known(snapshot, engine["weights_unknown"])
    if snapshot.kv is None:
        return
    if "layout_error" in engine:
        raise IncompatibleSnapshotError(f"engine.native_kv_layout: this engine's KV layout is not mapped: "
                                        f"{engine['layout_error']}")
    thaw_format.check_kv_layout(snapshot, **engine["kv"])
    kinds = {layer.kind for layer in snapshot.kv.layers} - {"attention"}
    if kinds:
        raise IncompatibleSnapshotError(f"kv.layers kind: the snapshot has {sorted(kinds)}, vLLM's CPU engine holds 'attention' only")
    pages = 0 if snapshot.prefix is None else snapshot.prefix.num_pages
    if pages != snapshot.kv.num_pages:
        raise IncompatibleSnapshotError(f"prefix: the snapshot has {pages} prefix pages for {snapshot.kv.num_pages} KV pages")
    for request in pending_requests(snapshot):
        _check_request(snapshot, request)


def _check_request(snapshot: thaw_format.Snapshot, request: thaw_format.Request) -> None:
    """A resumed request's pages must be one chain holding exactly its computed tokens."""
    tree, chain = snapshot.prefix, request.pages
    if any(not 0 <= p < tree.num_pages for p in chain) or (chain and tree.chain(chain[-1]) != chain):
        raise IncompatibleSnapshotError(f"request {request.id!r}: pages {chain} are not one chain of the prefix tree")
    tokens = request.prompt_token_ids + request.output_token_ids
    held = [t for p in chain for t in tree.tokens[p]]
    if len(held) != request.num_computed_tokens or held != tokens[: len(held)] or len(held) >= len(tokens):
        raise IncompatibleSnapshotError(
            f"request {request.id!r}: its pages hold {len(held)} tokens, it has {request.num_computed_tokens} computed "
            f"of {len(tokens)}, and they must agree")
    if request.rng_state is not None and request.rng_state.dtype != "uint8":
        raise IncompatibleSnapshotError(f"request {request.id!r}: rng_state is {request.rng_state.dtype}, torch's generator state is uint8")


def restore(llm, snapshot: thaw_format.Snapshot) -> list[Resumed]:
    """Restore a snapshot into a fresh or used (idle) engine; unfinished requests are resubmitted and continue
    exactly (their last partial page and sampling-generator state come from the snapshot).

    Identity, layout and dtype are checked first: a mismatch is refused before the engine is touched. Checksums
    follow thaw_format.sdk.lent's trust rule: a snapshot checked where its bytes came in (a verified load, this
    engine's own capture) or held in this process's private memory is not read again; a segment borrowed or
    shared-loaded with verify=False is verified (by the worker, or here for an engine in this process) and a bad
    chunk refused, CorruptSnapshotError naming it, before the engine changes. restore_source verifies any source
    its caller did not check.
    """
    check_compatible(llm, snapshot)
    # The Snapshot is this process's own: the worker verifies what lent.send says was not checked where it came in
    # (thaw_format.sdk.lent's trust rule), and parses the header of the rest without reading every chunk again.
    # In-process the object itself is handed over, a segment not checked where it came in verified here first.
    # restore_source verifies: any source.
    if _internals.engine_in_this_process(llm):
        lent.verify_unchecked(snapshot)
        with transport.LocalSnapshot(snapshot) as local:
            return _restore_checked(llm, snapshot, local.source, verify=False)
    return lent.sending(llm, snapshot, lambda source, checked: _restore_checked(llm, snapshot, source,
                                                                               verify=not checked))


def restore_source(llm, source: str, *, verified: bool = False) -> list[Resumed]:
    """Restore from a source ("shm://..." or a snapshot file's path) without copying it here: this process
    reads its structure only; the worker verifies every chunk where it lies (unless `verified`: a segment its
    caller checked, thaw_format.sdk.shared.checked_by_caller), then writes the KV."""
    checked = checked_by_caller(source, verified)
    snapshot = transport.structure(source)
    check_compatible(llm, snapshot)
    return _restore_checked(llm, snapshot, source, verify=not checked)


def _restore_checked(llm, snapshot: thaw_format.Snapshot, source: str, verify: bool) -> list[Resumed]:
    """The restore of a compatible snapshot that `source` names: the engine core rebuilds the prefix table, the
    worker verifies every chunk (`verify`) and writes the KV; then unfinished requests are resubmitted."""
    _call(llm, "restore", {"source": source, "verify": verify, **_restore_plan(snapshot)})
    return resubmit(llm, snapshot)


def _restore_plan(snapshot: thaw_format.Snapshot) -> dict:
    """What the engine core needs, as plain data: the prefix tree, the native hashes, resumed requests' tails."""
    tree = snapshot.prefix or thaw_format.PrefixTree(parents=[], tokens=[])
    native = None if tree.hash is None else {"algorithm": tree.hash.algorithm, "seed": tree.hash.seed,
                                             "tokens_per_hash": tree.hash.tokens_per_hash, "hashes": tree.hash.hashes}
    tails, rng_keys = {}, []
    for request in pending_requests(snapshot):
        last = request.pages[-1] if request.pages else None
        if last is not None and snapshot.kv is not None and len(tree.tokens[last]) < snapshot.kv.page_size:
            tails[request.id] = last
        if request.rng_state is not None:
            rng_keys.append(request.id)
    return {"parents": tree.parents, "tokens": tree.tokens, "native": native, "tails": tails, "rng_keys": rng_keys,
            "snapshot_id": snapshot.id}


def finish(llm, resumed: Sequence[Resumed]) -> dict[str, Finished]:
    """Run the engine until the resumed requests are done (VLLMEngine.finish, for a plain LLM)."""
    return run_to_completion(llm, {r.request_id: r.previous_output_token_ids for r in resumed},
                             [r.request_id for r in resumed])
