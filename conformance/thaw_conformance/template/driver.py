"""The toy engine's conformance driver: the SDK (thaw_conformance.sdk) over the toy engine and its adapter.

A new engine's driver has this shape: `start` builds the engine for a zoo architecture, and each Engine
method is a few lines over the engine's public API and its thaw adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

import thaw_format

from ..sdk import Generation, Sampling
from . import adapter
from .engine import ToyEngine, ToyModelConfig, make_weights

# The toy has one architecture; its "zoo" is two seeds of it, so that a wrong-model restore can be tried.
ARCHITECTURES = {"toy": ToyModelConfig(seed=0), "toy-seed1": ToyModelConfig(seed=1)}


class ToyDriverEngine:
    def __init__(self, engine: ToyEngine) -> None:
        self.engine = engine

    def generate(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> Generation:
        request = self.engine.generate(prompt, max_tokens, sampling.temperature, sampling.seed)
        return Generation(request.output, request.cached_tokens, request.logprobs)

    def capture(self, path: Path) -> None:
        thaw_format.save(adapter.capture(self.engine), path)

    def restore(self, path: Path) -> None:
        adapter.restore(self.engine, thaw_format.load(path))

    def weights(self):
        return adapter.engine_weights(self.engine)

    def kv(self):
        return adapter.capture(self.engine, include_weights=False)

    def submit(self, prompt: Sequence[int], max_tokens: int, sampling: Sampling) -> str:
        return self.engine.submit(prompt, max_tokens, sampling.temperature, sampling.seed).id

    def step(self) -> None:
        self.engine.step()

    def drain(self) -> dict[str, list[int]]:
        done = {}
        while self.engine.running:
            done.update({request.id: request.output for request in self.engine.step()})
        return done

    def fork(self, n: int, context: Sequence[int]) -> list["ToyDriverEngine"]:
        snapshot = adapter.capture(self.engine)
        children = [ToyEngine(self.engine.config, self.engine.weights) for _ in range(n)]
        for child in children:
            adapter.restore(child, snapshot)
        return [type(self)(child) for child in children]

    def close(self) -> None:
        self.engine = None


class ToyDriver:
    name = "template"
    features = frozenset({"logprobs", "seeded", "fork", "mid_stream", "mid_stream_seeded"})

    def versions(self) -> dict[str, str]:
        return {"engine": f"{adapter.ENGINE_NAME} {adapter.ENGINE_VERSION}", "numpy": np.__version__}

    def architectures(self) -> list[str]:
        return list(ARCHITECTURES)

    def start(self, arch: str, workdir: Path) -> ToyDriverEngine:
        config = ARCHITECTURES[arch]
        return ToyDriverEngine(ToyEngine(config, make_weights(config)))


def driver() -> ToyDriver:
    return ToyDriver()
