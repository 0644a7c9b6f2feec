"""The MLX driver: mlx-lm models loaded from the zoo's HF checkpoints, sessions captured with thaw_mlx.

mlx-lm has no server and no prefix cache: an engine here is a model plus the sessions (token ids + prompt
cache) it has served. A request continues the longest session whose tokens begin its prompt, as a prefix
cache would, and its cached-token count is that session's cache offset. One session is in flight at a time
(thaw_mlx snapshots one sequence). Sampling goes through thaw_mlx.Sampler, whose PRNG key a snapshot keeps.
The model is identified by its checkpoint (thaw_mlx.model_info(model, checkpoint=...)), as vLLM and SGLang
identify theirs, so that snapshots cross engines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx_lm
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

import thaw_format
import thaw_mlx
from thaw_format import ModelInfo, SamplingParams, Snapshot

from ..models import ARCHS, checkpoint
from ..sdk import Generation, Sampling, Unsupported

REQUEST_ID = "mlx-0"  # thaw_mlx names a session's one request so


def _mlx_config(hf_config: dict) -> dict:
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


def _in_flight(request) -> bool:
    """Whether a snapshot's request was captured before it produced all its tokens."""
    max_tokens = request.sampling.max_tokens
    return request.status != "finished" and max_tokens is not None and len(request.output_token_ids) < max_tokens


class _Session:
    def __init__(self, tokens: list[int], cache: list) -> None:
        self.tokens, self.cache = tokens, cache


def _sampler(sampling: Sampling, max_tokens: Optional[int] = None) -> thaw_mlx.Sampler:
    return thaw_mlx.Sampler(SamplingParams(temperature=sampling.temperature, seed=sampling.seed, max_tokens=max_tokens))


class _InFlight:
    """A request being generated step by step; its session's tokens grow as it yields."""

    def __init__(self, model, session: _Session, num_prompt: int, sampler: thaw_mlx.Sampler) -> None:
        self.session, self.num_prompt, self.sampler = session, num_prompt, sampler
        remaining = sampler.params.max_tokens - (len(session.tokens) - num_prompt)
        self.steps = thaw_mlx.generate(model, session.cache, list(session.tokens), remaining, sampler=sampler)


class MLXEngine:
    def __init__(self, model, info: ModelInfo) -> None:
        self.model, self.info = model, info  # info: the checkpoint identity, digested once
        self.sessions: list[_Session] = []
        self.inflight: Optional[_InFlight] = None

    # --- serving ---

    def _continue_from(self, prompt: list[int]) -> tuple[list, int]:
        """A private copy of the cache of the longest session that begins the prompt, and its offset."""
        best = max((s for s in self.sessions if s.tokens == prompt[: len(s.tokens)]), key=lambda s: len(s.tokens),
                   default=None)
        if best is None:
            return make_prompt_cache(self.model), 0
        snapshot = thaw_mlx.capture(self.model, best.cache, best.tokens, include_weights=False, info=self.info)
        cache = thaw_mlx.restore(self.model, snapshot, info=self.info)
        return cache, min(cache[0].offset, len(prompt) - 1)

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> Generation:
        prompt = [int(t) for t in prompt]
        cache, cached = self._continue_from(prompt)
        logprobs: list[float] = []
        pick = _sampler(sampling)

        def sampler(lp):
            token = pick(lp)
            logprobs.append(lp[0, token.item()].item())
            return token

        out = list(thaw_mlx.generate(self.model, cache, prompt, max_tokens, sampler=sampler))
        self.sessions.append(_Session(prompt + out, cache))
        return Generation(out, cached, logprobs)

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> str:
        if self.inflight is not None:
            raise Unsupported("an MLX session is one sequence: one request in flight at a time")
        prompt = [int(t) for t in prompt]
        cache, _ = self._continue_from(prompt)
        self.inflight = _InFlight(self.model, _Session(prompt, cache), len(prompt), _sampler(sampling, max_tokens))
        return REQUEST_ID

    def step(self) -> None:
        if self.inflight is not None:
            self.inflight.session.tokens.append(next(self.inflight.steps))

    def drain(self) -> dict[str, list[int]]:
        if self.inflight is None:
            return {}
        flight, self.inflight = self.inflight, None
        flight.session.tokens.extend(flight.steps)
        self.sessions.append(flight.session)
        return {REQUEST_ID: flight.session.tokens[flight.num_prompt :]}

    # --- state ---

    def _current(self) -> Optional[tuple[_Session, Optional[thaw_mlx.Sampler], int]]:
        """The session a snapshot holds: the one in flight, else the latest served."""
        if self.inflight is not None:
            return self.inflight.session, self.inflight.sampler, self.inflight.num_prompt
        if self.sessions:
            return self.sessions[-1], None, len(self.sessions[-1].tokens)
        return None

    def capture(self, path: Path) -> None:
        current = self._current()
        if current is None:
            raise Unsupported("nothing to capture: no session yet")
        session, sampler, num_prompt = current
        # a served session: its KV is cache, and no request is left for a restore to run
        snapshot = thaw_mlx.capture(self.model, session.cache, session.tokens, num_prompt_tokens=num_prompt,
                                    sampler=sampler, info=self.info, finished=self.inflight is None)
        thaw_format.save(snapshot, path)

    def restore(self, path: Path) -> None:
        self.restore_snapshot(thaw_format.load(path))

    def restore_snapshot(self, snapshot: Snapshot) -> None:
        cache = thaw_mlx.restore(self.model, snapshot, info=self.info)
        tokens = thaw_mlx.snapshot_tokens(snapshot)
        self.sessions, self.inflight = [_Session(tokens, cache)], None
        # Another engine's snapshot of its idle prefix cache has no requests: thaw_mlx reads its one chain.
        requests = snapshot.scheduler.requests if snapshot.scheduler is not None else []
        if len(requests) == 1 and _in_flight(requests[0]):
            self.sessions = []
            self.inflight = _InFlight(self.model, _Session(tokens, cache), len(requests[0].prompt_token_ids),
                                      thaw_mlx.sampler_of(snapshot))

    def weights(self):
        return thaw_mlx.model_weights(self.model)

    def kv(self) -> Snapshot:
        current = self._current()
        if current is None:
            return Snapshot()
        session = current[0]
        return thaw_mlx.capture(self.model, session.cache, session.tokens, include_weights=False, info=self.info)

    def fork(self, n: int, context: Sequence[int]) -> list["MLXEngine"]:
        """n engines over the buffers of the session that begins `context`, shared (MLX copies a buffer when a
        session writes)."""
        session = max((s for s in self.sessions if s.tokens == list(context[: len(s.tokens)])),
                      key=lambda s: len(s.tokens))
        snapshot = thaw_mlx.capture(self.model, session.cache, session.tokens, include_weights=False, info=self.info)
        engines = []
        for cache in thaw_mlx.fork(self.model, snapshot, n, info=self.info):
            engine = MLXEngine(self.model, self.info)
            engine.sessions = [_Session(list(session.tokens), cache)]
            engines.append(engine)
        return engines

    def close(self) -> None:
        self.sessions, self.inflight = [], None


class MLXDriver:
    name = "mlx"
    features = frozenset({"logprobs", "seeded", "fork", "mid_stream", "mid_stream_seeded"})

    def versions(self) -> dict[str, str]:
        return {"mlx": mx.__version__, "mlx-lm": mlx_lm.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHS)

    def start(self, arch: str, workdir: Path) -> MLXEngine:
        path = checkpoint(arch)
        hf_config = json.loads((path / "config.json").read_text())
        model, _ = load_model(path, model_config=_mlx_config(hf_config))
        return MLXEngine(model, thaw_mlx.model_info(model, checkpoint=path))


def driver() -> MLXDriver:
    return MLXDriver()
