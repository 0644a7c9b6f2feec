"""thaw_vllm's contract engine (thaw_vllm.VLLMEngine) with `progress()`: what token streaming needs and the
contract's `step` does not give (it returns finished requests only, without the engine's cached-token count)."""

from __future__ import annotations

from thaw_vllm import VLLMEngine

from .progress import Progress


class StreamingVLLMEngine(VLLMEngine):
    def __init__(self, llm) -> None:
        super().__init__(llm)
        self._progress: dict[str, Progress] = {}

    def step(self) -> dict[str, list[int]]:
        """The contract's step, keeping every request's tokens so far and vLLM's cached-token count."""
        finished = {}
        for out in self.llm.llm_engine.step():
            tokens = self._previous.get(out.request_id, []) + list(out.outputs[0].token_ids)
            self._progress[out.request_id] = Progress(tokens, out.num_cached_tokens or 0, out.finished)
            if out.finished:
                self._previous.pop(out.request_id, None)
                finished[out.request_id] = tokens
        return finished

    def progress(self) -> dict[str, Progress]:
        """Requests that advanced since the last call: tokens so far, the engine's cached-token count, done."""
        out, self._progress = self._progress, {}
        return out


_WRAPPED: dict[int, StreamingVLLMEngine] = {}


def streaming_engine(llm) -> StreamingVLLMEngine:
    """The one streaming engine over `llm` (one engine loop per engine: two would step it concurrently)."""
    engine = _WRAPPED.get(id(llm))
    if engine is None or engine.llm is not llm:
        engine = _WRAPPED[id(llm)] = StreamingVLLMEngine(llm)
    return engine
