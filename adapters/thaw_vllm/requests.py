"""Requests through vLLM's own LLMEngine: a restore resubmits a snapshot's unfinished ones, and finish runs
requests in flight to the end, each with what it had produced before the snapshot."""

from __future__ import annotations

from typing import Optional, Sequence

import thaw_format
from thaw_format.sdk import Finished, Resumed, pending_requests

from . import sampling


def resubmit(llm, snapshot: thaw_format.Snapshot) -> list[Resumed]:
    """Add every unfinished request of the snapshot; its tokens so far become its prompt (a prefix-cache hit)."""
    from vllm.inputs import TokensPrompt

    resumed = []
    for request in pending_requests(snapshot):
        max_tokens = request.sampling.max_tokens
        remaining = None if max_tokens is None else max_tokens - len(request.output_token_ids)
        prompt = request.prompt_token_ids + request.output_token_ids
        llm.llm_engine.add_request(request.id, TokensPrompt(prompt_token_ids=prompt),
                                   sampling.to_vllm(request.sampling, max_tokens=remaining))
        resumed.append(Resumed(request.id, request.prompt_token_ids, request.output_token_ids))
    return resumed


def run_to_completion(llm, previous: dict[str, list[int]], wanted: Optional[Sequence[str]] = None) -> dict[str, Finished]:
    """Step the engine until the `wanted` requests (default: every one in flight) are done; `previous` holds
    the output a resumed request had before the snapshot."""
    wanted = None if wanted is None else set(wanted)
    done: dict[str, Finished] = {}
    engine = llm.llm_engine
    while engine.has_unfinished_requests() and (wanted is None or not wanted <= done.keys()):
        for out in engine.step():
            if out.finished:
                rid = out.request_id
                done[rid] = Finished(rid, previous.get(rid, []) + list(out.outputs[0].token_ids),
                                     out.num_cached_tokens or 0)
    return done if wanted is None else {rid: f for rid, f in done.items() if rid in wanted}
