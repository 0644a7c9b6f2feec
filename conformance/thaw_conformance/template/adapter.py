"""The toy engine's thaw adapter: capture its state as a thaw_format Snapshot, and restore one into it.

This is the part a new engine author rewrites for their engine. The shape to keep:
- capture maps native state onto the format's neutral sections: weights by native name, KV as token-major
  pages, the prefix table as a tree of token-id pages (plus the native hashes, to check a rebuild against),
  in-flight requests with the pages they hold and their RNG state;
- restore checks everything first (`check`) and touches the engine only once the snapshot is known to fit.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from thaw_format import (
    EngineInfo,
    IncompatibleSnapshotError,
    KVCache,
    KVLayer,
    ModelInfo,
    NativeHash,
    PrefixTree,
    Request,
    SamplingParams,
    SchedulerState,
    Snapshot,
    Weights,
    check_kv_layout,
    check_model,
    config_digest,
    weights_digest,
)
from thaw_format.numpy import from_numpy, to_numpy
from thaw_format.sdk import Finished, Generation, LaunchSpec, Progress, Resumed, fork, pending_requests
from thaw_format.sdk.inplace import check_idle, check_launchable, checked_live
from thaw_format.sdk.shared import SharedKV

from .engine import ToyEngine, ToyRequest, page_hash

ENGINE_NAME = "thaw-toy"
ENGINE_VERSION = "1"
HASH_ALGORITHM = "sha256(parent_hash || int32le tokens)"
_RNG_BYTES = 40  # PCG64 state, increment (128-bit each), has_uint32, uinteger (32-bit each)


def model_info(engine: ToyEngine) -> ModelInfo:
    config = dataclasses.asdict(engine.config)
    return ModelInfo(architecture="toy", config_digest=config_digest(config), dtype="float32",
                     weights_digest=weights_digest(engine_weights(engine)), config=config)


def engine_weights(engine: ToyEngine):
    return {name: from_numpy(array) for name, array in engine.weights.items()}


def capture(engine: ToyEngine, *, include_weights: bool = True) -> Snapshot:
    """Every reachable cached page, the partial last page of each in-flight request, and those requests."""
    blocks, parents, tokens, hashes = [], [], [], []
    page_of_hash: dict[str, int] = {}

    def add_page(block: int, parent: int, page_tokens, key: Optional[str]) -> int:
        blocks.append(block)
        parents.append(parent)
        tokens.append(list(page_tokens))
        hashes.append(key)
        if key is not None:
            page_of_hash[key] = len(blocks) - 1
        return len(blocks) - 1

    for key, block in engine.table.items():  # insertion order: a parent page always precedes its children
        parent, _, page_tokens = engine.block_info[block]
        if parent is None or parent in page_of_hash:  # else its parent was evicted: no prompt can reach it
            add_page(block, page_of_hash[parent] if parent else -1, page_tokens, key)
    requests = []
    for request in engine.running.values():
        pages, p = [], engine.page_size
        for i in range(-(-request.num_computed // p)):
            key = request.hashes[i] if i < len(request.hashes) else None
            page = page_of_hash.get(key) if key else None
            if page is None:  # the partial last page, or a full one the table no longer holds
                page_tokens = request.tokens[i * p : min((i + 1) * p, request.num_computed)]
                page = add_page(request.blocks[i], pages[-1] if pages else -1, page_tokens, key)
            pages.append(page)
        requests.append(_request(request, pages))
    layers = [KVLayer("attention", {"k": from_numpy(k[blocks]), "v": from_numpy(v[blocks])},
                      num_kv_heads=engine.config.num_heads, head_dim=engine.config.head_dim)
              for k, v in zip(engine.k, engine.v)]
    return Snapshot(
        model=model_info(engine),
        weights=Weights(engine_weights(engine)) if include_weights else None,
        kv=KVCache(page_size=engine.page_size, dtype="float32", layers=layers),
        prefix=PrefixTree(parents, tokens, NativeHash(HASH_ALGORITHM, engine.page_size, hashes)),
        scheduler=SchedulerState(requests),
        engine=EngineInfo(ENGINE_NAME, ENGINE_VERSION, native_kv_layout="[blocks, page_size, heads, head_dim]"),
    )


def _request(request: ToyRequest, pages: list[int]) -> Request:
    # copies: the engine goes on appending to the request's lists, and a snapshot must not change after capture
    sampling = SamplingParams(temperature=request.temperature, max_tokens=request.max_tokens,
                              extra={"logprobs": list(request.logprobs), "cached_tokens": request.cached_tokens})
    return Request(request.id, "running", list(request.prompt), list(request.output), sampling, request.num_computed,
                   pages, rng_state=None if request.rng is None else from_numpy(_rng_bytes(request.rng)))


def check(engine: ToyEngine, snapshot: Snapshot) -> None:
    """Refuse, before anything changes, a snapshot this engine cannot hold exactly."""
    check_model(snapshot, model_info(engine))
    check_kv_layout(snapshot, num_layers=engine.config.num_layers, dtype="float32",
                    num_kv_heads=engine.config.num_heads, head_dim=engine.config.head_dim, page_size=engine.page_size)
    kv, tree = snapshot.kv, snapshot.prefix
    if tree is None or tree.num_pages != kv.num_pages:
        raise IncompatibleSnapshotError(f"the prefix tree must describe each of the {kv.num_pages} KV pages")
    if kv.num_pages > engine.num_blocks:
        raise IncompatibleSnapshotError(f"{kv.num_pages} pages do not fit the engine's {engine.num_blocks} blocks")
    for layer in kv.layers:
        if layer.kind != "attention":
            raise IncompatibleSnapshotError(f"the toy engine has attention layers only, not {layer.kind!r}")
    if any(not 0 <= t < engine.config.vocab_size for page in tree.tokens for t in page):
        raise IncompatibleSnapshotError(f"a token id lies outside the vocabulary of {engine.config.vocab_size}")
    if tree.hash is not None and tree.hash.algorithm == HASH_ALGORITHM:
        _check_hashes(tree)
    for request in snapshot.scheduler.requests if snapshot.scheduler else []:
        if request.rng_state is not None and request.rng_state.nbytes != _RNG_BYTES:
            raise IncompatibleSnapshotError(f"request {request.id}: rng_state is not a PCG64 state")
        if any(not 0 <= p < tree.num_pages for p in request.pages):
            raise IncompatibleSnapshotError(f"request {request.id} holds a page the snapshot lacks")


def _check_hashes(tree: PrefixTree) -> None:
    """The native hashes must be those of the pages' tokens: a mismatch means the tree and table disagree."""
    for page, expected in enumerate(tree.hash.hashes):
        if expected is not None:
            parent = tree.parents[page]
            got = page_hash(tree.hash.hashes[parent] if parent >= 0 else None, tree.tokens[page])
            if got != expected:
                raise IncompatibleSnapshotError(f"prefix page {page}: its tokens hash to {got}, the snapshot says {expected}")


def restore(engine: ToyEngine, snapshot: Snapshot) -> None:
    """Replace the engine's cache and requests with the snapshot's; the engine must be idle."""
    if engine.running:
        raise RuntimeError("restore needs an idle engine: requests are in flight")
    check(engine, snapshot)
    engine.reset()
    tree = snapshot.prefix
    blocks = [engine.allocate() for _ in range(tree.num_pages)]
    for i, layer in enumerate(snapshot.kv.layers):
        engine.k[i][blocks] = to_numpy(layer.tensors["k"])
        engine.v[i][blocks] = to_numpy(layer.tensors["v"])
    keys: list[Optional[str]] = []
    for page, block in enumerate(blocks):
        parent = tree.parents[page]
        parent_key = keys[parent] if parent >= 0 else None
        full = len(tree.tokens[page]) == engine.page_size and (parent < 0 or parent_key is not None)
        keys.append(engine.cache_page(block, parent_key, tree.tokens[page]) if full else None)
    for request in pending_requests(snapshot):
        _resume(engine, request, [blocks[p] for p in request.pages], [k for k in map(keys.__getitem__, request.pages) if k])
    for block in blocks:  # cached pages stay in the table, evictable; requests hold their own
        engine.release(block)


def _resume(engine: ToyEngine, request: Request, blocks: list[int], hashes: list[str]) -> None:
    rng = None
    if request.rng_state is not None:
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = _rng_state(to_numpy(request.rng_state).tobytes())
    extra = request.sampling.extra
    resumed = ToyRequest(request.id, list(request.prompt_token_ids), request.sampling.max_tokens,
                         request.sampling.temperature, rng, list(request.output_token_ids),
                         list(extra.get("logprobs", [])), blocks, hashes, request.num_computed_tokens,
                         extra.get("cached_tokens", 0))
    for block in blocks:
        engine.hold(block)
    engine.running[resumed.id] = resumed


def _rng_bytes(rng: np.random.Generator) -> np.ndarray:
    state = rng.bit_generator.state
    raw = (state["state"]["state"].to_bytes(16, "little") + state["state"]["inc"].to_bytes(16, "little")
           + state["has_uint32"].to_bytes(4, "little") + state["uinteger"].to_bytes(4, "little"))
    return np.frombuffer(raw, np.uint8)


def _rng_state(raw: bytes) -> dict:
    return {"bit_generator": "PCG64",
            "state": {"state": int.from_bytes(raw[:16], "little"), "inc": int.from_bytes(raw[16:32], "little")},
            "has_uint32": int.from_bytes(raw[32:36], "little"), "uinteger": int.from_bytes(raw[36:40], "little")}


class ToyThawEngine(SharedKV):
    """The contract (thaw_format.sdk.contract) over one toy engine: what thaw and the conformance suite call.

    Every method is a few lines over the engine's own API and the functions above; a real adapter's class
    has the same shape (vLLM's thaw_vllm.VLLMEngine, SGLang's thaw_sglang.SGLangEngine, thaw_mlx.MLXEngine).
    capture_shared and restore_source come from SharedKV, the contract's default for an engine in this process.
    """

    name = "template"

    def __init__(self, engine: ToyEngine) -> None:
        self.engine = engine
        self._progress: dict[str, Progress] = {}  # requests that advanced since the last progress()
        self._weights_changed = False  # in place (weights_changed): no longer those its config starts with

    @classmethod
    def start(cls, **config) -> "ToyThawEngine":
        """A fresh toy engine of this config (the weights are a function of it)."""
        from .engine import ToyModelConfig, make_weights

        model = ToyModelConfig(**config)
        return cls(ToyEngine(model, make_weights(model)))

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "seeded", "fork", "fork_processes", "mid_stream", "mid_stream_seeded",
                          "streaming"})

    def model_info(self) -> ModelInfo:
        return model_info(self.engine)

    def generate(self, prompt, params: SamplingParams) -> Generation:
        request = self.engine.generate(prompt, params.max_tokens, params.temperature, params.seed)
        return Generation(request.output, request.cached_tokens, request.logprobs)

    def capture(self, *, include_weights: bool = True, chains=None) -> Snapshot:
        return capture(self.engine, include_weights=include_weights)  # every page: a superset of any chains

    def check(self, snapshot: Snapshot) -> None:
        check(self.engine, snapshot)

    def restore(self, snapshot: Snapshot) -> list[Resumed]:
        restore(self.engine, snapshot)
        return [Resumed(r.id, r.prompt_token_ids, r.output_token_ids) for r in pending_requests(snapshot)]

    def submit(self, prompt, params: SamplingParams) -> str:
        return self.engine.submit(prompt, params.max_tokens, params.temperature, params.seed).id

    def step(self) -> dict[str, list[int]]:
        advanced = list(self.engine.running.values())  # the toy's step advances each by one token
        finished = {request.id: request.output for request in self.engine.step()}
        self._progress.update({r.id: Progress(list(r.output), r.cached_tokens, r.id in finished) for r in advanced})
        return finished

    def progress(self) -> dict[str, Progress]:
        out, self._progress = self._progress, {}
        return out

    def abort(self, request_id: str) -> bool:
        request = self.engine.abort(request_id)
        if request is None:
            return False
        self._progress[request_id] = Progress(list(request.output), request.cached_tokens, True, aborted=True)
        return True

    def finish(self, requests=None) -> dict[str, Finished]:
        wanted = None if requests is None else {r.request_id for r in requests}
        done = {}
        while self.engine.running and (wanted is None or not wanted <= done.keys()):
            for rid in self.step():  # every request advances: one that is not wanted is reported by progress()
                last = self._progress[rid]
                done[rid] = Finished(rid, last.token_ids, last.cached_tokens)
        returned = done if wanted is None else {k: v for k, v in done.items() if k in wanted}
        for rid in returned:  # finished here: gone, not reported again
            self._progress.pop(rid, None)
        return returned

    def fork(self, n: int, *, context, processes: bool = False) -> list:
        return fork(self, n, context=context, processes=processes)

    # What a snapshot file may set when wake starts this engine (thaw_format.sdk.launch): start's arguments, each
    # a plain value. A real engine lists the few options an equal engine needs, never one naming code to run.
    launch_options = {"vocab_size": int, "hidden_size": int, "num_layers": int, "num_heads": int, "head_dim": int,
                      "seed": int}

    def launch_spec(self) -> LaunchSpec:
        check_launchable(self._weights_changed)
        return LaunchSpec(f"{__name__}:ToyThawEngine.start", dataclasses.asdict(self.engine.config))

    def page_size(self) -> int:
        return self.engine.page_size

    def weights_changed(self, digest=None) -> None:
        """The toy's weights were changed in place (an RL step writing engine.weights): its identity is computed
        from its live weights (model_info), so only a `digest` given is checked against them; its prefix cache,
        the KV of the old weights, is dropped, and its launch spec refused (it starts the config's weights). A
        real adapter whose identity is a checkpoint's names the new weights by `digest` instead
        (thaw_format.sdk.inplace.InPlaceWeights)."""
        check_idle(bool(self.engine.running))
        checked_live(digest, lambda: model_info(self.engine).weights_digest)
        self.engine.reset()
        self._weights_changed = True

    def close(self) -> None:
        self.engine = None
