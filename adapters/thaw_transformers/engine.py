"""TransformersEngine: Hugging Face transformers as a thaw engine, implementing thaw_format.sdk's contract.

transformers has no serving engine, so this one is small and says everything: a model, a prefix cache of token
pages (pages.py) and the requests in flight (requests.py), each decoding one token per step through the model's
own forward and DynamicCache (sliding-window layers where the model slides).

    engine = TransformersEngine.start(checkpoint_dir, dtype="float32", device="cpu")
    out = engine.generate(prompt_ids, greedy(8))          # out.cached_tokens: prompt tokens taken from pages
    snap = engine.capture()                               # weights, pages, prefix tree, requests in flight
    other = TransformersEngine(model, checkpoint=checkpoint_dir); other.restore(snap)   # a model already loaded

A request takes the KV of the longest cached prefix of its tokens (at most all but the last, whose logits it
needs) from the pages, computes the rest, and when it finishes its KV is paged into the prefix cache.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional, Sequence

import torch

from thaw_format import (
    EngineInfo,
    ModelInfo,
    IncompatibleSnapshotError,
    Lineage,
    SamplingParams,
    SchedulerState,
    Snapshot,
    Weights,
    WeightsRef,
    check_model,
    weights_digest,
)
from thaw_format.sdk import (
    DEFAULT_PAGE_SIZE,
    Finished,
    Generation,
    LaunchSpec,
    LocalDirectory,
    Progress,
    Resumed,
    Unsupported,
    fork,
    lineage_now,
    pending_requests,
)
from thaw_format.sdk.contract import check_params
from thaw_format.sdk.inplace import InPlaceWeights, check_idle
from thaw_format.sdk.request_ids import RequestIds
from thaw_format.sdk.shared import SharedKV, owned_segment

from . import _internals, identity, pages, requests
from .pages import PrefixCache
from .requests import Running, Sampler


class TransformersEngine(SharedKV):
    name = "transformers"

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "seeded", "fork", "fork_processes", "mid_stream", "mid_stream_seeded",
                          "streaming", "weights"})

    def __init__(self, model: torch.nn.Module, *, checkpoint: str | os.PathLike | None = None,
                 info: Optional[ModelInfo] = None, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        """`model`: a transformers causal LM; `checkpoint`: the directory it was loaded from, which is its identity
        (spec 5.1; without it the model's own, which no other engine shares); `info`: that identity if known."""
        self.model, self.checkpoint = model, None if checkpoint is None else str(checkpoint)
        self._in_place = InPlaceWeights.loaded(checkpoint, info)  # weights changed in place since (weights_changed)
        self._family = weakref.WeakSet([self])  # the engines sharing this model: it and its in-process fork children
        self.info = info or identity.model_info(model, checkpoint)  # digested once
        self.layouts = identity.layouts_of(model)
        self.cache = PrefixCache(page_size)
        self.requests: dict[str, Running] = {}
        self._progress: dict[str, Progress] = {}  # requests that advanced since the last progress()
        self.restored_from: Optional[str] = None  # the snapshot id this engine continues: its captures' parent
        self._ids = RequestIds("transformers")
        eos = model.config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])

    @classmethod
    def start(cls, checkpoint: str, *, dtype: str = "float32", device: str = "cpu",
              page_size: int = DEFAULT_PAGE_SIZE) -> "TransformersEngine":
        """Load a Hugging Face checkpoint directory with transformers, in `dtype` on `device` ("cuda" on a GPU)."""
        return cls(identity.load(checkpoint, dtype, device), checkpoint=checkpoint, page_size=page_size)

    # what a snapshot file may set when wake starts this engine (thaw_format.sdk.launch): start's arguments
    launch_options = {"checkpoint": LocalDirectory, "dtype": str, "device": str, "page_size": int}

    def launch_spec(self) -> LaunchSpec:
        self._in_place.check_launch()
        if self.checkpoint is None:
            raise Unsupported("transformers: an equal engine in another process needs the checkpoint directory "
                              "(TransformersEngine.start, or checkpoint= beside the model)")
        return LaunchSpec(f"{__name__}:TransformersEngine.start",
                          {"checkpoint": self.checkpoint, "dtype": self.info.dtype, "device": str(self.model.device),
                           "page_size": self.cache.page_size})

    def page_size(self) -> int:
        return self.cache.page_size

    def model_info(self) -> ModelInfo:
        return self.info

    def weights_changed(self, digest: Optional[str] = None) -> None:
        """The model's weights were changed in place (`load_state_dict`, an optimizer step: RL), every engine over
        it idle (this one and its in-process fork children, which share the model): each one's prefix cache, the KV
        of the old weights, is dropped, and its identity names the new weights (InPlaceWeights.renamed: a
        checkpoint's by `digest`, None: unknown; a model built in memory by the digest of its own parameters,
        computed again). Captures with weights hold the live parameters."""
        family = list(self._family)
        check_idle(any(engine.requests for engine in family))
        in_place, info = self._in_place.renamed(self.info, digest,
                                                lambda: weights_digest(identity.model_weights(self.model)))
        for engine in family:
            engine._in_place, engine.info, engine.cache = in_place, info, PrefixCache(engine.cache.page_size)

    # --- serving ---

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        check_params(params)
        run = self._start(self._new_id(), list(prompt), [], params)
        self._run_to_end(run)
        return Generation(run.output, run.cached_tokens, run.logprobs)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        check_params(params)
        run = self._start(self._new_id(), list(prompt), [], params)
        self.requests[run.id] = run
        return run.id

    def step(self) -> dict[str, list[int]]:
        finished = {}
        for run in list(self.requests.values()):
            self._advance(run)
            done = self._done(run)
            self._progress[run.id] = Progress(list(run.output), run.cached_tokens, done)
            if done:
                self._page(self.cache, self.requests.pop(run.id))
                finished[run.id] = run.output
        return finished

    def abort(self, request_id: str) -> bool:
        """Drop a request in flight with its own cache: its KV is a copy of the pages it started from plus what it
        computed, and only a finished request's is paged into the prefix cache."""
        run = self.requests.pop(request_id, None)
        if run is None:
            return False
        self._progress[request_id] = Progress(list(run.output), run.cached_tokens, True, aborted=True)
        return True

    def progress(self) -> dict[str, Progress]:
        out, self._progress = self._progress, {}
        return out

    def finish(self, requests: Optional[Sequence[Resumed]] = None) -> dict[str, Finished]:
        ids = list(self.requests) if requests is None else [r.request_id for r in requests]
        unknown = [i for i in ids if i not in self.requests]
        if unknown:
            raise KeyError(f"no request in flight with id {unknown}")
        done = {}
        for rid in ids:
            run = self.requests.pop(rid)
            self._run_to_end(run)
            done[rid] = Finished(rid, run.output, run.cached_tokens)
            self._progress.pop(rid, None)  # finished here: gone, not reported again
        return done

    def _new_id(self) -> str:
        return self._ids.fresh(self.requests)

    def _start(self, rid: str, prompt: list[int], output: list[int], params: SamplingParams,
               rng_state: Optional[torch.Tensor] = None, computed: Optional[int] = None) -> Running:
        """A request whose cache holds the longest cached prefix of its tokens (at most `computed` of them)."""
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        sampler = Sampler(params, rng_state)
        tokens = prompt + output
        limit = len(tokens) - 1 if computed is None else min(computed, len(tokens) - 1)
        chain, hit = self.cache.match(tokens, limit)
        cache = _internals.new_cache(self.model.config)
        for layer, (keys, values) in enumerate(self.cache.gather(chain, hit) if hit else ()):
            _internals.fill(cache, layer, keys, values)
        return Running(rid, prompt, params, sampler, cache, tokens[hit:], hit, list(output))

    def _advance(self, run: Running) -> None:
        """Feed the request's pending tokens and sample one more."""
        ids = torch.tensor([run.pending], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            logits = _internals.forward(self.model, ids, run.cache)
        token, logprob = run.sampler(logits)
        run.output.append(token)
        run.logprobs.append(logprob)
        run.pending = [token]

    def _done(self, run: Running) -> bool:
        return run.done(self._eos, self.model.config.max_position_embeddings - len(run.prompt))

    def _run_to_end(self, run: Running) -> None:
        """Generate until the request is done, then page its KV into the prefix cache."""
        while not self._done(run):
            self._advance(run)
        self._page(self.cache, run)

    def _page(self, table: PrefixCache, run: Running) -> list[int]:
        """Page the KV of the request's computed tokens into `table`; the chain of pages holding them."""
        return table.insert(run.tokens[: run.num_computed], _token_major(run.cache, len(self.layouts)))

    # --- snapshots ---

    def capture(self, *, include_weights: bool = True,
                chains: Optional[Sequence[Sequence[int]]] = None) -> Snapshot:
        return self._capture(include_weights, chains, with_requests=True)

    def capture_shared(self, *, chains: Optional[Sequence[Sequence[int]]] = None) -> str:
        """KV only (the contract's rule): the cached pages of `chains`. A request in flight stays this engine's,
        and so do its pages: a fork pool's round moved them to every worker, which reported them as cached."""
        return owned_segment(self).publish(self._capture(False, chains, with_requests=False))

    def _capture(self, include_weights: bool, chains, *, with_requests: bool) -> Snapshot:
        self._in_place.check_capture()
        table = self.cache.copy()  # in-flight requests' KV is paged into a copy: the engine itself is unchanged
        live = self.requests if with_requests else {}
        request_pages = {rid: self._page(table, run) for rid, run in live.items()}
        keep = set(range(len(table.pages))) if chains is None else {
            p for p in range(len(table.pages)) if _begins_some(table, p, chains)}
        keep |= {p for chain in request_pages.values() for p in chain}
        table, renumber = table.subset(keep)
        kv, tree = pages.to_snapshot(table, self.layouts, self.info.dtype) if table.pages else (None, None)
        info = self.info
        weights = Weights(identity.model_weights(self.model)) if include_weights else \
            Weights(ref=WeightsRef(weights_digest=info.weights_digest))
        return Snapshot(
            model=info,
            weights=weights,
            kv=kv,
            prefix=tree,
            scheduler=SchedulerState([run.record([renumber[p] for p in request_pages[rid]])
                                      for rid, run in live.items()]) if with_requests else None,
            engine=EngineInfo(
                name=self.name, version=_internals.TRANSFORMERS_VERSION,
                attention_backend=self.model.config._attn_implementation,
                native_kv_layout="DynamicCache per request [1, kv_heads, tokens, head_dim] per layer; prefix cache "
                                 "of pages [page_size, kv_heads, head_dim] per layer",
                extra={"torch": torch.__version__, "device": str(self.model.device)}),
            lineage=Lineage(parent=self.restored_from, created=lineage_now()),
        )

    def check(self, snapshot: Snapshot) -> None:
        check_model(snapshot, self.info)
        self._in_place.check(snapshot)
        if snapshot.kv is not None or snapshot.prefix is not None:
            pages.check_pages(snapshot, self.layouts, self.info.dtype, self.cache.page_size)
        weights = self._weights_to_load(snapshot)
        if weights:
            identity.check_weights(self.model, weights)
        requests.check_pending(snapshot, self.name)
        if pending_requests(snapshot) and snapshot.kv is None:
            raise IncompatibleSnapshotError("the snapshot has requests in flight but no KV for them")

    def _weights_to_load(self, snapshot: Snapshot) -> dict:
        """The snapshot's weights to load here. Weights under another engine's native names (vLLM's and SGLang's
        fused qkv_proj, ...) of the checkpoint this engine serves, by digest, are this model's weights already."""
        tensors = {} if snapshot.weights is None else snapshot.weights.tensors
        if not tensors:
            return {}
        names = {name for name, _ in self.model.named_parameters()}
        same_checkpoint = snapshot.model is not None and snapshot.model.weights_digest == self.info.weights_digest
        return {} if set(tensors) != names and same_checkpoint else tensors

    def restore(self, snapshot: Snapshot) -> list[Resumed]:
        if self.requests:
            raise RuntimeError(f"restore needs an idle engine; {len(self.requests)} requests are in flight")
        self.check(snapshot)
        table = pages.from_snapshot(snapshot, self.layouts, self.model.device) if snapshot.kv is not None \
            else PrefixCache(self.cache.page_size)
        weights = self._weights_to_load(snapshot)
        if weights:
            identity.load_weights(self.model, weights)
        self.cache, self.restored_from = table, snapshot.id
        resumed = []
        for r in pending_requests(snapshot):
            run = self._start(r.id, r.prompt_token_ids, r.output_token_ids, r.sampling, requests.resume_state(r),
                              r.num_computed_tokens)
            self.requests[r.id] = run
            resumed.append(Resumed(r.id, list(r.prompt_token_ids), list(r.output_token_ids)))
        return resumed

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list:
        """n children holding the KV of `context` (computed here first if the cache lacks it). In this process
        they are engines over this engine's model and pages (a copy of the page table: no KV bytes move), each
        serving and capturing on its own; in other processes, thaw_format.sdk.fork's."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}")
        if processes:
            self.launch_spec()  # its refusal (Unsupported) before the context's KV is computed here
        self._hold(list(context))
        if processes:
            return fork(self, n, context=context, processes=True)
        children = []
        for _ in range(n):
            child = TransformersEngine(self.model, checkpoint=self.checkpoint, info=self.info,
                                       page_size=self.cache.page_size)
            child.cache, child.restored_from = self.cache.copy(), self.restored_from
            child._in_place, child._family = self._in_place, self._family  # the model's weights, as known here
            self._family.add(child)
            children.append(child)
        return children

    def _hold(self, tokens: list[int]) -> None:
        """Page the KV of every token of `tokens` into the prefix cache, computing what it lacks."""
        chain, hit = self.cache.match(tokens, len(tokens))
        if hit == len(tokens):
            return
        run = self._start("fork-context", tokens, [], SamplingParams(temperature=0.0), computed=hit)
        with torch.inference_mode():
            _internals.forward(self.model, torch.tensor([run.pending], device=self.model.device), run.cache)
        run.pending = []  # every token's KV is computed (the logits are not needed)
        self._page(self.cache, run)

    def close(self) -> None:
        self.requests.clear()
        self.cache = PrefixCache(self.cache.page_size)


def _token_major(cache, num_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A request's cache as per-layer (keys, values) [tokens, heads, d] views."""
    return [tuple(t[0].transpose(0, 1) for t in _internals.layer_kv(cache, layer)) for layer in range(num_layers)]


def _begins_some(table: PrefixCache, page: int, chains: Sequence[Sequence[int]]) -> bool:
    """Whether the page holds KV of a prefix of one of `chains`: the chain begins with the tokens before the page
    and at least its first token (a leaf page may go on past the chain: a prompt's partial hit)."""
    tokens = [t for p in table.chain_of(page) for t in table.pages[p].tokens]
    start = len(tokens) - len(table.pages[page].tokens)
    return any(list(chain[: start + 1]) == tokens[: start + 1] for chain in chains if len(chain) > start)
