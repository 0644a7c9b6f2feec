"""thaw's work inside vLLM's engine-core process, where the scheduler, block pool and prefix table live.

`thaw_call(core, op, args)` is installed on EngineCore by the plugin and reached from the client as a utility
call; KV bytes are read and written by the worker (`worker.py`), which may be another process, through
`collective_rpc` by method name. Everything crossing a process boundary is plain data or a shared-memory name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from thaw_format import CorruptSnapshotError

from . import _internals, rpc, sampling
from .api import NOT_ENABLED
from .connector import ThawConnector


@rpc.as_data
def thaw_call(core, op: str, args: dict) -> dict:
    """Run `op`; an error goes back to the client as data (rpc.py), a snapshot's own (a corrupt chunk, an
    incompatible layout) raised there as its class."""
    if op == "capture":
        return _capture(core, **args)
    if op == "restore":
        return _restore(core, **args)
    if op == "drop_prefix_cache":
        return _drop_prefix_cache(core)
    raise ValueError(f"unknown thaw engine-core operation {op!r}")


def _worker(core, method: str, *args):
    """The worker's `method` (worker.ThawWorkerExtension) through collective_rpc on every rank, the first rank's
    reply; an error any rank returned (as data: rpc.py) is raised once every rank's reply is read. This process
    waits for the replies asleep: its CPU is one the worker moves KV on (worker.start_mover)."""
    return _every_rank(core, method, *args)[0]


def _every_rank(core, method: str, *args) -> list:
    """Every rank's reply to the worker's `method`, as _worker; the first error any rank returned is raised."""
    with _internals.worker_awaited_asleep(core):
        return rpc.unwrap_each(core.collective_rpc(method, args=args))


def _drop_prefix_cache(core) -> dict:
    """Drop every cached page and the ledger naming them (weights_changed: their KV is the old weights')."""
    connector, kcm = _connector(core), _internals.kv_cache_manager(core)
    if not _internals.reset_prefix_cache(kcm):
        raise RuntimeError("vLLM refused to reset its prefix cache (blocks still held): nothing changed")
    connector.ledger.clear()
    return {}


def _connector(core) -> ThawConnector:
    connector = core.scheduler.get_kv_connector()
    if not isinstance(connector, ThawConnector):
        raise RuntimeError(NOT_ENABLED)
    return connector


# --- capture ------------------------------------------------------------------------------------------------

def _chain_pages(connector: ThawConnector, kcm, chains: Sequence[Sequence[int]], hash_fn) -> dict:
    """The cached blocks of the named token chains' full pages by block hash, each chain up to its first page not in
    the ledger under the same tokens (a hash collision never names another chain's tokens) or not cached: each page
    looked up in vLLM's table, hashed one at a time, none past the first miss."""
    ledger, bs = connector.ledger, connector.block_size
    found = {}
    for tokens in chains:
        full = [tuple(tokens[i : i + bs]) for i in range(0, len(tokens) - len(tokens) % bs, bs)]
        for page, block_hash in zip(full, _internals.chain_hashes(hash_fn, full)):
            entry = ledger.get(block_hash)
            if entry is None or entry[1] != page:
                break
            block = _internals.cached_block(kcm, block_hash)
            if block is None:
                break
            found[block_hash] = block
    return found


def _parents_first(wanted: set, ledger: dict) -> list[bytes]:
    """The hashes of `wanted` whose whole chain is among them, parents first."""
    depth = _depths(wanted, lambda h: ledger[h][0])
    return sorted((h for h in wanted if depth[h] >= 0), key=lambda h: (depth[h], h))


def _depths(nodes, parent_of) -> dict:
    """Each node's depth in its forest (0: a root, parent None or -1), or -1 where an ancestor is not among
    `nodes`: one pass, every node walked once (no recursion, so chains of any length)."""
    nodes, depth = set(nodes), {}
    for node in nodes:
        path, on_path = [], set()
        while node not in depth:
            parent = parent_of(node)
            if parent is None or parent == -1:
                depth[node] = 0
            elif parent not in nodes:
                depth[node] = -1
            elif node in on_path:
                raise ValueError(f"the prefix tree has a cycle through page {node!r}")
            else:
                path.append(node)
                on_path.add(node)
                node = parent
                continue
            break
        for child in reversed(path):
            d = depth[node]
            depth[child] = d + 1 if d >= 0 else -1
            node = child
    return depth


def _capture(core, include_weights: bool, chains, local: bool, shared: bool = False) -> dict:
    connector, kcm = _connector(core), _internals.kv_cache_manager(core)
    bs = connector.block_size
    algorithm, hash_fn = _internals.hash_function(core.vllm_config)
    live = [_internals.request_fields(r) for r in _internals.unfinished_requests(core)]
    for r in live:
        connector.learn(r["block_hashes"], r["prompt_token_ids"] + r["output_token_ids"], r["num_computed_tokens"] // bs)
    if chains is None:  # every page whose whole chain is still cached
        # (recording the live requests' blocks may just have walked the table too: rare, and harmless, the second
        # walk reads the same table)
        blocks = connector.prune()
        hashes = _parents_first(blocks.keys() & connector.ledger.keys(), connector.ledger)
    else:
        # The named chains' blocks are looked up one by one: a walk of the whole table costs in proportion to every
        # cached block, at every capture, however few pages it takes (the ledger prunes itself as it grows).
        blocks = _chain_pages(connector, kcm, chains, hash_fn)
        hashes = _parents_first(set(blocks), connector.ledger)
    page_of = {h: i for i, h in enumerate(hashes)}
    plan = {
        "parents": [page_of.get(connector.ledger[h][0], -1) for h in hashes],
        "tokens": [list(connector.ledger[h][1]) for h in hashes],
        "block_ids": [blocks[h].block_id for h in hashes],
        "hashes": [h.hex() for h in hashes],
        "algorithm": algorithm, "seed": _internals.hash_seed(), "block_size": bs, "requests": [],
    }
    for r in [] if shared else live:  # a shared capture is KV only: the requests in flight stay this engine's
        full = r["num_computed_tokens"] // bs
        chain = [page_of[h] for h in r["block_hashes"][:full] if h in page_of]
        if len(chain) != full:
            continue  # its pages were not asked for
        all_tokens = r["prompt_token_ids"] + r["output_token_ids"]
        if r["num_computed_tokens"] % bs:  # the partly filled last page, never in the prefix table
            plan["parents"].append(chain[-1] if chain else -1)
            plan["tokens"].append(all_tokens[full * bs : r["num_computed_tokens"]])
            plan["block_ids"].append(_internals.request_block_ids(kcm, r["request_id"])[full])
            plan["hashes"].append(None)
            chain.append(len(plan["parents"]) - 1)
        plan["requests"].append({
            "vllm_id": r["request_id"], "id": _internals.external_request_id(r["request_id"]),
            "status": _internals.status_name(r["status"]), "prompt_token_ids": r["prompt_token_ids"],
            "output_token_ids": r["output_token_ids"], "num_computed_tokens": r["num_computed_tokens"],
            "pages": chain, "sampling": dataclasses.asdict(sampling.to_thaw(r["sampling_params"])),
        })
    published = _publisher(_every_rank(core, "thaw_capture", plan, include_weights, local, shared))
    if published.get("regions"):  # tensor parallel: every rank writes its KV heads where the first rank laid them
        # out, all at once, then the first rank checksums them
        _worker(core, "thaw_put_share", published["source"], plan["block_ids"], published["regions"])
        _worker(core, "thaw_seal", published["source"], list(published["regions"]))
    return {"source": published["source"]}


def _publisher(replies: list[dict]) -> dict:
    """The one rank's thaw_capture reply that published the snapshot (the first rank's, whatever place the replies
    list it in): RuntimeError unless exactly one rank did."""
    published = [reply for reply in replies if reply["source"] is not None]
    if len(published) != 1:
        raise RuntimeError(f"{len(published)} of {len(replies)} tensor-parallel ranks published the capture; exactly "
                           "one, the first rank, must")
    return published[0]


# --- restore ------------------------------------------------------------------------------------------------

def _page_hashes(parents: list[int], tokens: list[list[int]], full: list[int], depth: dict[int, int], hash_fn) -> dict[int, bytes]:
    """vLLM's hash of each full page, parents hashed before their children."""
    hashes: dict[int, bytes] = {}
    for page in sorted(range(len(parents)), key=depth.__getitem__):
        parent = parents[page]
        hashes[page] = next(_internals.chain_hashes(hash_fn, [tokens[page]], None if parent == -1 else hashes[parent]))
    return {page: hashes[page] for page in full}


def _check_native(native: Optional[dict], hashes: dict[int, bytes], algorithm: str, bs: int) -> None:
    """Where the snapshot's engine hashed exactly as this one does, the rebuilt table must agree with it."""
    if native is None or (native["algorithm"], native["tokens_per_hash"], native["seed"]) != (algorithm, bs, _internals.hash_seed()):
        return
    for page, block_hash in hashes.items():
        recorded = native["hashes"][page]
        if recorded is not None and recorded != block_hash.hex():
            raise CorruptSnapshotError(f"prefix page {page}: its token ids hash to {block_hash.hex()[:16]}..., the snapshot "
                             f"records {recorded[:16]}... under the same algorithm and seed (corrupt snapshot)")


def _restore(core, source: str, parents: list[int], tokens: list[list[int]], native: Optional[dict],
             tails: dict[str, int], rng_keys: list[str], snapshot_id: Optional[str], verify: bool = True) -> dict:
    """Rebuild the prefix table from token ids with this engine's hash function and seed, and have the worker
    write the KV into freshly allocated blocks. Refusals happen before the first change: every rank must have
    staged the snapshot `snapshot_id` names (the one the plan came from: a file replaced between reads is refused)."""
    connector, kcm = _connector(core), _internals.kv_cache_manager(core)
    bs = connector.block_size
    busy = _internals.unfinished_requests(core)
    if busy:
        raise RuntimeError(f"the engine has {len(busy)} unfinished requests; restore needs an idle engine")
    algorithm, hash_fn = _internals.hash_function(core.vllm_config)
    full = [p for p in range(len(parents)) if len(tokens[p]) == bs]
    depth = _depths(range(len(parents)), parents.__getitem__)
    if any(d < 0 for d in depth.values()):
        raise CorruptSnapshotError("prefix.parents: the prefix tree names a parent page it does not hold")
    hashes = _page_hashes(parents, tokens, full, depth, hash_fn)
    _check_native(native, hashes, algorithm, bs)
    if len(full) > _internals.num_free_blocks(kcm):
        raise RuntimeError(f"the snapshot has {len(full)} full pages, the engine {_internals.num_free_blocks(kcm)} free blocks")
    staged = _every_rank(core, "thaw_stage", source, verify)  # every rank reads (and verifies) every chunk
    if any(staged_id != snapshot_id for staged_id in staged):
        raise CorruptSnapshotError(f"{source} changed while it was read: the restore planned snapshot {snapshot_id}, "
                                   f"the ranks read {staged}")

    if not _internals.reset_prefix_cache(kcm):
        raise RuntimeError("vLLM refused to reset its prefix cache (blocks still held)")
    blocks = _internals.take_blocks(kcm, len(full))
    connector.ledger.clear()
    try:
        _worker(core, "thaw_write", full, [b.block_id for b in blocks], tails, rng_keys)
    except BaseException:
        _internals.release_blocks(kcm, blocks)  # unpublished: nothing can hit the half-written blocks
        raise
    for page, block in zip(full, blocks):
        _internals.publish_block(kcm, block, hashes[page], 0, bs)
        parent = parents[page]
        connector.ledger[hashes[page]] = (None if parent == -1 else hashes[parent], tuple(tokens[page]))
    order = sorted(zip(full, blocks), key=lambda pb: -depth[pb[0]])  # leaves evicted first
    _internals.release_blocks(kcm, [b for _, b in order])
    for key, page in tails.items():
        connector.tails[key] = (depth[page] * bs, len(tokens[page]))
    connector.rng_keys.update(rng_keys)
    return {"restored_pages": len(full)}

