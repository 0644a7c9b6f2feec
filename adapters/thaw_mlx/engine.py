"""MLXEngine: the adapter contract (thaw_format.sdk.contract) over an mlx-lm model and the sessions it served.

mlx-lm has no server and no prefix cache: the engine is a model plus its sessions (token ids + prompt cache).
A request continues the longest session whose tokens begin its prompt, as a prefix cache would, and its
cached-token count is that session's cache offset. One session is in flight at a time (a snapshot holds one
sequence). Sampling goes through thaw_mlx.Sampler, whose PRNG key a snapshot keeps. A model loaded from a
checkpoint (`MLXEngine.start(checkpoint=...)`) is identified by that checkpoint, as vLLM and SGLang identify
theirs, so that snapshots cross engines.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Optional, Sequence

from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from thaw_format import ModelInfo, SamplingParams, Snapshot
from thaw_format.sdk import Finished, Generation, LaunchSpec, Resumed, Unsupported, fork, pending_requests
from thaw_format.sdk.shared import SharedKV

from .generate import generate
from .identity import model_info
from .pages import num_cached_tokens
from .sampling import Sampler, sampler_of
from .session import REQUEST_ID, capture, restore, snapshot_tokens


def _mlx_lm_config(hf_config: dict) -> dict:
    """Fields mlx-lm reads under their transformers-4 names, from a transformers-5 config.json."""
    rope = hf_config.get("rope_parameters") or {}
    config = {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type") == "yarn":
        config["rope_scaling"] = dict(rope, type="yarn")
    if "num_local_experts" in hf_config:
        config["num_experts"] = hf_config["num_local_experts"]
    return config


class _Session:
    def __init__(self, tokens: list[int], cache: list) -> None:
        self.tokens, self.cache = tokens, cache


class _InFlight:
    """A request being generated step by step; its session's tokens grow as it yields."""

    def __init__(self, model, session: _Session, num_prompt: int, sampler: Sampler, previous: int = 0) -> None:
        self.session, self.num_prompt, self.sampler, self.cached = session, num_prompt, sampler, previous
        remaining = sampler.params.max_tokens - (len(session.tokens) - num_prompt)
        self.steps = generate(model, session.cache, list(session.tokens), remaining, sampler=sampler)


class MLXEngine(SharedKV):
    name = "mlx"

    def __init__(self, model, info: Optional[ModelInfo] = None, *, checkpoint: Optional[str] = None) -> None:
        self.model, self.checkpoint = model, checkpoint
        self.info = info or model_info(model, checkpoint=checkpoint)  # digested once
        self.sessions: list[_Session] = []
        self.inflight: Optional[_InFlight] = None

    @classmethod
    def start(cls, checkpoint: str) -> "MLXEngine":
        """Load a Hugging Face checkpoint directory with mlx-lm."""
        from mlx_lm.utils import load_model

        hf_config = json.loads((Path(checkpoint) / "config.json").read_text())
        model, _ = load_model(Path(checkpoint), model_config=_mlx_lm_config(hf_config))
        return cls(model, checkpoint=str(checkpoint))

    @classmethod
    def capabilities(cls) -> frozenset:
        return frozenset({"logprobs", "seeded", "fork", "fork_processes", "mid_stream", "mid_stream_seeded"})

    def model_info(self) -> ModelInfo:
        return self.info

    # --- serving ---

    def _continue_from(self, prompt: list[int]) -> tuple[list, int]:
        """A private copy of the cache of the longest session that begins the prompt, and its offset."""
        best = self._session_of(prompt)
        if best is None:
            return make_prompt_cache(self.model), 0
        snapshot = capture(self.model, best.cache, best.tokens, include_weights=False, info=self.info)
        cache = restore(self.model, snapshot, info=self.info)
        return cache, min(cache[0].offset, len(prompt) - 1)

    def _session_of(self, prompt: Sequence[int]) -> Optional[_Session]:
        prompt = list(prompt)
        return max((s for s in self.sessions if s.tokens == prompt[: len(s.tokens)]), key=lambda s: len(s.tokens),
                   default=None)

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> Generation:
        prompt = [int(t) for t in prompt]
        cache, cached = self._continue_from(prompt)
        logprobs: list[float] = []
        pick = Sampler(params)

        def sampler(lp):
            token = pick(lp)
            logprobs.append(lp[0, token.item()].item())
            return token

        out = list(generate(self.model, cache, prompt, params.max_tokens, sampler=sampler))
        self.sessions.append(_Session(prompt + out, cache))
        return Generation(out, cached, logprobs)

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> str:
        if self.inflight is not None:
            raise Unsupported("an MLX session is one sequence: one request in flight at a time")
        prompt = [int(t) for t in prompt]
        cache, cached = self._continue_from(prompt)
        self.inflight = _InFlight(self.model, _Session(prompt, cache), len(prompt), Sampler(params), cached)
        return REQUEST_ID

    def step(self) -> dict[str, list[int]]:
        if self.inflight is None:
            return {}
        token = next(self.inflight.steps, None)
        if token is not None:
            self.inflight.session.tokens.append(token)
            return {}
        return {REQUEST_ID: self.finish()[REQUEST_ID].output_token_ids}

    def finish(self, requests: Optional[Sequence[Resumed]] = None) -> dict[str, Finished]:
        if self.inflight is None or (requests is not None and REQUEST_ID not in {r.request_id for r in requests}):
            return {}
        flight, self.inflight = self.inflight, None
        flight.session.tokens.extend(flight.steps)
        self.sessions.append(flight.session)
        return {REQUEST_ID: Finished(REQUEST_ID, flight.session.tokens[flight.num_prompt :], flight.cached)}

    # --- state ---

    def _current(self, chains) -> Optional[tuple[list[int], list, Optional[Sampler], int]]:
        """What a snapshot holds (tokens, cache, sampler, prompt length): the request in flight, else the KV of
        `chains`, else the latest session served."""
        if self.inflight is not None:
            flight = self.inflight
            return flight.session.tokens, flight.session.cache, flight.sampler, flight.num_prompt
        if chains:
            held = self._chain_view([int(t) for t in chains[0]])
            return None if held is None else (*held, None, len(held[0]))
        return None if not self.sessions else (self.sessions[-1].tokens, self.sessions[-1].cache, None,
                                               len(self.sessions[-1].tokens))

    def _chain_view(self, chain: list[int]) -> Optional[tuple[list[int], list]]:
        """The tokens and cache of `chain`'s KV only: a session that runs past the chain is seen through a
        trimmed shallow copy of its cache (the arrays are shared, not copied); else the longest session the
        chain extends."""
        session = next((s for s in self.sessions if chain and s.tokens[: len(chain)] == chain), None)
        if session is None:
            session = self._session_of(chain)
            return None if session is None else (session.tokens, session.cache)
        view = [copy.copy(layer) for layer in session.cache]
        past = num_cached_tokens(view) - len(chain)
        if past > 0 and (not can_trim_prompt_cache(view) or trim_prompt_cache(view, past) != past):
            raise Unsupported("this session's cache cannot be cut back to the chain (a rotating window that has "
                              "wrapped, or a recurrent layer): capture the whole session instead")
        return chain, view

    def capture(self, *, include_weights: bool = True, chains=None) -> Snapshot:
        if chains is not None and len(chains) > 1:
            raise Unsupported("an MLX snapshot holds one sequence: capture one chain at a time")
        current = self._current(chains)
        if current is None:  # nothing served yet: a snapshot without KV
            return Snapshot(model=self.info, weights=None)
        tokens, cache, sampler, num_prompt = current
        # a served session: its KV is cache, and no request is left for a restore to run
        return capture(self.model, cache, tokens, num_prompt_tokens=num_prompt, sampler=sampler,
                       info=self.info, finished=self.inflight is None, include_weights=include_weights)

    def check(self, snapshot: Snapshot) -> None:
        restore(self.model, snapshot, info=self.info)  # builds a cache it drops: nothing of the engine changes

    def restore(self, snapshot: Snapshot) -> list[Resumed]:
        cache = restore(self.model, snapshot, info=self.info)
        tokens = snapshot_tokens(snapshot)
        self.sessions, self.inflight = [_Session(tokens, cache)], None
        # Another engine's snapshot of its idle prefix cache has no requests: thaw_mlx reads its one chain.
        pending = [r for r in pending_requests(snapshot)
                   if r.sampling.max_tokens is not None and len(r.output_token_ids) < r.sampling.max_tokens]
        if len(pending) != 1:
            return []
        request = pending[0]
        self.sessions = []
        self.inflight = _InFlight(self.model, _Session(tokens, cache), len(request.prompt_token_ids),
                                  sampler_of(snapshot), request.num_computed_tokens)
        return [Resumed(request.id, request.prompt_token_ids, request.output_token_ids)]

    def fork(self, n: int, *, context: Sequence[int], processes: bool = False) -> list:
        return fork(self, n, context=context, processes=processes)

    def launch_spec(self) -> LaunchSpec:
        if self.checkpoint is None:
            raise Unsupported("fork into processes needs a model loaded from a checkpoint (MLXEngine.start)")
        return LaunchSpec(f"{__name__}:MLXEngine.start", {"checkpoint": self.checkpoint})

    def close(self) -> None:
        self.sessions, self.inflight = [], None
