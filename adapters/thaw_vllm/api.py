"""capture / restore / finish: thaw's operations on a running vLLM engine, from the process that owns it."""

from __future__ import annotations

import json
from typing import Optional, Sequence

import thaw_format
from thaw_format import IncompatibleSnapshotError
from thaw_format.sdk import Finished, Resumed, pending_requests

from . import _internals, transport
from .requests import resubmit, run_to_completion

WORKER_EXTENSION = "thaw_vllm.worker.ThawWorkerExtension"


def engine_args(**kwargs) -> dict:
    """vllm.LLM / EngineArgs keyword arguments with thaw's worker extension and KV connector added.

    The plain (JSON-able) arguments ride along in the connector's extra config, so that `launch_arguments`
    can start an equal engine in another process (fork) from any LLM made with them: pass every argument
    that engine needs (dtype, block_size, ...) through here, not beside it.

    On vLLM's CPU backend it also keeps the worker on the cores a plain engine gets (a KV connector would
    otherwise cost the engine core its reserved core: _internals.keep_cpu_reservation).
    """
    from vllm.config import KVTransferConfig

    kwargs.setdefault("enable_prefix_caching", True)
    _internals.keep_cpu_reservation(kwargs)
    plain = {k: v for k, v in kwargs.items() if _json_able(v)}
    kwargs["worker_extension_cls"] = WORKER_EXTENSION
    kwargs["kv_transfer_config"] = KVTransferConfig(
        kv_connector="ThawConnector", kv_connector_module_path="thaw_vllm.connector", kv_role="kv_both",
        kv_connector_extra_config={LAUNCH_KEY: plain},
    )
    return kwargs


LAUNCH_KEY = "thaw_engine_kwargs"
NOT_ENABLED = ("this vLLM engine runs without thaw's KV connector and worker extension. vLLM lets no plugin turn "
               "a KV connector on, so add one argument where the engine is made: vllm.LLM(model, ..., "
               "**thaw_vllm.engine_args()) (or use thaw_vllm.LLM)")


def _json_able(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def launch_arguments(llm) -> tuple[str, dict]:
    """The model and plain construction arguments of an LLM made with `engine_args`: what starts an equal one."""
    config = llm.llm_engine.vllm_config
    transfer = config.kv_transfer_config
    if transfer is None or LAUNCH_KEY not in (transfer.kv_connector_extra_config or {}):
        raise RuntimeError(NOT_ENABLED)
    return config.model_config.model, dict(transfer.kv_connector_extra_config[LAUNCH_KEY])


def _rpc(llm, method: str, *args):
    return llm.collective_rpc(method, args=args)[0]


def describe(llm) -> dict:
    """The engine's model identity and KV layout, as plain data."""
    return _rpc(llm, "thaw_describe")


def capture(llm, *, include_weights: bool = True, chains: Optional[Sequence[Sequence[int]]] = None) -> thaw_format.Snapshot:
    """Snapshot the engine: prefix-cache pages (all, or those of the named token chains) with their token ids,
    live requests (waiting or mid-generation) and, unless told otherwise, the weights."""
    chains = None if chains is None else [list(map(int, c)) for c in chains]
    args = {"include_weights": include_weights, "chains": chains, "local": _internals.engine_in_this_process(llm)}
    out = _internals.call_engine_core(llm, "thaw_call", "capture", args)
    return transport.read(out["source"], unlink=True, keep=True)


def check_compatible(llm, snapshot: thaw_format.Snapshot) -> None:
    """Raise IncompatibleSnapshotError, naming the field and both values, if the engine cannot hold the snapshot."""
    engine = describe(llm)
    thaw_format.check_model(snapshot, thaw_format.ModelInfo(**engine["model"]))
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

    Identity, layout and dtype are checked first, and the snapshot's checksums by the reader: a mismatch is
    refused before the engine is touched.
    """
    check_compatible(llm, snapshot)
    with transport.publish(snapshot, local=_internals.engine_in_this_process(llm), engine=llm) as shared:
        _internals.call_engine_core(llm, "thaw_call", "restore", {"source": shared.source, **_restore_plan(snapshot)})
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
    return {"parents": tree.parents, "tokens": tree.tokens, "native": native, "tails": tails, "rng_keys": rng_keys}


def finish(llm, resumed: Sequence[Resumed]) -> dict[str, Finished]:
    """Run the engine until the resumed requests are done (VLLMEngine.finish, for a plain LLM)."""
    return run_to_completion(llm, {r.request_id: r.previous_output_token_ids for r in resumed},
                             [r.request_id for r in resumed])
