"""SGLangEngine: the adapter contract (thaw_format.sdk.contract) over one ThawEngine (an sglang.Engine).

    engine = SGLangEngine.start(model_path=..., **sglang_engine_arguments)
    engine = SGLangEngine(thaw_engine)                   # or wrap a running ThawEngine

Requests go through SGLang's own Engine.generate. SGLang honours a sampling seed only under deterministic
inference (otherwise its sampler draws from torch's global generator), which it allows with GPU attention
backends only: on CPU seeded sampling is not reproducible, so "seeded" is not among the capabilities.

Requests in flight: `submit` streams a request and pauses the engine at its first token; each `step` lets it
run until the next token arrives and pauses it again, so a capture always finds it running, never finished.
A restore's unfinished requests are submitted again by `finish` (SGLang runs them from their tokens so far,
a prefix-cache hit on the restored KV).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import thaw_format
from thaw_format import ModelInfo, SamplingParams, Snapshot
from thaw_format.sdk import Finished, Generation, LaunchSpec, Resumed, Unsupported, fork
from thaw_format.sdk.shared import SharedKV

from .requests import resume_arguments, sglang_params
from .thaw_engine import ThawEngine, capture, capture_shared, check, restore_pending, resumed_of


@dataclass
class _Streaming:
    rid: str
    chunks: Iterator[dict]  # SGLang's output stream
    latest: dict  # the last chunk read


class SGLangEngine(SharedKV):
    name = "sglang"

    def __init__(self, engine: ThawEngine) -> None:
        self.engine = engine
        self.streaming: Optional[_Streaming] = None  # the submitted request
        self.pending: list[thaw_format.Request] = []  # the last restore's unfinished requests, for finish
        self._ids = itertools.count()

    @classmethod
    def start(cls, **engine_kwargs) -> "SGLangEngine":
        return cls(ThawEngine(**engine_kwargs))

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "fork", "fork_processes", "mid_stream", "weights"})

    def model_info(self) -> ModelInfo:
        return capture(self.engine, include_weights=False, chains=[]).model  # no KV: the identity alone

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        out = self.engine.generate(input_ids=[int(t) for t in prompt], sampling_params=sglang_params(params),
                                   return_logprob=True)
        meta = out["meta_info"]
        logprobs = [entry[0] for entry in meta["output_token_logprobs"]]
        return Generation(list(out["output_ids"]), meta["cached_tokens"], logprobs)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        if self.streaming is not None:
            raise Unsupported("thaw_sglang steps one submitted request at a time")
        rid = f"thaw-{next(self._ids)}"
        self.engine.run_batches(1)  # the prefill (the first token), then the engine pauses itself
        stream = self.engine.generate(input_ids=[int(t) for t in prompt], sampling_params=sglang_params(params),
                                      stream=True, rid=rid)
        self.streaming = _Streaming(rid, stream, next(stream))  # sends the request; returns at its first token
        return rid

    def step(self) -> dict[str, list[int]]:
        """Let the paused engine run exactly one more batch (one decode step) and read the token it gives.

        The engine pauses itself after that batch (`ThawEngine.run_batches`), so however slow this process is,
        a capture finds the request where the steps left it. A request whose stream has ended is returned."""
        if self.streaming is None:
            return {}
        self.engine.run_batches(1)
        chunk = next(self.streaming.chunks, None)
        if chunk is not None:
            self.streaming.latest = chunk
            return {}
        streaming, self.streaming = self.streaming, None
        self.engine.unpause()  # nothing left to step: the engine runs freely again
        return {streaming.rid: list(streaming.latest["output_ids"])}

    def finish(self, requests: Optional[Sequence[Resumed]] = None) -> dict[str, Finished]:
        """Finish the submitted request (unpausing the engine) and the last restore's unfinished requests."""
        wanted = None if requests is None else {r.request_id for r in requests}
        done = {}
        if self.streaming is not None and (wanted is None or self.streaming.rid in wanted):
            streaming, self.streaming = self.streaming, None
            self.engine.unpause()
            for chunk in streaming.chunks:
                streaming.latest = chunk
            meta = streaming.latest["meta_info"]  # a chunk holds every output token so far
            done[streaming.rid] = Finished(streaming.rid, list(streaming.latest["output_ids"]), meta["cached_tokens"])
        run = [r for r in self.pending if wanted is None or r.id in wanted]
        self.pending = [r for r in self.pending if r not in run]
        if run:
            inputs, params = zip(*(resume_arguments(r) for r in run))
            outs = self.engine.generate(input_ids=list(inputs), sampling_params=list(params))
            for request, out in zip(run, outs):
                done[request.id] = Finished(request.id, request.output_token_ids + list(out["output_ids"]),
                                            out["meta_info"]["cached_tokens"])
        return done

    def capture(self, *, include_weights: bool = True, chains=None) -> Snapshot:
        return capture(self.engine, include_weights=include_weights, chains=chains)

    def capture_shared(self, *, chains=None) -> str:
        return capture_shared(self.engine, chains=chains)  # published by the scheduler: no copy in this process

    def check(self, snapshot: Snapshot) -> None:
        check(self.engine, snapshot)

    def restore(self, snapshot: Snapshot) -> list[Resumed]:
        return self.restore_source(snapshot)

    def restore_source(self, source) -> list[Resumed]:
        """Restore a Snapshot or a source (the scheduler reads it in place, verified)."""
        self.pending = restore_pending(self.engine, source)
        return resumed_of(self.pending)

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list:
        return fork(self, n, context=context, processes=processes)

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(f"{__name__}:SGLangEngine.start", dict(self.engine.engine_kwargs))

    def close(self) -> None:
        self.engine.shutdown()
