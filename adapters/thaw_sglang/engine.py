"""SGLangEngine: the adapter contract (thaw_format.sdk.contract) over one ThawEngine (an sglang.Engine).

    engine = SGLangEngine.start(model_path=..., **sglang_engine_arguments)
    engine = SGLangEngine(thaw_engine)                   # or wrap a running ThawEngine

Requests go through SGLang's own Engine.generate. SGLang honours a sampling seed only under deterministic
inference (otherwise its sampler draws from torch's global generator), which it allows with GPU attention
backends only: on CPU seeded sampling is not reproducible, so "seeded" is not among the capabilities.

Requests in flight: `submit` streams a request and pauses the engine at its first token; each `step` lets it
run until the next token arrives and pauses it again, so a capture always finds it running, never finished.
Requests submitted meanwhile wait their turn, in order (each runs alone, so its tokens are those it gets alone);
until it comes, a waiting request is not in SGLang but in this adapter's queue, and a capture holds it from there:
waiting, with no output and no KV.
A restore's unfinished requests are submitted again by `finish` (SGLang runs them from their tokens so far,
a prefix-cache hit on the restored KV); until then they too are only in the adapter, and a capture holds them
from there, as restored.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import thaw_format
from thaw_format import ModelInfo, Request, SamplingParams, SchedulerState, Snapshot
from thaw_format.digest import checked_digest
from thaw_format.sdk import (Finished, Generation, LaunchSpec, LocalDirectory, OneOf, Progress, Refused, Resumed,
                              fork)
from thaw_format.sdk.contract import check_params
from thaw_format.sdk.inplace import check_idle, check_launchable
from thaw_format.sdk.request_ids import RequestIds
from thaw_format.sdk.shared import SharedKV

from . import rpc
from .requests import resume_arguments, sglang_params
from .thaw_engine import ThawEngine, capture, capture_shared, check, restore_pending, resumed_of, snapshot_page_size


@dataclass
class _Streaming:
    rid: str
    chunks: Iterator[dict]  # SGLang's output stream
    latest: dict  # the last chunk read

    @property
    def finished(self) -> bool:
        return self.latest["meta_info"].get("finish_reason") is not None

    def progress(self) -> Progress:
        return Progress(list(self.latest["output_ids"]), self.latest["meta_info"]["cached_tokens"], self.finished)

    def drain(self) -> None:
        for chunk in self.chunks:
            self.latest = chunk


class SGLangEngine(SharedKV):
    name = "sglang"

    def __init__(self, engine: ThawEngine) -> None:
        self.engine = engine
        self.streaming: Optional[_Streaming] = None  # the submitted request being stepped
        # submitted after it, in order: rid -> (input, params)
        self.queued: dict[str, tuple[list[int], SamplingParams]] = {}
        self.pending: list[thaw_format.Request] = []  # the last restore's unfinished requests, for finish
        self._progress: dict[str, Progress] = {}  # requests that advanced since the last progress()
        self._ids = RequestIds("thaw")
        # weights_changed was called: an engine started from the launch spec would hold the checkpoint's weights
        self._weights_changed = False

    @classmethod
    def start(cls, **engine_kwargs) -> "SGLangEngine":
        return cls(ThawEngine(**engine_kwargs))

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "fork", "fork_processes", "mid_stream", "streaming", "weights"})

    def model_info(self) -> ModelInfo:
        return ModelInfo(**rpc.call(self.engine, "thaw_model_info"))

    def weights_changed(self, digest: Optional[str] = None) -> None:
        """The weights were changed in place (`update_weights_from_tensor` / `update_weights_from_disk`, an RL
        step), the engine idle: its identity names them by `digest` (thaw_format.weights_digest of the full new
        weights under checkpoint names; None: unknown, so snapshots naming a digest and captures are refused) and
        its radix cache, the KV of the old weights, is flushed. Captures with weights hold the live parameters;
        a restore that loads a snapshot's weights names them by its digest again."""
        check_idle(self.streaming is not None or bool(self.queued or self.pending))
        rpc.call(self.engine, "thaw_weights_changed", digest=checked_digest(digest))
        self._weights_changed = True

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        check_params(params)
        out = self.engine.generate(input_ids=[int(t) for t in prompt], sampling_params=sglang_params(params),
                                   return_logprob=True)
        meta = out["meta_info"]
        logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
        return Generation(list(out["output_ids"]), meta["cached_tokens"], logprobs)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        """Start the request (its prefill gives the first token), or queue it behind the one being stepped."""
        check_params(params)
        rid = self._new_id()
        self.queued[rid] = ([int(t) for t in prompt], copy.deepcopy(params))  # the caller's may change later
        if self.streaming is None:
            self._start_next()
        return rid

    def _new_id(self) -> str:
        """A fresh id, never one a request in flight holds (a restored request keeps the id of its snapshot)."""
        in_use = self.queued.keys() | {r.id for r in self.pending} | ({self.streaming.rid} if self.streaming else set())
        return self._ids.fresh(in_use)

    def _start_next(self) -> None:
        """Send the first queued request to the paused engine and let it run its prefill alone."""
        rid, (input_ids, params) = next(iter(self.queued.items()))
        del self.queued[rid]
        self.engine.run_batches(1)  # the prefill (the first token), then the engine pauses itself
        stream = self.engine.generate(input_ids=input_ids, sampling_params=sglang_params(params), stream=True, rid=rid)
        self.streaming = _Streaming(rid, stream, next(stream))  # sends the request; returns at its first token
        self._progress[rid] = self.streaming.progress()

    def step(self) -> dict[str, list[int]]:
        """Let the paused engine run exactly one more batch (one decode step) and read the token it gives.

        The engine pauses itself after that batch (`ThawEngine.run_batches`), so however slow this process is,
        a capture finds the request where the steps left it. Requests are stepped one at a time, in the order
        submitted (each gets exactly its tokens alone): the step after one finished runs the next one's prefill,
        or raises Refused if SGLang refuses it."""
        if self.streaming is None:
            if self.queued:
                rid = next(iter(self.queued))
                try:
                    self._start_next()
                except Exception as exc:  # SGLang validates a request when it is sent: this one alone fails
                    raise Refused(rid, str(exc)) from exc
            return {}
        if not self.streaming.finished:
            self.engine.run_batches(1)
            self.streaming.latest = next(self.streaming.chunks)
            self._progress[self.streaming.rid] = self.streaming.progress()
        if not self.streaming.finished:
            return {}
        streaming, self.streaming = self.streaming, None
        streaming.drain()  # the stream ends after its finished chunk: no batch runs
        self.engine.unpause()  # nothing being stepped: the engine runs freely until the next request
        return {streaming.rid: list(streaming.latest["output_ids"])}

    def abort(self, request_id: str) -> bool:
        """A queued request, or one the last restore left for finish, has not reached SGLang: it leaves thaw's
        queue. The one being stepped is aborted by SGLang's own path, then the engine runs freely until its stream
        ends (SGLang finishes an aborted running request at its next batch, freeing its slots); the next queued
        request starts at the next step. SGLang aborts every request whose id starts with the one given ("thaw-1"
        also hits "thaw-10"), but the request stepped is the only one in SGLang then."""
        if self.queued.pop(request_id, None) is not None:
            self._progress[request_id] = Progress([], 0, True, aborted=True)
            return True
        restored = next((r for r in self.pending if r.id == request_id), None)
        if restored is not None:  # restored in flight, not yet resumed in SGLang (finish runs it): it leaves
            self.pending.remove(restored)
            self._progress[request_id] = Progress(list(restored.output_token_ids), 0, True, aborted=True)
            return True
        streaming = self.streaming
        if streaming is None or streaming.rid != request_id or streaming.finished:
            return False  # a finished one (max_tokens=1 finishes in submit) has its last Progress out already
        self.streaming = None
        last = streaming.progress()
        self.engine.abort(request_id)
        self.engine.unpause()
        streaming.drain()
        self._progress[request_id] = Progress(last.token_ids, last.cached_tokens, True, aborted=True)
        return True

    def progress(self) -> dict[str, Progress]:
        out, self._progress = self._progress, {}
        return out

    def finish(self, requests: Optional[Sequence[Resumed]] = None) -> dict[str, Finished]:
        """Finish the submitted requests (unpausing the engine) and the last restore's unfinished requests."""
        wanted = None if requests is None else {r.request_id for r in requests}
        done = {}
        if self.streaming is not None and (wanted is None or self.streaming.rid in wanted):
            streaming, self.streaming = self.streaming, None
            self.engine.unpause()
            streaming.drain()
            meta = streaming.latest["meta_info"]  # a chunk holds every output token so far
            done[streaming.rid] = Finished(streaming.rid, list(streaming.latest["output_ids"]), meta["cached_tokens"])
        queued = [rid for rid in self.queued if wanted is None or rid in wanted]
        if queued and self.streaming is not None:
            raise RuntimeError(f"{queued} wait behind {self.streaming.rid}, which is being stepped: finish it first")
        for rid in queued:
            input_ids, params = self.queued.pop(rid)
            out = self.engine.generate(input_ids=input_ids, sampling_params=sglang_params(params), rid=rid)
            done[rid] = Finished(rid, list(out["output_ids"]), out["meta_info"]["cached_tokens"])
        run = [r for r in self.pending if wanted is None or r.id in wanted]
        self.pending = [r for r in self.pending if r not in run]
        for request in run:  # one at a time, as submitted ones run: each gets exactly the tokens it gets alone
            input_ids, params = resume_arguments(request)
            out = self.engine.generate(input_ids=input_ids, sampling_params=params)
            done[request.id] = Finished(request.id, request.output_token_ids + list(out["output_ids"]),
                                        out["meta_info"]["cached_tokens"])
        for rid in done:  # what a step reported of them: finished here, they are gone (none reported again)
            self._progress.pop(rid, None)
        return done

    def capture(self, *, include_weights: bool = True, chains=None) -> Snapshot:
        snapshot = capture(self.engine, include_weights=include_weights, chains=chains)
        # In flight for the contract, though not in SGLang: the last restore's requests that finish has not sent yet
        # (as restored: their status and output so far; their KV is in the prefix cache this capture holds, and their
        # pages were the old snapshot's), and those queued (waiting, with nothing computed).
        held = [dataclasses.replace(copy.deepcopy(r), pages=[], num_computed_tokens=0) for r in self.pending]
        held += [Request(rid, "waiting", list(ids), [], copy.deepcopy(params))
                 for rid, (ids, params) in self.queued.items()]
        if held:
            snapshot.scheduler = snapshot.scheduler or SchedulerState()
            snapshot.scheduler.requests += held
        return snapshot

    def capture_shared(self, *, chains=None) -> str:
        return capture_shared(self.engine, chains=chains)  # published by the scheduler: no copy in this process

    def check(self, snapshot: Snapshot) -> None:
        check(self.engine, snapshot)

    def restore(self, snapshot: Snapshot) -> list[Resumed]:
        return self.restore_source(snapshot)

    def restore_source(self, source, *, verified: bool = False) -> list[Resumed]:
        """Restore a Snapshot or a source (the scheduler reads it in place, verified unless `verified`: a segment
        its caller checked, thaw_format.sdk.shared.checked_by_caller)."""
        self.pending = restore_pending(self.engine, source, verified=verified)
        return resumed_of(self.pending)

    def page_size(self) -> int:
        """The page thaw's captures cut the radix cache into: 32 tokens, or the least multiple of SGLang's own page
        size at least as long (thaw_engine.snapshot_page_size)."""
        return snapshot_page_size(self.engine)

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list:
        return fork(self, n, context=context, processes=processes)

    # What a snapshot file may set when wake starts this engine (thaw_format.sdk.launch): the plain options an
    # equal engine needs. No hook, loader, backend or sidecar named by path, no key, no remote or hub model or
    # revision, no loader but those reading the model directory (others fetch elsewhere, or are plugins).
    launch_options = {
        "model_path": LocalDirectory, "tokenizer_path": LocalDirectory, "dtype": str, "device": str,
        "attention_backend": str, "skip_tokenizer_init": bool, "max_total_tokens": int, "random_seed": int,
        "disable_cuda_graph": bool, "sleep_on_idle": bool, "page_size": int, "mem_fraction_static": float,
        "context_length": int, "tp_size": int, "chunked_prefill_size": int, "max_running_requests": int,
        "disable_radix_cache": bool, "kv_cache_dtype": str, "quantization": str, "sampling_backend": str,
        "load_format": OneOf("auto", "safetensors", "pt"),
    }

    def launch_spec(self) -> LaunchSpec:
        check_launchable(self._weights_changed)
        return LaunchSpec(f"{__name__}:SGLangEngine.start", dict(self.engine.engine_kwargs))

    def close(self) -> None:
        self.engine.shutdown()
