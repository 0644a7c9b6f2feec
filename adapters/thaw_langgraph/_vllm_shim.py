"""A thin contract-shaped view of a thaw_vllm.LLM, until thaw_vllm ships its contract engine class.

Implements what thaw_langgraph uses of thaw_format.sdk.contract.Engine (model_info, generate, submit, step,
capture, check, restore, close) plus `progress()`, the per-step view of requests in flight that token
streaming needs and the contract does not have yet. Works in-process and in vLLM's default multiprocessing
mode (every call goes through vllm.LLM's public engine client and thaw_vllm's utility calls).
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Optional, Sequence

import thaw_format
from thaw_format.sdk.contract import Generation, Resumed

from .progress import Progress


class VllmEngine:
    name: ClassVar[str] = "vllm"

    def __init__(self, llm) -> None:
        self.llm = llm
        self._ids = itertools.count()
        self._progress: dict[str, Progress] = {}

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "seeded", "fork", "mid_stream", "mid_stream_seeded", "weights"})

    def model_info(self) -> thaw_format.ModelInfo:
        import thaw_vllm

        return thaw_format.ModelInfo(**thaw_vllm.describe(self.llm)["model"])

    def submit(self, prompt: Sequence[int], params: thaw_format.SamplingParams) -> str:
        from thaw_vllm import sampling
        from vllm.inputs import TokensPrompt

        request_id = f"thaw-lc-{next(self._ids)}"
        self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(prompt)), sampling.to_vllm(params))
        return request_id

    def step(self) -> dict[str, list[int]]:
        finished = {}
        for out in self.llm.llm_engine.step():
            tokens = list(out.outputs[0].token_ids)
            self._progress[out.request_id] = Progress(tokens, out.num_cached_tokens or 0, out.finished)
            if out.finished:
                finished[out.request_id] = tokens
        return finished

    def progress(self) -> dict[str, Progress]:
        """Requests that advanced since the last call: tokens so far, the engine's cached-token count, done."""
        out, self._progress = self._progress, {}
        return out

    def generate(self, prompt: Sequence[int], params: thaw_format.SamplingParams) -> Generation:
        request_id = self.submit(prompt, params)
        while True:
            self.step()
            state = self._progress.pop(request_id, None)
            if state is not None and state.finished:
                return Generation(state.token_ids, state.cached_tokens)

    def capture(self, *, include_weights: bool = True, chains: Optional[Sequence[Sequence[int]]] = None) -> thaw_format.Snapshot:
        import thaw_vllm

        return thaw_vllm.capture(self.llm, include_weights=include_weights, chains=chains)

    def check(self, snapshot: thaw_format.Snapshot) -> None:
        import thaw_vllm

        thaw_vllm.check_compatible(self.llm, snapshot)

    def restore(self, snapshot: thaw_format.Snapshot) -> list[Resumed]:
        import thaw_vllm

        return [Resumed(r.request_id, r.prompt_token_ids, r.previous_output_token_ids)
                for r in thaw_vllm.restore(self.llm, snapshot)]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


_WRAPPED: dict[int, VllmEngine] = {}


def contract_engine(llm) -> VllmEngine:
    """The one VllmEngine over `llm` (one engine loop per engine: two wrappers would step it concurrently)."""
    engine = _WRAPPED.get(id(llm))
    if engine is None or engine.llm is not llm:
        engine = _WRAPPED[id(llm)] = VllmEngine(llm)
    return engine
